"""Shared pieces of every config: the strict base model.

A section given as a mapping (a preset or ``--config`` file, ``--set``, a Prefect flow parameter,
an ablation variant) changes only the fields it names, at every depth: the others keep the
field's default, also where that default is not the section's class default
(``fe_sft: SFTConfig = SFTConfig(loss_on="assistant")`` keeps ``loss_on`` under ``fe_sft: {max_steps: 7}``).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.fields import FieldInfo


class StrictModel(BaseModel):
    """Unknown keys are errors; field docstrings become descriptions (the Prefect UI shows them)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _merge_over_field_defaults(cls, data: Any) -> Any:
        # Pydantic alone builds a section given as a mapping from its class defaults, dropping what the
        # field's default instance holds (fe_sft's loss_on: assistant).
        if not isinstance(data, dict):
            return data
        merged = None
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, dict) and isinstance(field.default, BaseModel):
                merged = merged if merged is not None else dict(data)
                merged[name] = merge_over_default(field, field.default, value)
        return data if merged is None else merged


def merge_over_default(field: FieldInfo, default: BaseModel, given: dict[str, Any]) -> dict[str, Any]:
    """The input for ``field``: ``given`` laid over every field of ``default``, recursively.

    The whole default is dumped, not just its set fields, and the merge is deep: the nested
    models' own validators know only their class's field defaults, so every field of the result
    must be named here (``Mid(leaf=Leaf(b=2))`` as a default: ``{leaf: {a: 1}}`` keeps b=2 and
    Leaf's class defaults, not Mid's default leaf). So ``model_dump(exclude_unset=True)`` of a
    merged config is no faithful copy; a plain ``model_dump()`` is.
    Only model-valued fields are merged; lists, plain mappings (``question_mix``), None and values
    given replace the default's. Secrets stay ``SecretStr`` (a Python dump, not a masked JSON one).
    A ``given`` for another member of a union of models (another discriminator value, or a union
    without a string discriminator) is taken as it is. Keys are field names (no config uses aliases);
    any other key passes through for pydantic to reject.
    """
    tag_field = _merge_tag(field)
    if tag_field is False:
        return given
    if tag_field is not None and given.get(tag_field, getattr(default, tag_field)) != getattr(default, tag_field):
        return given
    merged = default.model_dump()
    fields = type(default).model_fields
    for key, value in given.items():
        sub = getattr(default, key) if key in fields else None
        if isinstance(value, dict) and isinstance(sub, BaseModel):
            merged[key] = merge_over_default(fields[key], sub, value)
        else:
            merged[key] = value
    return merged


def _merge_tag(field: FieldInfo) -> str | None | typing.Literal[False]:
    """None: the field holds one model class (merge). A name: a union discriminated by that field
    (merge when the tag agrees). False: a union of models without a string discriminator (no merge)."""
    if isinstance(field.discriminator, str):
        return field.discriminator
    ann = field.annotation
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return None if len(models) <= 1 else False

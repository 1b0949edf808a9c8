"""Resolve a config: preset or file, then environment variables, then ``--set key.path=value``.

Each layer changes only the fields it names: a section given as a mapping is merged into what is
there (``set_path``) and then into the field's default (``StrictModel``), at every depth.

Every failure (unknown preset, bad YAML, unknown key, bad value, bad override) raises
``ConfigError`` naming the field, before any work starts.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from foresight_core.config.pipeline import PipelineConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: found from any directory, in a wheel too

# Environment variable -> dotted config path. Standard names, so existing deployments just work.
ENV_OVERRIDES: dict[str, str] = {
    "MLFLOW_TRACKING_URI": "infra.tracking.tracking_uri",
    "RAY_ADDRESS": "infra.ray.address",
    "PREFECT_API_URL": "infra.prefect.api_url",
    "AWS_ENDPOINT_URL": "infra.storage.endpoint_url",
    "AWS_ENDPOINT_URL_S3": "infra.storage.endpoint_url",
    "AWS_ACCESS_KEY_ID": "infra.storage.key",
    "AWS_SECRET_ACCESS_KEY": "infra.storage.secret",
    "AWS_DEFAULT_REGION": "infra.storage.region",
    "FORESIGHT_WORK_DIR": "work_dir",
}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    return path


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = 'a.b.c'``, creating mappings on the way.

    A mapping set on a config section that holds a mapping already is merged into it, at every
    depth (``fc_rl={lr: 1e-5}`` changes fc_rl.lr only); values, lists and mapping-valued fields
    (``question_mix``) are replaced. Which keys are sections is read from ``PipelineConfig``.
    """
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override key {dotted!r} has an empty part")
    node, section = data, PipelineConfig
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node, section = nxt, _section(section, k)
    _put(node, keys[-1], value, section)


def _put(node: dict[str, Any], key: str, value: Any, section: type[BaseModel] | None) -> None:
    sub = _section(section, key)
    old = node.get(key)
    if sub is not None and isinstance(value, dict) and isinstance(old, dict):
        old = node[key] = dict(old)
        for k, v in value.items():
            _put(old, k, v, sub)
    else:
        node[key] = value


def _section(model: type[BaseModel] | None, name: str) -> type[BaseModel] | None:
    """The model class of field ``name`` when it is a section (one model class, maybe optional);
    None for values, plain mappings, unions of several models and unknown names."""
    field = model.model_fields.get(name) if model is not None else None
    if field is None:
        return None
    ann = field.annotation
    args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    args = tuple(a for a in args if a is not type(None))
    return args[0] if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel) else None


def parse_override(item: str) -> tuple[str, Any]:
    """``'fc_rl.lr=1e-5'`` -> ``('fc_rl.lr', 1e-05)``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e
    return key, value


def _format_validation_error(e: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}" + (f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err.get("input"), dict) else ""))
    return "\n".join(lines)


def validate(data: dict[str, Any], origin: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def load_config(preset: str | None = None, file: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None) -> PipelineConfig:
    """Preset (default ``laptop``) or file, then environment overrides, then ``--set`` overrides."""
    if preset and file:
        raise ConfigError("give --preset or --config, not both")
    if file:
        path = Path(file)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data, origin = _read_yaml(path), str(path)
    else:
        name = preset or "laptop"
        data, origin = _read_yaml(preset_path(name)), f"preset {name}"
        data.setdefault("name", name)
    env = os.environ if env is None else env
    for var, dotted in ENV_OVERRIDES.items():
        if env.get(var):
            set_path(data, dotted, env[var])
    for item in overrides:
        key, value = parse_override(item)
        set_path(data, key, value)
    return validate(data, origin + (" with overrides" if overrides else ""))


def dump_config(cfg: PipelineConfig) -> str:
    """YAML of the resolved config, secrets masked."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

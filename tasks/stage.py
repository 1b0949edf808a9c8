"""The one stage protocol: key, reuse, resume, launch on Ray, record in MLflow, return references.

    spec = StageSpec(stage="fe_sft", cfg=cfg, entries=("foresight_core.sft",),
                     inputs=[StageInput("fe_sft", data_uri, sha, context="fe_sft")],
                     init_model_uri=wm_model_uri, launch=lambda run, key: fit_stage(...))
    ref = run_stage(spec, parent_run_id=pipeline_run_id)
    ref["model_uri"], ref["metrics"], ref["reused"]

A stage is a spec plus its core function. ``run_stage`` owns what every stage does the same way:
1. The key: the stage's config section (less what only changes speed or retries, ``NOT_IN_KEY``), the
   sections it also reads (model, envs, seed), the inputs' sha256, the starting model and the code
   version of the core modules it runs (``foresight_core.provenance``). Same key, same result.
2. A FINISHED MLflow run with that key is the result: nothing runs, the reference says ``reused``.
3. Else a RUNNING or FAILED run with that key (the process died, or Ray gave up) is continued, so a
   stage started again resumes from its last checkpoint; else a new run nested under the parent gets the
   input tags, the stage's params and its datasets.
4. ``spec.launch(tracker, key)`` runs the job on Ray (Ray Train: ``tasks.train.fit_stage``; Ray
   Data: the eval actors) and returns the metrics and output tags it wants in the reference. The run is
   marked FAILED if it raises and FINISHED with the output tags if not.
5. The reference: ``{"stage", "run_id", "run_key", "model_uri", "checkpoint", "metrics", "reused"}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from foresight_core.config import PipelineConfig
from tasks.tracking import MlflowTracker, find_runs, stage_params, start_run, tracking_uri

MODEL_ARTIFACT = "model"

# fields of a stage's section that change its speed or its retries, not its result
NOT_IN_KEY = ("scaling.max_failures", "scaling.cpus_per_worker", "scaling.malloc_tuning", "num_actors")


@dataclass(frozen=True)
class StageInput:
    """A file the stage reads, by reference: its sha256 is part of the key."""

    name: str
    uri: str
    sha256: str
    context: str  # the MLflow dataset context: the stage that reads it
    n_rows: int | None = None


@dataclass
class Launched:
    """What a launched job hands back: metrics for the reference and output tags for the run."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class StageSpec:
    """One stage: what it is keyed on and how it is launched."""

    stage: str  # the config section and the MLflow stage tag: wm_amt, fe_sft, fc_rl, eval
    cfg: PipelineConfig
    entries: tuple[str, ...]  # the core modules it runs: their code version is part of the key
    inputs: Sequence[StageInput]
    launch: Callable[[MlflowTracker, str], Launched]  # (the stage's run, its key) -> metrics and output tags
    init_model_uri: str | None = None  # the starting model (None: the config's base model)
    reads: tuple[str, ...] = ("model", "envs", "seed")  # other config sections its result depends on
    produces_model: bool = True
    manifest_uri: str | None = None  # the corpus manifest the inputs came from (a tag)


def _drop(section: dict[str, Any], dotted: str) -> None:
    *path, last = dotted.split(".")
    for part in path:
        section = section.get(part) if isinstance(section, dict) else None
        if section is None:
            return
    if isinstance(section, dict):
        section.pop(last, None)


def stage_key(spec: StageSpec) -> str:
    """sha256 (16 hex digits) of everything the stage's result depends on (see the module docstring)."""
    from foresight_core.provenance import code_version

    dump = spec.cfg.model_dump(mode="json")
    section = dump[spec.stage]
    for dotted in NOT_IN_KEY:
        _drop(section, dotted)
    blob = {"stage": spec.stage, "cfg": section, **{name: dump[name] for name in spec.reads},
            "inputs": {i.name: i.sha256 for i in spec.inputs}, "init": spec.init_model_uri,
            "code": code_version(*spec.entries)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def reference(spec: StageSpec, run_id: str, key: str, tags: dict[str, str], metrics: dict[str, float],
              reused: bool) -> dict[str, Any]:
    return {"stage": spec.stage, "run_id": run_id, "run_key": key,
            "model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT}" if spec.produces_model else None,
            "checkpoint": tags.get("foresight.output.checkpoint"), "metrics": dict(metrics), "reused": reused}


def skipped(stage: str, init_model_uri: str | None) -> dict[str, Any]:
    """The reference of a stage whose config says ``enabled: false``: its input model passes through."""
    return {"stage": stage, "run_id": None, "run_key": None, "model_uri": init_model_uri, "checkpoint": None,
            "metrics": {}, "reused": False, "skipped": True}


def _find(spec: StageSpec, key: str, status: str) -> Any | None:
    runs = find_runs(spec.cfg, spec.stage, tags={"foresight.run_key": key}, status=status, max_results=1)
    return runs[0] if runs else None


def open_run(spec: StageSpec, key: str, parent_run_id: str | None) -> MlflowTracker:
    """An unfinished run (RUNNING / FAILED) with this key, continued; else a new run nested under the parent."""
    unfinished = _find(spec, key, "RUNNING") or _find(spec, key, "FAILED")
    if unfinished is not None:
        tracker = MlflowTracker(tracking_uri(spec.cfg), unfinished.info.run_id)
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        return tracker
    tags = {"foresight.run_key": key, "foresight.code_version": _code(spec),
            "foresight.input.init_model": spec.init_model_uri or f"base:{spec.cfg.model.source}",
            "foresight.input.corpus_manifest": spec.manifest_uri or ""}
    for i in spec.inputs:
        tags[f"foresight.input.{i.name}"] = i.uri
        tags[f"foresight.input.{i.name}.sha256"] = i.sha256
    if spec.init_model_uri and spec.init_model_uri.startswith("runs:/"):
        tags["foresight.input.init_run_id"] = spec.init_model_uri.split("/")[1]
    tracker = start_run(spec.cfg, f"{spec.stage}-{key[:8]}", spec.stage, parent_run_id, tags=tags)
    tracker.log_params(stage_params(spec.cfg, spec.stage, *spec.reads))
    for i in spec.inputs:
        tracker.log_dataset(i.uri, name=i.name, digest=i.sha256, context=i.context, n_rows=i.n_rows)
    return tracker


def _code(spec: StageSpec) -> str:
    from foresight_core.provenance import code_version

    return code_version(*spec.entries)


def run_stage(spec: StageSpec, parent_run_id: str | None = None) -> dict[str, Any]:
    """Reuse, resume or run one stage (see the module docstring) and return its reference."""
    key = stage_key(spec)
    done = _find(spec, key, "FINISHED")
    if done is not None:
        return reference(spec, done.info.run_id, key, done.data.tags, done.data.metrics, reused=True)
    tracker = open_run(spec, key, parent_run_id)
    try:
        out = spec.launch(tracker, key)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tags = dict(out.tags)
    if spec.produces_model:
        tags.setdefault("foresight.output.model_uri", f"runs:/{tracker.run_id}/{MODEL_ARTIFACT}")
    if tags:
        tracker.set_tags(tags)
    tracker.finish("FINISHED")
    return reference(spec, tracker.run_id, key, tags, out.metrics, reused=False)

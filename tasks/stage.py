"""The one stage protocol: key, reuse, resume, launch on Ray, record in MLflow, return references.

    spec = StageSpec(stage="fe_sft", cfg=cfg, entries=("foresight_core.sft",),
                     inputs=[StageInput("fe_sft", data_uri, sha, context="fe_sft")],
                     init_model_uri=wm_model_uri, launch=lambda run, key: fit_stage(...))
    ref = run_stage(spec, parent_run_id=pipeline_run_id)
    ref["model_uri"], ref["metrics"], ref["reused"]

A stage is a spec plus its core function. ``run_stage`` owns what every stage does the same way:
1. The key: the stage's config section (less what only changes speed or retries or only measures, ``NOT_IN_KEY``), the
   sections it also reads (model, envs, seed), the inputs' sha256, the starting model and the code
   version of the core modules it runs (``foresight_core.provenance``). Same key, same result.
2. A FINISHED MLflow run with that key is the result: nothing runs, the reference says ``reused``.
3. Else a RUNNING or FAILED run with that key (the process died, or Ray gave up) is continued, so a
   stage started again resumes from its last checkpoint; else a new run nested under the parent gets the
   input tags, the stage's params and its datasets. A run being worked on holds a lease (the
   ``foresight.lease`` tag, renewed while the job runs): another caller with the same key waits for it
   to finish (and reuses it) or to lapse (and resumes it). Two callers that create a run for one key at
   the same moment both see both runs; the older run goes on and the other is deleted.
4. ``spec.launch(tracker, key)`` runs the job on Ray (Ray Train: ``tasks.train.fit_stage``; Ray
   Data: the eval actors) and returns the metrics and output tags it wants in the reference. The run is
   marked FAILED if it raises and FINISHED with the output tags if not.
5. The reference: ``{"stage", "run_id", "run_key", "model_uri", "checkpoint", "metrics", "reused"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from foresight_core.config import PipelineConfig
from tasks.tracking import MlflowTracker, TrackingError, find_runs, stage_params, start_run, tracking_uri

MODEL_ARTIFACT = "model"

# fields of a stage's section that change its speed or its retries, not its result; and the format check after
# WM-AMT / FE-SFT, which measures the saved model without changing it: a run reused by a caller that asks for
# another check reports the check that run made (``tasks.train.check_mismatch`` says so)
NOT_IN_KEY = ("scaling.max_failures", "scaling.cpus_per_worker", "scaling.malloc_tuning", "num_actors",
              "format_check_tasks", "format_check_temperature", "format_check_max_new_tokens", "format_check_max_turns")


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
            "checkpoint": tags.get("foresight.output.checkpoint") or None, "metrics": dict(metrics), "reused": reused}


def skipped(stage: str, init_model_uri: str | None) -> dict[str, Any]:
    """The reference of a stage whose config says ``enabled: false``: its input model passes through."""
    return {"stage": stage, "run_id": None, "run_key": None, "model_uri": init_model_uri, "checkpoint": None,
            "metrics": {}, "reused": False, "skipped": True}


def _find(spec: StageSpec, key: str, status: str) -> Any | None:
    runs = find_runs(spec.cfg, spec.stage, tags={"foresight.run_key": key}, status=status, max_results=1)
    return runs[0] if runs else None


LEASE_TAG = "foresight.lease"
log = logging.getLogger(__name__)


def lease_value(owner: str, until: float) -> str:
    return json.dumps({"owner": owner, "until": round(until, 1)})


def lease_holder(tags: dict[str, str], now: float) -> str | None:
    """The owner of a live lease in a run's tags (None: no lease, or it has lapsed)."""
    try:
        lease = json.loads(tags.get(LEASE_TAG) or "{}")
    except ValueError:
        return None
    return str(lease["owner"]) if lease.get("owner") and float(lease.get("until", 0)) > now else None


class Lease:
    """Holds ``foresight.lease`` on one run: taken at once, renewed every third of its length in a thread."""

    def __init__(self, tracker: MlflowTracker, owner: str, seconds: float) -> None:
        self.tracker, self.owner, self.seconds = tracker, owner, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{tracker.run_id[:8]}", daemon=True)

    def _write(self) -> None:
        self.tracker.set_tags({LEASE_TAG: lease_value(self.owner, time.time() + self.seconds)})

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 -- a tracking server away for a moment: try again next tick
                log.warning("could not renew the lease on run %s: %s", self.tracker.run_id, e)

    def __enter__(self) -> "Lease":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.tracker.set_tags({LEASE_TAG: lease_value(self.owner, 0)})
        except Exception as e:  # noqa: BLE001 -- the lease lapses by itself
            log.warning("could not release the lease on run %s: %s", self.tracker.run_id, e)


def _wait_for_holder(spec: StageSpec, key: str, owner: str) -> Any | None:
    """While another caller holds a live lease on this key's RUNNING run, wait. Returns the FINISHED run if
    the holder finished it, else None (no holder, or its lease lapsed: the caller may take the run)."""
    announced = False
    while True:
        done = _find(spec, key, "FINISHED")
        if done is not None:
            return done
        winner = _winner(spec, key)
        if winner is None or winner[1] == owner:
            return None
        if not announced:
            log.warning("stage %s (key %s) is being run by another caller (run %s): waiting for it to finish",
                        spec.stage, key[:12], winner[0])
            announced = True
        time.sleep(min(10.0, spec.cfg.infra.tracking.stage_lease_s / 3))


def open_run(spec: StageSpec, key: str, parent_run_id: str | None, owner: str = "") -> MlflowTracker:
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
    tags[LEASE_TAG] = lease_value(owner, time.time() + spec.cfg.infra.tracking.stage_lease_s)
    tracker = start_run(spec.cfg, f"{spec.stage}-{key[:8]}", spec.stage, parent_run_id, tags=tags)
    tracker.log_params(stage_params(spec.cfg, spec.stage, *spec.reads))
    for i in spec.inputs:
        tracker.log_dataset(i.uri, name=i.name, digest=i.sha256, context=i.context, n_rows=i.n_rows)
    return tracker


def _code(spec: StageSpec) -> str:
    from foresight_core.provenance import code_version

    return code_version(*spec.entries)


SETTLE_S = 1.0
"""How long a claimant waits between writing its lease and reading who holds the stage."""


def _winner(spec: StageSpec, key: str) -> tuple[str, str] | None:
    """(run id, owner) of the oldest RUNNING run of this key with a live lease: the one that goes on."""
    now = time.time()
    runs = find_runs(spec.cfg, spec.stage, tags={"foresight.run_key": key}, status="RUNNING", max_results=50)
    live = [(r.info.start_time, r.info.run_id, lease_holder(r.data.tags, now)) for r in runs]
    live = [x for x in live if x[2] is not None]
    return (min(live)[1], str(min(live)[2])) if live else None


def claim(spec: StageSpec, key: str, parent_run_id: str | None, owner: str) -> MlflowTracker | Any:
    """The run this caller may work on (its lease written), or the FINISHED run another caller made."""
    while True:
        done = _wait_for_holder(spec, key, owner)
        if done is not None:
            return done
        existing = _find(spec, key, "RUNNING") or _find(spec, key, "FAILED")
        tracker = open_run(spec, key, parent_run_id, owner)
        tracker.set_tags({LEASE_TAG: lease_value(owner, time.time() + spec.cfg.infra.tracking.stage_lease_s)})
        time.sleep(SETTLE_S)  # a claimant that wrote at the same moment is visible now
        if _winner(spec, key) == (tracker.run_id, owner):
            return tracker
        if existing is None:  # we created this run a moment after the winner's: give way
            tracker.client.delete_run(tracker.run_id)


def run_stage(spec: StageSpec, parent_run_id: str | None = None) -> dict[str, Any]:
    """Reuse, resume or run one stage (see the module docstring) and return its reference."""
    key = stage_key(spec)
    owner = uuid.uuid4().hex
    claimed = claim(spec, key, parent_run_id, owner)
    if not isinstance(claimed, MlflowTracker):  # finished: by an earlier run, or by the caller we waited for
        return reference(spec, claimed.info.run_id, key, claimed.data.tags, claimed.data.metrics, reused=True)
    tracker = claimed
    with Lease(tracker, owner, spec.cfg.infra.tracking.stage_lease_s):
        try:
            out = spec.launch(tracker, key)
        except BaseException as failure:
            try:
                tracker.finish("FAILED")
            except Exception as e:  # noqa: BLE001 -- the tracking server is gone too: say that, and which one
                raise TrackingError(f"stage {spec.stage} failed, and the MLflow server {tracker.tracking_uri} does not "
                                    f"answer (after infra.tracking.http_retries={spec.cfg.infra.tracking.http_retries} "
                                    f"retries): {type(e).__name__}: {str(e)[:300]}") from failure
            raise
        tags = dict(out.tags)
        if spec.produces_model:
            tags.setdefault("foresight.output.model_uri", f"runs:/{tracker.run_id}/{MODEL_ARTIFACT}")
        if tags:
            tracker.set_tags(tags)
    tracker.finish("FINISHED")
    return reference(spec, tracker.run_id, key, tags, out.metrics, reused=False)

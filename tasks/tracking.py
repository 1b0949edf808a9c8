"""MLflow behind ``foresight_core.tracking.Tracker``: runs, nested stage runs, params, datasets.

    from tasks.tracking import mlflow_run, stage_params
    with mlflow_run(cfg, "corpus", stage="corpus", parent_run_id=parent.run_id) as run:
        run.log_params(stage_params(cfg, "seed", "corpus", "envs"))   # dotted keys, secrets masked
        run.log_metrics({"corpus.success_rate": 0.6})
        run.log_dataset("/work/corpus/abc/wm_amt.jsonl", name="wm_amt", digest="9f2c...", context="wm_amt")
    run.run_id            # the reference the next stage receives

A run is named by ``(tracking_uri, run_id)`` only, and every call goes through an explicit
``MlflowClient``: no fluent "active run" that lives in one thread, so a Prefect task thread, a
Ray Train rank-0 worker or a test can all log to the same run (``MlflowTracker`` pickles).

Where runs land: ``infra.tracking.tracking_uri`` (``MLFLOW_TRACKING_URI``), else a sqlite file
``<work_dir>/mlflow.db`` with artifacts in ``<work_dir>/mlartifacts`` -- read them with
``mlflow ui --backend-store-uri sqlite:///<work_dir>/mlflow.db``.

Credentials are never logged: configs are dumped in JSON mode (``SecretStr`` -> ``**********``),
fields named like a credential are masked whatever their type, and ``user:password@`` in any
URI is masked in every param, tag and config artifact.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from foresight_core.config import PipelineConfig, dump_config
from foresight_core.storage import WorkDir

MASK = "**********"
_SECRET_NAMES = re.compile(r"^(key|secret|password|passwd|token|api_key|access_key|secret_key|"
                           r"aws_access_key_id|aws_secret_access_key|credentials?)$", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]+):[^@/\s]+@")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_BATCH = 100  # MLflow's limit on params / tags / metrics per log_batch call


log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """Tracking cannot be set up as configured; the message says which setting to change."""


# ---------------------------------------------------------------------------------------------
# Masking and flattening


def mask_text(text: str) -> str:
    """``postgresql://user:pw@db/x`` -> ``postgresql://user:**********@db/x`` (any scheme)."""
    return _URI_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings -> ``{"a.b.c": "value"}``; lists as JSON; credential-named fields masked."""
    out: dict[str, str] = {}
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")  # SecretStr -> "**********"
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if _SECRET_NAMES.search(str(k)) and v is not None:
                out[key] = MASK
            elif isinstance(v, (dict, BaseModel)):
                out.update(flatten(v, key))
            else:
                out[key] = _param_value(v)
        return out
    return {prefix or "value": _param_value(obj)}


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    text = mask_text(text)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def stage_params(cfg: PipelineConfig, *sections: str) -> dict[str, str]:
    """Params of a stage run: the named top-level sections of the resolved config, flattened."""
    data = cfg.model_dump(mode="json")
    return flatten({s: data[s] for s in sections})


def config_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML with every credential masked (the ``config.yaml`` artifact)."""
    return mask_text(dump_config(cfg))


# ---------------------------------------------------------------------------------------------
# Where runs land


def tracking_uri(cfg: PipelineConfig) -> str:
    """The configured MLflow URI, else ``sqlite:///<abs work_dir>/mlflow.db`` (created if missing)."""
    if cfg.infra.tracking.tracking_uri:
        return cfg.infra.tracking.tracking_uri
    work = WorkDir(cfg.work_dir)
    if not work.is_local:
        raise TrackingError(f"work_dir {cfg.work_dir} is remote, so MLflow cannot keep its sqlite file there: "
                            "set infra.tracking.tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server")
    work.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{work.mlflow_db}"


def _artifact_location(cfg: PipelineConfig, uri: str) -> str | None:
    """Local artifacts beside a local sqlite/file store; a server decides its own (None)."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        if WorkDir(cfg.work_dir).is_local:
            return WorkDir(cfg.work_dir).mlartifacts.as_uri()
    return None


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def download_artifacts(uri: str, tracking: str, dst: str) -> str:
    """A ``runs:/``, ``models:/`` or ``mlflow-artifacts:`` URI downloaded into ``dst`` through the store at
    ``tracking``. A ``models:/<name>@alias`` or ``/<version>`` is resolved through that store's registry, so no
    process-global tracking URI is read or set."""
    import mlflow.artifacts

    if uri.startswith("models:/"):
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        client = _client(tracking)
        name, version = get_model_name_and_version(client, uri)
        uri = client.get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking)


def mlflow_client(cfg: PipelineConfig) -> Any:
    """An MLflow client on the configured tracking URI (the registry's too)."""
    return _client(tracking_uri(cfg))


def experiment_id(cfg: PipelineConfig, uri: str | None = None) -> str:
    """Id of ``infra.tracking.experiment``, created on first use."""
    uri = uri or tracking_uri(cfg)
    client = _client(uri)
    name = cfg.infra.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(cfg, uri))
    except Exception:  # another process created it between the two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# The tracker


class MlflowTracker:
    """One MLflow run, by URI and id; implements ``foresight_core.tracking.Tracker`` and more."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    # -- the Tracker protocol

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _BATCH])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table artifact (``.json``); nested values become JSON text."""
        columns: dict[str, list[Any]] = {}
        for r in rows:
            for k in r:
                columns.setdefault(k, [])
        for r in rows:
            for k, col in columns.items():
                v = r.get(k)
                col.append(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, mask_text(str(v))) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    # -- beyond the protocol (orchestration and training stages)

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        """A whole folder (a Hugging Face model saved with ``save_pretrained``, say)."""
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_dataset(self, uri: str, name: str, digest: str, context: str,
                    n_rows: int | None = None) -> None:
        """A dataset file as an MLflow dataset input, by reference (the rows stay where they are)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": local paths match twice
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        entity = MetaDataset(source=source, name=name, digest=digest[:36])._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context)]
        if n_rows is not None:
            tags.append(InputTag("foresight.rows", str(n_rows)))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=entity, tags=tags)])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def start_run(cfg: PipelineConfig, run_name: str, stage: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> MlflowTracker:
    """Create a run (nested under ``parent_run_id`` when given) tagged with the config and stage."""
    uri = tracking_uri(cfg)
    all_tags = {"foresight.config": cfg.name, "foresight.stage": stage, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = _client(uri).create_run(experiment_id(cfg, uri), run_name=run_name,
                                  tags={k: mask_text(str(v)) for k, v in all_tags.items()})
    return MlflowTracker(uri, run.info.run_id)


@contextmanager
def mlflow_run(cfg: PipelineConfig, run_name: str, stage: str, parent_run_id: str | None = None,
               tags: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
    """``start_run`` that ends FINISHED, or FAILED (re-raising) when the block raises."""
    tracker = start_run(cfg, run_name, stage, parent_run_id, tags)
    try:
        yield tracker
    except BaseException:
        try:
            tracker.finish("FAILED")
        except Exception as e:  # noqa: BLE001 -- the server is gone: keep the block's error, which says more
            log.warning("could not mark MLflow run %s FAILED at %s: %s", tracker.run_id, tracker.tracking_uri, e)
        raise
    tracker.finish("FINISHED")


def find_runs(cfg: PipelineConfig, stage: str, tags: dict[str, str] | None = None,
              status: str = "FINISHED", max_results: int = 10) -> list[Any]:
    """Runs of a stage whose tags match, newest first (how a stage finds its input by reference)."""
    uri = tracking_uri(cfg)
    filters = [f"tags.`foresight.stage` = '{stage}'", f"attributes.status = '{status}'"]
    filters += [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    return list(_client(uri).search_runs([experiment_id(cfg, uri)], filter_string=" and ".join(filters),
                                         order_by=["attributes.start_time DESC"], max_results=max_results))


def run_metrics(cfg: PipelineConfig, run_id: str) -> dict[str, float]:
    """The latest value of every metric of one run."""
    return dict(_client(tracking_uri(cfg)).get_run(run_id).data.metrics)


def artifact_json(client: Any, run_id: str, path: str) -> Any | None:
    """A JSON artifact of a run, parsed (None: the run has no such artifact)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 -- the artifact is missing: say so through None
            return None
        return json.loads(Path(local).read_text())


def run_json(cfg: PipelineConfig, run_id: str, path: str, optional: bool = False) -> Any:
    """A JSON artifact of a run; a missing one is an error naming the run and the file (``optional``: None)."""
    data = artifact_json(_client(tracking_uri(cfg)), run_id, path)
    if data is None and not optional:
        raise FileNotFoundError(f"run {run_id} has no artifact {path}")
    return data

"""WM-AMT, FE-SFT and relabel as Ray Train jobs recorded in MLflow: the adapter around ``foresight_core.sft``
(and ``foresight_core.relabel``, whose rank 0 labels before the same training loop: ``run_relabel_stage``).

    from tasks.train import run_sft_stage
    wm = run_sft_stage("wm_amt", cfg, corpus_uri, parent_run_id=pipeline_run.run_id)
    fe = run_sft_stage("fe_sft", cfg, corpus_uri, init_model_uri=wm["model_uri"], parent_run_id=...)
    fe["model_uri"]     # "runs:/<run id>/model": the next stage's input, by reference

What one call does:
1. Resolves its inputs: the stage's dataset in the corpus folder (by its ``manifest.json``, never
   a guessed name) and the starting model (an MLflow ``runs:/`` URI, or an HF folder; None: the
   config's base model).
2. Hands the stage to ``tasks.stage.run_stage`` (key, reuse of a FINISHED run, resume of an
   unfinished one, the MLflow run and its input tags): a spec of the dataset, the starting model and
   ``ENTRIES``, the core module whose code version is part of the key.
3. Runs ``foresight_core.sft.run_sft`` in every worker of a ``TorchTrainer``: ``ScalingConfig``
   from ``<stage>.scaling`` (DDP over gloo on CPU, NCCL on GPUs); ``RunConfig`` named after the
   stage key, storing checkpoints under ``<work_dir>/ray`` (local path or ``s3://``, through
   fsspec); ``FailureConfig(max_failures)``; ``CheckpointConfig(num_to_keep=keep_checkpoints)``.
   Every checkpoint the loop writes is reported with ``ray.train.report``; a worker that starts
   again (a Ray retry, or the same stage started again with the same storage) gets the latest one
   from ``ray.train.get_checkpoint()`` and resumes through the loop's one code path.
4. Rank 0 logs per-step metrics (loss, lr, tokens/s, grad norm, eval losses) to the MLflow run
   from inside the loop (an explicit ``MlflowClient``, no Tune callback) and, at the end, the
   final model in Hugging Face format as the run's ``model`` artifact. With
   ``<stage>.format_check_tasks`` > 0 it then plays that many of the corpus's held-out tasks with the
   saved model (``foresight_core.capability``; the task files reach it as URIs) and logs ``check/*``
   (format adherence, grounding, ECE, Brier) at the final step; they are in the reference's ``metrics``.
5. Output tags: the Ray checkpoint and run folder (the runner adds the model URI). Once the model is in
   MLflow the run folder is deleted, unless ``infra.ray.keep_finished_checkpoints``.

Workers get ``GLIBC_TUNABLES`` (no mmap, no trim) when ``scaling.malloc_tuning`` is on: glibc then
keeps freed activation memory instead of returning it to the OS every step (~1.5x bf16 throughput
measured on a 2-core CPU; see ``benchmarks/sft_throughput.py``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from foresight_core.config import PipelineConfig
from foresight_core.storage import (WorkDir, is_local_uri, join_uri, load_manifest, local_path, manifest_problem,
                                    sha256_file)
from foresight_core.tracking import Progress
from tasks.progress import watch_stage
from tasks.runtime import init_ray, mlflow_client_env, node_tags, setup_env, worker_threads
from tasks.stage import MODEL_ARTIFACT, Launched, StageInput, StageSpec, run_stage, skipped
from tasks.tracking import MlflowTracker, download_artifacts, tracking_uri

log = logging.getLogger(__name__)

SFT_STAGES = ("wm_amt", "fe_sft")
ENTRIES = ("foresight_core.sft",)  # the science the supervised stages run: its code version is in their keys
RELABEL_ENTRIES = ("foresight_core.relabel", "foresight_core.sft")
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"


class StageInputError(ValueError):
    """A stage input that cannot be used (no such dataset in the corpus, an unreadable model URI)."""


# ---------------------------------------------------------------------------------------------
# Inputs

def resolve_dataset(stage: str, corpus_uri: str, cfg: PipelineConfig) -> tuple[str, str, str | None]:
    """``(dataset uri, sha256, manifest uri or None)``: a corpus folder is read through its manifest;
    a ``.jsonl`` / ``.parquet`` file is used as it is."""
    storage = cfg.infra.storage
    if corpus_uri.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        return corpus_uri, sha256_file(corpus_uri, storage), None
    problem = manifest_problem(corpus_uri, storage)
    if problem is not None:
        raise StageInputError(f"{corpus_uri}: not a usable corpus folder: {problem}; build the corpus again")
    manifest = load_manifest(corpus_uri, storage)
    entry = manifest.get("datasets", {}).get(stage)
    if entry is None:
        raise StageInputError(f"{corpus_uri}: the corpus has no {stage!r} dataset; it has "
                              f"{sorted(manifest.get('datasets', {}))}")
    name = entry["file"]
    return join_uri(corpus_uri, name), manifest["files"][name]["sha256"], join_uri(corpus_uri, "manifest.json")


def local_model_dir(model_uri: str, tracking: str, dst: str | os.PathLike) -> str:
    """An HF model folder on this machine: ``runs:/`` / ``models:/`` / ``mlflow-artifacts:`` URIs
    are downloaded from MLflow into ``dst``; local paths are used as they are; ``s3://`` is copied."""
    if model_uri.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        return download_artifacts(model_uri, tracking, str(dst))
    if is_local_uri(model_uri):
        path = local_path(model_uri)
        if not (path / "config.json").exists():
            raise StageInputError(f"{model_uri}: not a Hugging Face model folder (no config.json)")
        return str(path)
    import fsspec

    fs, path = fsspec.core.url_to_fs(model_uri)
    fs.get(path.rstrip("/") + "/", str(dst), recursive=True)
    return str(dst)


def ray_storage(cfg: PipelineConfig) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` of ``<work_dir>/ray``: a local folder, or the object store
    through fsspec (s3fs with ``infra.storage``'s endpoint and credentials) wrapped for pyarrow."""
    uri = WorkDir(cfg.work_dir).ray
    if is_local_uri(uri):
        path = local_path(uri)
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from foresight_core.storage import filesystem

    fs, path = filesystem(uri, cfg.infra.storage)
    return path, PyFileSystem(FSSpecHandler(fs))


# ---------------------------------------------------------------------------------------------
# The worker: one per Ray Train rank

def _sft_worker(config: dict[str, Any]) -> None:
    """Runs in each TorchTrainer worker (the process group is already set up by Ray)."""
    import ray.train
    import torch

    from foresight_core.relabel import run_relabel
    from foresight_core.sft import run_sft

    cfg: PipelineConfig = config["cfg"]
    stage: str = config["stage"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["threads"])  # resolved by fit_stage from the Ray nodes' CPUs
    tracker = MlflowTracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if tracker is not None:  # what the throughput depends on, as the worker really saw it
        tracker.set_tags({"foresight.worker.glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                          "foresight.worker.torch_threads": str(torch.get_num_threads()),
                          "foresight.worker.world_size": str(ctx.get_world_size()), **node_tags()})
    work = Path(tempfile.mkdtemp(prefix=f"foresight-{stage}-rank{rank}-"))
    try:
        init_model = None
        if config["init_model_uri"]:
            Progress.of(tracker).phase("downloading the starting model")
            init_model = local_model_dir(config["init_model_uri"], config["tracking_uri"], work / "init")

        def report(path: Path | None, metrics: dict[str, float]) -> None:
            ckpt = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{int(metrics['step']):06d}")

        def run(resume_from: str | None):
            if stage == "relabel":  # rank 0 labels with the starting model first (once), then as below
                return run_relabel(cfg, config["data_uri"], config["labels_uri"], work / "out", init_model=init_model,
                                   tracker=tracker, on_checkpoint=report, resume_from=resume_from, verbose=rank == 0)
            return run_sft(cfg, stage, config["data_uri"], work / "out", init_model=init_model, tracker=tracker,
                           on_checkpoint=report, resume_from=resume_from, verbose=rank == 0,
                           check_task_uris=config.get("check_task_uris", ()))

        checkpoint = ray.train.get_checkpoint()
        t0 = time.perf_counter()
        if checkpoint is None:
            result = run(None)
        else:
            with checkpoint.as_directory() as ckpt_dir:
                result = run(ckpt_dir)
        compute_s = time.perf_counter() - t0  # the stage function alone: data, training, evals, the check
        if rank == 0:
            Progress.of(tracker).phase("logging the model to MLflow")
            tracker.log_artifacts(str(result.model_dir), MODEL_ARTIFACT)
            tracker.log_metrics({"train_tokens_per_s": result.tokens_per_s, "compute_s": compute_s},
                                step=result.step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The stage

def fit_stage(worker: Any, loop_config: dict[str, Any], cfg: PipelineConfig, stage: str, key: str, scaling: Any,
              keep_checkpoints: int, tracker: MlflowTracker) -> tuple[Any, dict[str, str]]:
    """Run ``worker`` on every rank of a ``TorchTrainer`` (the training stages' one launch path).

    Scaling, storage (local or s3), retries and checkpoints come from config. Returns the Ray result and
    the run's output tags (the last checkpoint, the Ray run folder); ``run_stage`` finishes the run.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray(cfg.infra.ray, mlflow_client_env(cfg))
    cpus, threads = worker_threads(cfg, scaling.num_workers, scaling.cpus_per_worker)
    loop_config = {**loop_config, "threads": threads}
    env_vars = {"OMP_NUM_THREADS": str(threads)}
    if scaling.malloc_tuning:
        env_vars["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    storage_path, storage_fs = ray_storage(cfg)
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-{stage}-{key}", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": env_vars}),
    )
    with watch_stage(stage, tracker):  # the workers print nowhere: progress comes from the run rank 0 logs to
        result = trainer.fit()
    checkpoint_path = result.checkpoint.path if result.checkpoint is not None else ""
    scheme = cfg.work_dir.split("://")[0] + "://" if storage_fs is not None else ""
    if scheme and checkpoint_path:
        checkpoint_path = join_uri(scheme, checkpoint_path)
    run_folder = join_uri(scheme, result.path) if scheme else result.path
    if result.error is None and not cfg.infra.ray.keep_finished_checkpoints:
        # rank 0 logged the model to MLflow before its loop returned: the checkpoints have served their purpose
        delete_run_folder(run_folder, cfg)
        return result, {"foresight.output.checkpoint": "", "foresight.ray_run": run_folder,
                        "foresight.output.checkpoints_deleted": "true"}
    return result, {"foresight.output.checkpoint": checkpoint_path, "foresight.ray_run": run_folder}


def delete_run_folder(uri: str, cfg: PipelineConfig) -> None:
    """Remove a finished stage's Ray run folder (local or object store); a failure to delete is logged, not
    raised: the stage's result is already safe in MLflow."""
    from foresight_core.storage import filesystem

    try:
        fs, path = filesystem(uri, cfg.infra.storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # noqa: BLE001 - disk space is a nicety here, never a reason to fail the stage
        log.warning("could not delete the finished stage's checkpoints at %s: %s", uri, e)


def final_metrics(result: Any, tracker: MlflowTracker, logged_prefix: str | None = None) -> dict[str, float]:
    """The metrics of the last report to Ray, plus those rank 0 logged to the run outside its reports (the
    format check's ``check/``, the labels' ``relabel/``), read back from the run by ``logged_prefix``."""
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    if logged_prefix:
        logged = tracker.client.get_run(tracker.run_id).data.metrics
        metrics.update({k: float(v) for k, v in logged.items() if k.startswith(logged_prefix)})
    return metrics


def run_sft_stage(stage: str, cfg: PipelineConfig, corpus_uri: str, init_model_uri: str | None = None,
                  parent_run_id: str | None = None) -> dict[str, Any]:
    """Run (or reuse, or resume) one supervised stage; returns its reference (``tasks.stage``):
    ``{"stage", "run_id", "run_key", "model_uri", "checkpoint", "metrics", "reused"}``."""
    if stage not in SFT_STAGES:
        raise ValueError(f"stage must be one of {SFT_STAGES}, got {stage!r}")
    stage_cfg = getattr(cfg, stage)
    if not stage_cfg.enabled:
        return skipped(stage, init_model_uri)
    setup_env(cfg)
    data_uri, data_sha, manifest_uri = resolve_dataset(stage, corpus_uri, cfg)

    def launch(tracker: MlflowTracker, key: str) -> Launched:
        # the held-out tasks of the format-capability check, by reference (file URIs)
        check_uris: list[str] = []
        if stage_cfg.format_check_tasks:
            from foresight_core.capability import held_out_task_uris

            check_uris = held_out_task_uris(corpus_uri, cfg.infra.storage)
            if not check_uris:
                log.warning("%s: %s has no eval/* task sets; the format check is skipped", stage, corpus_uri)
        result, tags = fit_stage(_sft_worker, {"cfg": cfg, "stage": stage, "data_uri": data_uri,
                                               "init_model_uri": init_model_uri, "tracking_uri": tracking_uri(cfg),
                                               "run_id": tracker.run_id, "check_task_uris": check_uris},
                                 cfg, stage, key, stage_cfg.scaling, stage_cfg.keep_checkpoints, tracker)
        return Launched(final_metrics(result, tracker, "check/" if check_uris else None), tags)

    ref = run_stage(StageSpec(stage=stage, cfg=cfg, entries=ENTRIES, launch=launch, init_model_uri=init_model_uri,
                              inputs=[StageInput(stage, data_uri, data_sha, context=stage)],
                              manifest_uri=manifest_uri), parent_run_id)
    mismatch = check_mismatch(stage, stage_cfg.format_check_tasks, ref) if ref["reused"] else None
    if mismatch:
        log.warning(mismatch)
    return ref


def check_mismatch(stage: str, wanted_tasks: int, ref: dict[str, Any]) -> str | None:
    """What a reused supervised stage's format check lacks against the one asked for (None: nothing). The check
    is not part of the stage's key (it measures the saved model, it does not change it), so the finished run
    is reused as it is, with the check it made."""
    made = int(ref["metrics"].get("check/n_tasks", 0))
    if wanted_tasks and not made:
        return (f"{stage}: reused run {ref['run_id']} (same key: the format check is not part of it) made no format "
                f"check, so none is reported; `foresight eval` on its model {ref['model_uri']} measures the format")
    if wanted_tasks and made != wanted_tasks:
        return (f"{stage}: reused run {ref['run_id']} made its format check on {made} tasks, not the "
                f"{stage}.format_check_tasks={wanted_tasks} asked for: its check is reported")
    return None


def run_relabel_stage(cfg: PipelineConfig, corpus_uri: str, init_model_uri: str | None,
                      parent_run_id: str | None = None) -> dict[str, Any]:
    """Run (or reuse, or resume) the relabel stage (``foresight_core.relabel``) on the corpus's FE-SFT set from
    FE-SFT's model; returns its reference (``tasks.stage``). The self-labelled rows are written under
    ``<work_dir>/relabel/<key>/``, named by the run's tag ``foresight.output.labels``."""
    if not init_model_uri:
        raise StageInputError("relabel: no FE-SFT model to relabel with (put fe_sft before relabel in stages)")
    setup_env(cfg)
    data_uri, data_sha, manifest_uri = resolve_dataset("fe_sft", corpus_uri, cfg)

    def launch(tracker: MlflowTracker, key: str) -> Launched:
        labels_uri = join_uri(WorkDir(cfg.work_dir).relabel(key), "self_labelled.jsonl")
        result, tags = fit_stage(_sft_worker, {"cfg": cfg, "stage": "relabel", "data_uri": data_uri,
                                               "labels_uri": labels_uri, "init_model_uri": init_model_uri,
                                               "tracking_uri": tracking_uri(cfg), "run_id": tracker.run_id},
                                 cfg, "relabel", key, cfg.relabel.scaling, cfg.relabel.keep_checkpoints, tracker)
        return Launched(final_metrics(result, tracker, "relabel/"), {**tags, "foresight.output.labels": labels_uri})

    return run_stage(StageSpec(stage="relabel", cfg=cfg, entries=RELABEL_ENTRIES, launch=launch,
                               init_model_uri=init_model_uri,
                               inputs=[StageInput("fe_sft", data_uri, data_sha, context="relabel")],
                               manifest_uri=manifest_uri), parent_run_id)

"""FC-RL as a Ray Train job recorded in MLflow: the adapter around ``foresight_core.fc_rl``.

    from tasks.rl import run_fc_rl_stage
    rl = run_fc_rl_stage(cfg, init_model_uri=fe["model_uri"], task_set_uri=corpus_uri, parent_run_id=...)
    rl["model_uri"]     # "runs:/<run id>/model"; rl["metrics"] holds the held-out evaluation before / after

What one call does (the same shape as ``tasks.train.run_sft_stage``):
1. Resolves its inputs: the RL task set (``rl_tasks``) and the held-out ``eval/*`` task sets of the
   corpus folder, by its manifest; the starting model (the FE-SFT run's ``runs:/`` URI or an HF folder;
   None: the config's base model).
2. Hands the stage to ``tasks.stage.run_stage`` (key, reuse, resume, the MLflow run): a spec
   of the task set, the starting model and ``ENTRIES`` (the core modules it runs).
3. Runs ``foresight_core.fc_rl.run_fc_rl`` in every worker of a ``TorchTrainer`` (DDP over gloo on
   CPU, NCCL on GPUs). Each checkpoint the loop writes is reported with ``ray.train.report``; a worker
   that starts again (a Ray retry, or the same stage started again) gets the latest from
   ``ray.train.get_checkpoint()`` and resumes. With ``fc_rl.engine: vllm`` every worker runs a
   colocated vLLM engine on its GPU that gets the new weights after each step (``vllm_engine.sync_weights``).
4. Rank 0 logs per-step metrics, sample-rollout tables and the held-out evaluation to the MLflow run,
   and at the end the model in Hugging Face format as the run's ``model`` artifact.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from foresight_core.config import PipelineConfig
from foresight_core.capability import held_out_task_uris, read_tasks
from foresight_core.fc_rl import eval_subset
from foresight_core.tracking import Progress
from tasks.runtime import node_tags, setup_env
from tasks.stage import MODEL_ARTIFACT, Launched, StageInput, StageSpec, run_stage, skipped
from tasks.tracking import MlflowTracker, tracking_uri
from tasks.train import StageInputError, fit_stage, local_model_dir, resolve_dataset

STAGE = "fc_rl"
# the science FC-RL runs (the loop, the environments, the model loader, the GPU engine): its code version is in the key
ENTRIES = ("foresight_core.fc_rl", "foresight_core.envs", "foresight_core.models", "foresight_core.vllm_engine")


def load_tasks(uri: str, cfg: PipelineConfig) -> list[Any]:
    """The tasks of one file (``capability.read_tasks``); a bad row is a ``StageInputError`` naming it."""
    try:
        return read_tasks(uri, cfg.infra.storage)
    except ValueError as e:
        raise StageInputError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# The worker: one per Ray Train rank

def _rl_worker(config: dict[str, Any]) -> None:
    """Runs in each TorchTrainer worker (the process group is already set up by Ray): ``fc_rl.run_fc_rl``."""
    import ray.train
    import ray.train.torch
    import torch

    from foresight_core.fc_rl import run_fc_rl

    cfg: PipelineConfig = config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(config["threads"])  # resolved by fit_stage from the Ray nodes' CPUs
    tracker = MlflowTracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if tracker is not None:  # what the speed depends on, as the worker really saw it
        tracker.set_tags({"foresight.worker.torch_threads": str(torch.get_num_threads()),
                          "foresight.worker.world_size": str(ray.train.get_context().get_world_size()),
                          **node_tags()})
    work = Path(tempfile.mkdtemp(prefix=f"foresight-fc_rl-rank{rank}-"))
    try:
        progress = Progress.of(tracker)  # rank 0 only (the others have no tracker)
        init_model = None
        if config["init_model_uri"]:
            progress.phase("downloading the starting model")
            init_model = local_model_dir(config["init_model_uri"], config["tracking_uri"], work / "init")

        def report(path: Path, step: int, metrics: dict[str, float]) -> None:
            ckpt = ray.train.Checkpoint.from_directory(str(path)) if rank == 0 else None
            ray.train.report({"step": step, **metrics}, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:06d}")

        def run(resume_from: str | None) -> Any:
            return run_fc_rl(cfg, config["train_tasks"], work / "out", eval_tasks=config["eval_tasks"],
                             init_model=init_model, tracker=tracker, on_checkpoint=report, resume_from=resume_from,
                             device=ray.train.torch.get_device())

        checkpoint = ray.train.get_checkpoint()
        t0 = time.perf_counter()  # the stage's own work from here: loading, rollouts, updates, held-out evals
        if checkpoint is None:
            out = run(None)
        else:
            with checkpoint.as_directory() as ckpt_dir:
                out = run(ckpt_dir)
        compute_s = time.perf_counter() - t0
        if rank == 0:
            result = out.result
            tracker.log_metrics({"compute_s": compute_s}, step=result.steps)
            progress.phase("logging the model to MLflow")
            tracker.log_artifacts(str(out.model_dir), MODEL_ARTIFACT)
            tracker.log_metrics({f"eval_before/{k}": v for k, v in result.eval_before.items()}, step=0)
            tracker.log_metrics({f"eval_after/{k}": v for k, v in result.eval_after.items()}, step=result.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The stage

def run_fc_rl_stage(cfg: PipelineConfig, init_model_uri: str | None, task_set_uri: str,
                    parent_run_id: str | None = None) -> dict[str, Any]:
    """Run (or reuse, or resume) FC-RL; returns ``{"stage", "run_id", "run_key", "model_uri", "checkpoint",
    "metrics", "reused"}`` (``metrics``: the MLflow run's latest values, the held-out evaluation included)."""
    rl = cfg.fc_rl
    if not rl.enabled:
        return skipped(STAGE, init_model_uri)
    setup_env(cfg)
    data_uri, data_sha, manifest_uri = resolve_dataset("rl_tasks", task_set_uri, cfg)
    train_tasks = load_tasks(data_uri, cfg)
    if not train_tasks:
        raise StageInputError(f"{data_uri}: the RL task set is empty")

    def launch(tracker: MlflowTracker, key: str) -> Launched:
        eval_tasks = [t for u in held_out_task_uris(task_set_uri, cfg.infra.storage) for t in load_tasks(u, cfg)]
        loop_config = {"cfg": cfg, "init_model_uri": init_model_uri, "train_tasks": train_tasks,
                       "eval_tasks": eval_subset(eval_tasks, rl.n_eval_tasks), "tracking_uri": tracking_uri(cfg),
                       "run_id": tracker.run_id}
        _, tags = fit_stage(_rl_worker, loop_config, cfg, STAGE, key, rl.scaling, rl.keep_checkpoints, tracker)
        return Launched(dict(tracker.client.get_run(tracker.run_id).data.metrics), tags)

    return run_stage(StageSpec(stage=STAGE, cfg=cfg, entries=ENTRIES, launch=launch, init_model_uri=init_model_uri,
                               inputs=[StageInput("rl_tasks", data_uri, data_sha, context=STAGE,
                                                  n_rows=len(train_tasks))],
                               manifest_uri=manifest_uri), parent_run_id)

"""FC-RL as a Ray Train job recorded in MLflow: the adapter around ``foresight_core.fc_rl``.

    from foresight_tasks.rl import run_fc_rl_stage
    rl = run_fc_rl_stage(cfg, init_model_uri=fe["model_uri"], task_set_uri=corpus_uri, parent_run_id=...)
    rl["model_uri"]     # "runs:/<run id>/model"; rl["metrics"] holds the held-out evaluation before / after

What one call does (the same shape as ``foresight_tasks.train.run_sft_stage``):
1. Resolves its inputs: the RL task set (``rl_tasks``) and the held-out ``eval/*`` task sets of the
   corpus folder, by its manifest; the starting model (the FE-SFT run's ``runs:/`` URI or an HF folder;
   None: the config's base model).
2. Stage key (fc_rl config, model config, seed, task-set sha256, starting model): a FINISHED MLflow run
   with that key is returned as it is; a RUNNING / FAILED one is continued; else a new run nested
   under ``parent_run_id``.
3. Runs ``foresight_core.fc_rl.train_fc_rl`` in every worker of a ``TorchTrainer`` (DDP over gloo on
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
from foresight_tasks.runtime import setup_env
from foresight_tasks.tracking import MlflowTracker, find_runs, tracking_uri
from foresight_tasks.train import MODEL_ARTIFACT, StageInputError, fit_stage, local_model_dir, \
    open_stage_run, resolve_dataset, stage_key

STAGE = "fc_rl"


def load_tasks(uri: str, cfg: PipelineConfig) -> list[Any]:
    """The tasks of one file (``capability.read_tasks``); a bad row is a ``StageInputError`` naming it."""
    try:
        return read_tasks(uri, cfg.infra.storage)
    except ValueError as e:
        raise StageInputError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# The worker: one per Ray Train rank

def _rl_worker(config: dict[str, Any]) -> None:
    """Runs in each TorchTrainer worker (the process group is already set up by Ray)."""
    import ray.train
    import ray.train.torch
    import torch

    from foresight_core.envs import env_for_task
    from foresight_core.fc_rl import train_fc_rl
    from foresight_core.models import compute_dtype, load_model, save_model

    cfg: PipelineConfig = config["cfg"]
    rl = cfg.fc_rl
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(config["threads"])  # resolved by fit_stage from the Ray nodes' CPUs
    device = ray.train.torch.get_device()
    tracker = MlflowTracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if tracker is not None:  # what the speed depends on, as the worker really saw it
        tracker.set_tags({"foresight.worker.torch_threads": str(torch.get_num_threads()),
                          "foresight.worker.world_size": str(ray.train.get_context().get_world_size())})
    work = Path(tempfile.mkdtemp(prefix=f"foresight-fc_rl-rank{rank}-"))
    try:
        progress = Progress.of(tracker)  # rank 0 only (the others have no tracker)
        model_cfg = cfg.model
        if config["init_model_uri"]:
            progress.phase("downloading the starting model")
            init_dir = local_model_dir(config["init_model_uri"], config["tracking_uri"], work / "init")
            model_cfg = cfg.model.model_copy(update={"source": "hf", "name_or_path": init_dir})
        t0 = time.perf_counter()  # the stage's own work from here: loading, rollouts, updates, held-out evals
        progress.phase("loading the model")
        model, tokenizer = load_model(model_cfg, str(device), seed=cfg.seed)
        engine = None
        if rl.engine == "vllm":
            from foresight_core.vllm_engine import VLLMEngine
            init_path = model_cfg.name_or_path or str(save_model(model, tokenizer, work / "init_hf"))
            engine = VLLMEngine(init_path, gpu_memory_utilization=rl.vllm_gpu_memory_utilization,
                                max_model_len=rl.max_context_tokens, seed=cfg.seed + rank)

        ckpt_dir = work / "ckpt"
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                shutil.copytree(d, ckpt_dir)

        def report(path: Path, step: int, metrics: dict[str, float]) -> None:
            ckpt = ray.train.Checkpoint.from_directory(str(path)) if rank == 0 else None
            ray.train.report({"step": step, **metrics}, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:06d}")

        result = train_fc_rl(rl, model, tokenizer, config["train_tasks"], lambda t: env_for_task(t, cfg.envs),
                             seed=cfg.seed, eval_tasks=config["eval_tasks"], engine=engine, tracker=tracker,
                             checkpoint_dir=ckpt_dir, device=device,
                             autocast_dtype=compute_dtype(model_cfg, str(device)), on_checkpoint=report)
        compute_s = time.perf_counter() - t0
        if rank == 0:
            tracker.log_metrics({"compute_s": compute_s}, step=result.steps)
            progress.phase("logging the model to MLflow")
            tracker.log_artifacts(str(save_model(model, tokenizer, work / "model")), MODEL_ARTIFACT)
            tracker.log_metrics({f"eval_before/{k}": v for k, v in result.eval_before.items()}, step=0)
            tracker.log_metrics({f"eval_after/{k}": v for k, v in result.eval_after.items()}, step=result.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The stage

def _find_run(cfg: PipelineConfig, key: str, status: str) -> Any | None:
    runs = find_runs(cfg, STAGE, tags={"foresight.run_key": key}, status=status, max_results=1)
    return runs[0] if runs else None


def _reference(run_id: str, key: str, tags: dict[str, str], metrics: dict[str, float],
               reused: bool) -> dict[str, Any]:
    return {"stage": STAGE, "run_id": run_id, "run_key": key, "model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT}",
            "checkpoint": tags.get("foresight.output.checkpoint"), "metrics": metrics, "reused": reused}


def run_fc_rl_stage(cfg: PipelineConfig, init_model_uri: str | None, task_set_uri: str,
                    parent_run_id: str | None = None) -> dict[str, Any]:
    """Run (or reuse, or resume) FC-RL; returns ``{"stage", "run_id", "run_key", "model_uri", "checkpoint",
    "metrics", "reused"}`` (``metrics``: the MLflow run's latest values, the held-out evaluation included)."""
    rl = cfg.fc_rl
    if not rl.enabled:
        return {"stage": STAGE, "run_id": None, "run_key": None, "model_uri": init_model_uri, "checkpoint": None,
                "metrics": {}, "reused": False, "skipped": True}
    setup_env(cfg)

    # ---- inputs and the stage key
    data_uri, data_sha, manifest_uri = resolve_dataset("rl_tasks", task_set_uri, cfg)
    key = stage_key(STAGE, cfg, data_sha, init_model_uri)
    uri = tracking_uri(cfg)
    done = _find_run(cfg, key, "FINISHED")
    if done is not None:
        return _reference(done.info.run_id, key, done.data.tags, done.data.metrics, reused=True)
    train_tasks = load_tasks(data_uri, cfg)
    if not train_tasks:
        raise StageInputError(f"{data_uri}: the RL task set is empty")
    eval_tasks = [t for u in held_out_task_uris(task_set_uri, cfg.infra.storage) for t in load_tasks(u, cfg)]
    eval_tasks = eval_subset(eval_tasks, rl.n_eval_tasks)

    # ---- the MLflow run: continue an unfinished one with this key, else a new nested run
    tracker = open_stage_run(cfg, STAGE, key, data_uri, data_sha, manifest_uri, init_model_uri, parent_run_id,
                             dataset_name="rl_tasks", n_rows=len(train_tasks))

    # ---- the Ray Train job
    loop_config = {"cfg": cfg, "init_model_uri": init_model_uri, "train_tasks": train_tasks,
                   "eval_tasks": eval_tasks, "tracking_uri": uri, "run_id": tracker.run_id}
    _, output_tags = fit_stage(_rl_worker, loop_config, cfg, STAGE, key, rl.scaling, rl.keep_checkpoints, tracker)
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    return _reference(tracker.run_id, key, output_tags, metrics, reused=False)

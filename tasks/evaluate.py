"""Benchmark evaluation as a Ray Data job recorded in MLflow: the adapter around ``foresight_core.evaluation``.

    from tasks.evaluate import run_eval_stage
    ev = run_eval_stage(cfg, model_uri=rl["model_uri"], corpus_uri=manifest.uri, parent_run_id=...)
    ev["metrics"]["search_world/direct/score"], ev["metrics"]["avg/planning/score"]

What one call does:
1. Resolves its inputs: the corpus's held-out ``eval/<benchmark>`` task sets (by its manifest) and the
   model to evaluate (an MLflow ``runs:/`` URI, an HF folder, or None for the config's base model).
2. Hands the stage to ``tasks.stage.run_stage`` (key, reuse of a FINISHED run, the MLflow run):
   a spec of the eval sets, the model and ``ENTRIES`` (the core modules it runs).
3. Ray Data: the tasks flow through ``map_batches`` into a pool of ``cfg.eval.num_actors`` actors, each
   holding one copy of the model (loaded once) and playing whole batches of episodes with the HF engine
   (or vLLM on a GPU). Tasks and records cross Ray Data as JSON text.
4. The driver summarises the records per benchmark and decoding mode (``evaluation.summarise``) and
   logs the metrics, the report (JSON) and a table of sample episodes to a run nested under the pipeline's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foresight_core.capability import held_out_task_uris
from foresight_core.config import PipelineConfig
from foresight_core.config.envs import BenchmarkSource
from foresight_core.evaluation import first_confidences, flat_metrics, modes, summarise
from foresight_core.promotion import task_scores
from foresight_core.storage import sha256_file
from foresight_core.tracking import PROGRESS_TAG, Progress
from tasks.progress import watch_stage
from tasks.rl import load_tasks
from tasks.runtime import init_ray, mlflow_client_env, node_tags, quiet_ray_data, setup_env, worker_threads
from tasks.stage import Launched, StageInput, StageSpec, run_stage
from tasks.tracking import MlflowTracker, tracking_uri
from tasks.train import StageInputError, local_model_dir

STAGE = "eval"
# the science evaluation runs (the agent loop and scoring, the environments, the model loader, the GPU engine)
ENTRIES = ("foresight_core.evaluation", "foresight_core.promotion", "foresight_core.plots", "foresight_core.envs",
           "foresight_core.models", "foresight_core.vllm_engine")
TASK_SCORES = "eval_task_scores.json"
"""Artifact of every eval run: ``{mode: {"<benchmark>/<task id>": mean score}}``, what promotion pairs."""
CALIBRATION = "eval_calibration.json"
"""Artifact of every eval run: ``{mode: {benchmark: [[task id, first q, success], ...]}}``
(``evaluation.first_confidences``), what the ablation table pools over a row's seeds."""


class EvalWorker:
    """A Ray Data actor: loads the model once, then plays every batch of tasks it is given.

    With ``run_id`` it says where it is in a tag of that run, ``foresight.progress.<actor>``: the
    episodes it has finished, turn by turn (a batch's records reach the driver only when the whole
    batch is done)."""

    def __init__(self, cfg: PipelineConfig, model_uri: str | None, tracking: str, run_id: str | None = None,
                 threads: int | None = None) -> None:
        import torch

        from foresight_core.chat import ChatBridge
        from foresight_core.models import load_model

        actor = uuid.uuid4().hex[:8]
        tracker = MlflowTracker(tracking, run_id) if run_id else None
        self.progress = Progress(tracker, key=f"{PROGRESS_TAG}.{actor}")
        if tracker is not None:  # where this actor plays: one set of tags per actor
            tracker.set_tags(node_tags(f"foresight.eval_actor.{actor}"))
        self.progress.phase("loading the model")
        self.episodes = 0  # finished by this actor, over all its batches

        torch.set_num_threads(threads or cfg.num_threads or max(1, torch.get_num_threads()))
        self.cfg = cfg
        self.work = Path(tempfile.mkdtemp(prefix="foresight-eval-"))
        weakref.finalize(self, shutil.rmtree, self.work, True)  # the downloaded model goes with the actor
        model_cfg = cfg.model
        if model_uri:
            model_cfg = cfg.model.saved(local_model_dir(model_uri, tracking, self.work / "model"))
        if cfg.eval.engine == "vllm":
            from foresight_core.models import save_model
            from foresight_core.vllm_engine import VLLMEngine
            model, tokenizer = load_model(model_cfg, "cpu", train=False, seed=cfg.seed)
            path = model_cfg.name_or_path or str(save_model(model, tokenizer, self.work / "base"))
            self.engine = VLLMEngine(path, max_model_len=cfg.eval.max_context_tokens, seed=cfg.seed)
        else:
            from foresight_core.rollout import HFEngine
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model, tokenizer = load_model(model_cfg, device, train=False, seed=cfg.seed)
            self.engine = HFEngine(model, tokenizer, autocast_dtype=None, max_batch=cfg.eval.batch_size)
        self.bridge = ChatBridge(tokenizer)
        self.progress.phase("playing", unit="episodes")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        import torch

        from foresight_core.envs import env_for_task
        from foresight_core.evaluation import play_tasks
        from foresight_core.types import Task

        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        tasks = [(str(bench), Task.from_dict(json.loads(task_json)))
                 for bench, task_json in zip(batch["benchmark"], batch["task"])]
        records: list[dict[str, Any]] = []
        for mode in modes(self.cfg.eval):  # the batch's benchmarks play together
            records += play_tasks(self.engine, self.bridge, lambda t: env_for_task(t, self.cfg.envs),
                                  tasks, self.cfg.eval, mode,
                                  on_progress=self.progress.episodes(offset=self.episodes + len(records)))
        self.episodes += len(records)
        self.progress.update(self.episodes, force=True)
        seconds = (time.perf_counter() - t0) / max(len(records), 1)  # the batch's play time, spread over its rows
        return {"record": [json.dumps(r) for r in records], "seconds": [seconds] * len(records)}


def log_calibration_plots(tracker: MlflowTracker, pairs: Mapping[str, Mapping[str, Sequence[Sequence[Any]]]],
                          prefix: str = "") -> None:
    """A reliability diagram and a risk-coverage curve per mode and benchmark of
    ``{mode: {benchmark: [[task id, q, success], ...]}}`` (``evaluation.first_confidences``), as PNG
    artifacts under ``plots/<prefix>``."""
    from foresight_core.plots import reliability_diagram, risk_coverage_plot

    with tempfile.TemporaryDirectory() as tmp:
        for mode, by_bench in sorted(pairs.items()):
            for bench, rows in sorted(by_bench.items()):
                if not rows:
                    continue
                qs, ys = [float(r[1]) for r in rows], [float(r[2]) for r in rows]
                for kind, draw in (("reliability", reliability_diagram), ("risk_coverage", risk_coverage_plot)):
                    path = Path(tmp) / f"{bench}_{mode}_{kind}.png".replace("/", "_")
                    path.write_bytes(draw(qs, ys, title=f"{prefix}: {bench} / {mode}" if prefix else f"{bench} / {mode}"))
                    tracker.log_artifact(str(path), f"plots/{prefix}" if prefix else "plots")


def benchmark_task_uris(cfg: PipelineConfig, sources: list[BenchmarkSource]) -> list[str]:
    """Benchmark files given at eval time, as task files of their own: each read by its loader (a bad row
    is an error naming the file, the row and the field), written once under
    ``<work_dir>/benchmarks/<key>/<name>.jsonl`` with a manifest, keyed by the sources and their files' sha256."""
    from foresight_core.corpus import benchmark_tasks
    from foresight_core.storage import DatasetWriter, WorkDir, join_uri, load_manifest

    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise StageInputError(f"--benchmark: a name is used twice: {names}")
    storage = cfg.infra.storage
    ident = [{**s.model_dump(mode="json"), "sha256": sha256_file(s.path, storage)} for s in sources]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    out = WorkDir(cfg.work_dir).benchmarks(key)
    if load_manifest(out, storage) is None:
        with DatasetWriter(out, storage) as w:
            for src in sources:
                tasks, _ = benchmark_tasks(src, cfg)
                if not tasks:
                    raise StageInputError(f"{src.path}: no usable row in benchmark {src.name!r}")
                w.write_rows(f"{src.name}.jsonl", [t.to_dict() for t in tasks])
            w.commit({"stage": "benchmarks", "sources": ident})
    return [join_uri(out, f"{name}.jsonl") for name in names]


def run_eval_stage(cfg: PipelineConfig, model_uri: str | None, corpus_uri: str | None = None,
                   parent_run_id: str | None = None, task_uris: list[str] | None = None) -> dict[str, Any]:
    """Evaluate (or reuse the evaluation of) ``model_uri`` on the corpus's held-out sets.

    Returns the stage reference (``tasks.stage``) with ``metrics`` flattened as
    ``<benchmark>/<mode>/<metric>``."""
    setup_env(cfg)
    storage = cfg.infra.storage
    if (corpus_uri is None) == (task_uris is None):
        raise ValueError("run_eval_stage: give the corpus (its eval/* sets) or task files, one of the two")
    uris = list(task_uris) if task_uris is not None else held_out_task_uris(str(corpus_uri), storage)
    if not uris:
        raise StageInputError(f"{corpus_uri}: the corpus has no eval/* task sets (or no complete manifest)")
    sets = {Path(u).stem: load_tasks(u, cfg) for u in uris}
    if cfg.eval.max_tasks:
        sets = {name: tasks[:cfg.eval.max_tasks] for name, tasks in sets.items()}
    inputs = [StageInput(Path(u).stem, u, sha256_file(u, storage), context=STAGE, n_rows=len(sets[Path(u).stem]))
              for u in uris]

    def launch(tracker: MlflowTracker, key: str) -> Launched:
        # ---- Ray Data: tasks -> actors holding the model -> episode records
        import ray.data

        init_ray(cfg.infra.ray, mlflow_client_env(cfg))
        cpus, threads = worker_threads(cfg, cfg.eval.num_actors, None)  # the actors share the nodes' CPUs
        tracker.set_tags({"foresight.worker.torch_threads": str(threads)})
        items = [{"benchmark": name, "task": json.dumps(t.to_dict())} for name, tasks in sets.items() for t in tasks]
        per_batch = max(1, cfg.eval.batch_size // cfg.eval.samples_per_task)
        # progress: episodes, from the actors' tags turn by turn and from the rows as each batch arrives
        # (smaller batches would move it too, but change the results: each batch reseeds the sampler)
        n_episodes = len(items) * len(modes(cfg.eval)) * cfg.eval.samples_per_task
        records: list[dict[str, Any]] = []
        compute_s = 0.0  # time the actors spent playing (the stage function alone), summed over actors
        with quiet_ray_data(), watch_stage(STAGE, tracker, waiting="starting the evaluation actors",
                                           total=n_episodes, unit="episodes", reset=False) as watch:
            ds = ray.data.from_items(items).map_batches(
                EvalWorker, fn_constructor_kwargs={"cfg": cfg, "model_uri": model_uri, "tracking": tracking_uri(cfg),
                                                   "run_id": tracker.run_id, "threads": threads},
                batch_size=per_batch, batch_format="numpy", concurrency=cfg.eval.num_actors, num_cpus=cpus,
                num_gpus=1 if cfg.eval.engine == "vllm" else 0)
            for r in ds.iter_rows():
                records.append(json.loads(r["record"]))
                compute_s += float(r["seconds"])
                watch.advance(1)

        # ---- summary per benchmark and mode, logged to the run
        report: dict[str, Any] = {}
        for name in sets:
            report[name] = {}
            for mode in modes(cfg.eval):
                recs = [r for r in records if r["benchmark"] == name and r["mode"] == mode]
                if recs:
                    report[name][mode] = summarise(recs)
        metrics = flat_metrics(report)
        tracker.log_metrics({**metrics, "compute_s": compute_s})
        tracker.log_dict(report, "eval_report.json")
        tracker.log_dict({mode: task_scores(records, mode) for mode in modes(cfg.eval)}, TASK_SCORES)
        calibration = first_confidences(records)
        tracker.log_dict(calibration, CALIBRATION)
        log_calibration_plots(tracker, calibration)
        sample = [r for name in sets for r in records if r["benchmark"] == name][:cfg.eval.sample_rows * len(sets)]
        if sample:
            tracker.log_table([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}
                               for r in sample], "eval_episodes.json")
        return Launched(metrics, {"foresight.output.report": "eval_report.json"})

    return run_stage(StageSpec(stage=STAGE, cfg=cfg, entries=ENTRIES, launch=launch, init_model_uri=model_uri,
                               inputs=inputs, produces_model=False), parent_run_id)

"""Stage 0: the corpus build as a Ray Data job, recorded in MLflow (the flow's ``corpus`` task calls it).

    refs = run_corpus_stage(cfg, parent_run_id=parent.run_id)
    # {"corpus.uri": ".../corpus/<key>", "corpus.manifest_uri": ".../manifest.json",
    #  "corpus.key": "<key>", "corpus.run_id": "<mlflow run id>", "corpus.reused": "false"}
    manifest = find_corpus(cfg, uri)      # a later stage's input: that folder, else the newest finished run

``foresight_core.corpus.build_corpus`` does the work; this adapter hands its collection to Ray
Data (``ray_map`` over ``collect_items``, one block per map call) and records the nested MLflow
run: params (seed, envs and corpus config), the manifest's statistics as metrics, the manifest and
a sample of rendered trajectories as artifacts, every dataset as an MLflow dataset input, and tags
that link the run to its output (key, folder, manifest). A finished corpus with the same key is
reused, not rebuilt, and the run says so (tag ``foresight.reused``).
"""

from __future__ import annotations

from typing import Any

from foresight_core.chat import trajectory_messages
from foresight_core.config import PipelineConfig
from foresight_core.corpus import Manifest, build_corpus, collect_items, corpus_key, corpus_uri
from foresight_core.envs.sandbox import SandboxError
from foresight_core.storage import MANIFEST, StorageError, join_uri, load_manifest, manifest_problem
from foresight_core.types import Trajectory
from tasks.runtime import init_ray, mlflow_client_env, ray_map
from tasks.tracking import find_runs, mlflow_run, stage_params

# manifest sections whose numbers become metrics (lists and per-file hashes do not)
METRIC_SECTIONS = ("counts", "trajectories", "successes", "failures", "success_rate", "success_rate_by_env",
                   "annotated_trajectories", "annotated_steps", "steps", "invalid_turns", "q_labels",
                   "token_stats", "timing")


def corpus_metrics(data: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of the manifest's statistics, as ``corpus.<path>`` metrics."""
    out: dict[str, float] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix] = float(v)

    for section in METRIC_SECTIONS:
        if section in data:
            walk(f"corpus.{section}", data[section])
    return out


def dataset_context(name: str) -> str:
    """Which stage reads a dataset: wm_amt, fe_sft, fc_rl (the RL tasks) or eval."""
    return {"rl_tasks": "fc_rl"}.get(name, "eval" if name.startswith("eval/") else name)


def render_samples(rows: list[dict[str, Any]], n: int) -> str:
    """Up to ``n`` trajectory rows as readable chat text, successes and failures alternating."""
    trajs = [Trajectory.from_dict(r["trajectory"]) for r in rows if r.get("kind") == "trajectory"]
    wins, losses = [t for t in trajs if t.success], [t for t in trajs if not t.success]
    picked: list[Trajectory] = []
    for i in range(max(len(wins), len(losses))):
        picked += wins[i:i + 1] + losses[i:i + 1]
    parts = []
    for traj in picked[:n]:
        head = (f"## {traj.task.id} ({traj.task.env}) success={traj.success} score={traj.score:g} "
                f"annotated_steps={traj.meta.get('annotated_steps', [])}")
        body = "\n\n".join(f"### {m['role']}\n{m['content']}" for m in trajectory_messages(traj))
        parts.append(f"{head}\n\n{body}\n")
    return "\n".join(parts)


def ray_collect(progress: bool) -> Any:
    """The ``map_fn`` of ``build_corpus``: ``collect_items`` as a Ray Data job of ``num_blocks`` blocks."""

    def map_fn(items: list[dict[str, Any]], cfg: PipelineConfig) -> list[dict[str, Any]]:
        init_ray(cfg.infra.ray, mlflow_client_env(cfg))  # only when there is something to collect: a reused corpus needs no Ray
        return ray_map(items, lambda block: collect_items(block, cfg), cfg.corpus.num_blocks,
                       progress=progress, description="corpus")

    return map_fn


def log_manifest(run: Any, manifest: Manifest, cfg: PipelineConfig) -> None:
    """Metrics, dataset inputs, the manifest and sample trajectories of a finished corpus."""
    data = manifest.data
    run.log_metrics(corpus_metrics(data))
    for name in manifest.datasets:
        file = data["datasets"][name]["file"]
        run.log_dataset(manifest.dataset_uri(name), name=name, digest=data["files"][file]["sha256"],
                        context=dataset_context(name), n_rows=data["datasets"][name]["rows"])
    run.log_dict(data, "corpus/manifest.json")
    n = cfg.infra.tracking.sample_trajectories
    if n:
        rows = manifest.read("wm_amt", cfg.infra.storage) + manifest.read("fe_sft", cfg.infra.storage)
        run.log_text(render_samples(rows, n), "corpus/sample_trajectories.md")


def run_corpus_stage(cfg: PipelineConfig, parent_run_id: str | None = None) -> dict[str, str]:
    """Build (or reuse) the corpus of ``cfg`` and record it as a run nested under ``parent_run_id``; a failed
    build's MLflow run is marked FAILED. The corpus keys and reuses itself through its manifest
    (``foresight_core.corpus``): a folder, not an MLflow run, is its output."""
    key = corpus_key(cfg)
    out_uri = corpus_uri(cfg)
    tags = {"foresight.corpus.key": key, "foresight.corpus.uri": out_uri}
    with mlflow_run(cfg, f"corpus-{key[:8]}", stage="corpus", parent_run_id=parent_run_id, tags=tags) as run:
        run.log_params(stage_params(cfg, "seed", "envs", "corpus"))
        try:
            manifest = build_corpus(cfg, out_uri=out_uri, map_fn=ray_collect(progress=True))
        except SandboxError as e:  # on a Ray worker: say it in one line, not as a worker traceback
            cause = getattr(e, "cause", None) or e
            raise SandboxError(f"corpus stage: the maths environment's python tool could not run on a Ray "
                               f"worker: {cause}") from None
        run.set_tags({"foresight.reused": str(manifest.reused).lower(),
                      "foresight.corpus.manifest_uri": join_uri(manifest.uri, MANIFEST)})
        log_manifest(run, manifest, cfg)
    return {"corpus.uri": manifest.uri, "corpus.manifest_uri": join_uri(manifest.uri, MANIFEST),
            "corpus.key": manifest.key, "corpus.run_id": run.run_id, "corpus.reused": str(manifest.reused).lower()}


def find_corpus(cfg: PipelineConfig, uri: str | None = None) -> Manifest:
    """The corpus a later stage reads: the folder ``uri`` (the one the pipeline built), else the newest
    finished corpus run of this config's key in MLflow. Raises when there is none."""
    if uri is None:
        key = corpus_key(cfg)
        runs = find_runs(cfg, "corpus", {"foresight.corpus.key": key}, max_results=1)
        if not runs:
            raise RuntimeError(f"no finished corpus with key {key} in MLflow ({cfg.infra.tracking.experiment}): "
                               "run `foresight corpus` with this config first, or keep corpus in `stages`")
        uri = runs[0].data.tags["foresight.corpus.uri"]
    problem = manifest_problem(uri, cfg.infra.storage)
    if problem is not None:
        raise StorageError(f"corpus {uri} cannot be used: {problem}. Rebuild it with `foresight corpus` "
                           "(a folder whose manifest does not match is rebuilt)")
    return Manifest(uri=uri, data=load_manifest(uri, cfg.infra.storage), reused=True)

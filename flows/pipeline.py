"""The Prefect flows: ``build_corpus`` (stage 0) and ``pipeline`` (the whole DAG).

    from foresight_flows.pipeline import build_corpus, pipeline
    refs = pipeline(load_config("tiny"))
    # {"pipeline.run_id": ..., "corpus.manifest_uri": ..., "corpus.run_id": ..., "wm_amt.model_uri": ...}

Each flow's one parameter is ``PipelineConfig``: the Prefect UI builds its form from it,
deployments store it, and the flow validates it again when it starts (the cross-field checks a
UI form cannot run). Credentials never travel in flow parameters: a deployment stores them
masked, and a masked, empty or default infra field is filled from the environment of the
process running the flow (``revalidate``).

Every stage is a Prefect task with one signature, ``stage(cfg, refs, parent_run_id) -> new refs``:
the corpus task is ``foresight_tasks.corpus.corpus``, the training stages below wrap
``foresight_tasks.train`` and ``foresight_tasks.rl``, the eval stage's module brings its own
``evaluate`` task. Stages pass references (manifest and model URIs, MLflow run ids), never
tensors, and reuse their finished output when run again with the same config and inputs.
``pipeline`` runs the stages of ``cfg.stages`` in order, skipping (with a warning) any stage
whose module this install lacks and any stage whose config says ``enabled: false``.
MLflow: one parent run per flow run, one nested run per stage.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import time
from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments.runner import EntrypointType
from prefect.runtime import flow_run
from prefect.schedules import Cron

from foresight_core.config import PipelineConfig
from foresight_core.config.ablation import AblationConfig
from foresight_core.config.load import ENV_OVERRIDES, set_path, validate
from foresight_tasks.runtime import is_local_uri, local_path, setup_env
from foresight_tasks.tracking import MASK, config_yaml, flatten, mask_text, mlflow_run

# stage -> the foresight_tasks module that implements it; a stage whose module is missing is skipped
STAGE_MODULES: dict[str, str] = {
    "corpus": "foresight_tasks.corpus",
    "wm_amt": "foresight_tasks.train",
    "fe_sft": "foresight_tasks.train",
    "fc_rl": "foresight_tasks.rl",
    "eval": "foresight_tasks.evaluate",
}


def stage_available(stage: str) -> bool:
    """Whether this install has the stage's module (checked without importing it)."""
    return importlib.util.find_spec(STAGE_MODULES[stage]) is not None


def stage_enabled(cfg: PipelineConfig, stage: str) -> bool:
    section = getattr(cfg, stage, None)
    return bool(getattr(section, "enabled", True))


def revalidate(cfg: PipelineConfig | Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> PipelineConfig:
    """Validate the flow's parameter again, filling unset infra fields from ``environ``.

    Raises ``ConfigError`` naming the field, before any work. A deployment run gets its config
    from the Prefect server, where credentials are stored masked (``**********``) and where
    infrastructure is best left out: a field that is masked, empty or at its default is taken
    from the environment of the process running the flow (``AWS_*``, ``MLFLOW_TRACKING_URI``,
    ``RAY_ADDRESS``, ``FORESIGHT_WORK_DIR``, ...); a value set in the config stays as it is.
    A local work dir becomes absolute, so the references the stages record do not depend on
    the directory the flow ran in.
    """
    data = cfg.model_dump(mode="json") if isinstance(cfg, PipelineConfig) else copy.deepcopy(dict(cfg))
    if isinstance(cfg, PipelineConfig):  # the JSON dump masked the secrets: put the real ones back
        storage = cfg.infra.storage
        for name in ("key", "secret"):
            value = getattr(storage, name)
            data["infra"]["storage"][name] = value.get_secret_value() if value is not None else None
    defaults = PipelineConfig().model_dump(mode="json")
    for var, dotted in ENV_OVERRIDES.items():
        value, default = _get(data, dotted), _get(defaults, dotted)
        masked = isinstance(value, str) and MASK in value
        if environ.get(var) and (value is None or masked or value == default):
            set_path(data, dotted, environ[var])
        elif masked:
            set_path(data, dotted, None)
    work_dir = data.setdefault("work_dir", defaults["work_dir"])
    if is_local_uri(work_dir):  # references recorded by the stages must not depend on the cwd
        data["work_dir"] = str(local_path(work_dir))
    return validate(data, "flow parameter cfg")


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


# ---------------------------------------------------------------------------------------------
# Training stage tasks. No Prefect retries here: Ray Train's FailureConfig already restarts a
# stage from its last checkpoint, and running the stage again resumes its unfinished MLflow run.


def _stage_refs(stage: str, ref: dict[str, Any]) -> dict[str, str]:
    """The stage's references, and its format-capability check (``check/*`` metrics), which the CLI prints."""
    out = {f"{stage}.model_uri": str(ref["model_uri"]), f"{stage}.run_id": str(ref["run_id"]),
           f"{stage}.reused": str(ref["reused"]).lower()}
    out.update({f"{stage}.{k}": f"{v:.4g}" for k, v in sorted((ref.get("metrics") or {}).items())
                if k.startswith("check/")})
    return out


@task(name="wm_amt", cache_policy=NO_CACHE)
def wm_amt(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 1: next-token loss over the annotated corpus, from the base model."""
    from foresight_tasks.corpus import find_corpus
    from foresight_tasks.train import run_sft_stage

    corpus = find_corpus(cfg, refs)
    return _stage_refs("wm_amt", run_sft_stage("wm_amt", cfg, corpus.uri, parent_run_id=parent_run_id))


@task(name="fe_sft", cache_policy=NO_CACHE)
def fe_sft(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 2: assistant-token loss on the FE-SFT set, from WM-AMT's model when WM-AMT ran in this
    pipeline (the full method), else from the base model (the FE-SFT-only baseline)."""
    from foresight_tasks.corpus import find_corpus
    from foresight_tasks.train import run_sft_stage

    corpus = find_corpus(cfg, refs)
    ref = run_sft_stage("fe_sft", cfg, corpus.uri, init_model_uri=refs.get("wm_amt.model_uri"),
                        parent_run_id=parent_run_id)
    return _stage_refs("fe_sft", ref)


@task(name="fc_rl", cache_policy=NO_CACHE)
def fc_rl(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 3: foresight-conditioned GRPO on the corpus's RL tasks, from the latest model of this
    pipeline run (FE-SFT's, else WM-AMT's, else the base model)."""
    from foresight_tasks.corpus import find_corpus
    from foresight_tasks.rl import run_fc_rl_stage

    corpus = find_corpus(cfg, refs)
    init = refs.get("fe_sft.model_uri") or refs.get("wm_amt.model_uri")
    return _stage_refs("fc_rl", run_fc_rl_stage(cfg, init, corpus.uri, parent_run_id=parent_run_id))


def stage_task(stage: str) -> Any:
    """The Prefect task of a stage. The eval stage's module provides its own task, ``evaluate``,
    with the same signature."""
    if stage == "corpus":
        from foresight_tasks.corpus import corpus

        return corpus
    if stage == "eval":
        return importlib.import_module(STAGE_MODULES["eval"]).evaluate
    return {"wm_amt": wm_amt, "fe_sft": fe_sft, "fc_rl": fc_rl}[stage]


def _run_stages(cfg: PipelineConfig, stages: list[str], run_name: str,
                parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> dict[str, str]:
    logger = get_run_logger()
    setup_env(cfg)  # Ray and MLflow defaults for a flow started by a worker rather than the CLI
    runnable: list[str] = []
    for stage in stages:
        if not stage_available(stage):
            logger.warning("stage %s skipped: %s is not in this install", stage, STAGE_MODULES[stage])
        elif not stage_enabled(cfg, stage):
            logger.info("stage %s skipped: %s.enabled is false", stage, stage)
        else:
            runnable.append(stage)
    tags = {"prefect.flow_run_id": str(flow_run.id), "foresight.stages": ",".join(runnable), **(extra_tags or {})}
    with mlflow_run(cfg, run_name, stage="pipeline", parent_run_id=parent_run_id, tags=tags) as parent:
        parent.log_params(flatten(cfg))
        parent.log_text(config_yaml(cfg), "config.yaml")
        refs: dict[str, str] = {"pipeline.run_id": parent.run_id}
        for stage in runnable:
            logger.info("stage %s", stage)
            t0 = time.perf_counter()
            refs.update(stage_task(stage)(cfg, dict(refs), parent.run_id))
            wall_s = time.perf_counter() - t0  # the whole task: reuse checks, Ray start-up, uploads included
            refs[f"{stage}.wall_s"] = f"{wall_s:.1f}"
            parent.log_metrics({f"{stage}.wall_s": wall_s})
        parent.log_dict(refs, "refs.json")
    return refs


@flow(name="build_corpus", log_prints=True)
def build_corpus(cfg: PipelineConfig) -> dict[str, str]:
    """Stage 0: play the environments with the behaviour policy on Ray Data, annotate z_t and q_t in
    hindsight, write the WM-AMT / FE-SFT / RL / eval datasets with a manifest, record all in MLflow."""
    cfg = revalidate(cfg)
    return _run_stages(cfg, ["corpus"], run_name=f"{cfg.name}-build_corpus")


@flow(name="pipeline", log_prints=True)
def pipeline(cfg: PipelineConfig) -> dict[str, str]:
    """The whole method: corpus -> WM-AMT -> FE-SFT -> FC-RL -> eval (the stages in ``cfg.stages``),
    each stage reusing its finished output, all in one MLflow parent run."""
    cfg = revalidate(cfg)
    return _run_stages(cfg, list(cfg.stages), run_name=f"{cfg.name}-pipeline")


# the metrics of an eval run that make the ablation table's columns
TABLE_COLUMNS = ("score", "pass_at_k", "format_rate", "ece_first", "brier_first", "grounding_rate", "gen_tokens")


@flow(name="ablation", log_prints=True)
def ablation(cfg: PipelineConfig, table: AblationConfig) -> dict[str, Any]:
    """The method table of METHOD.md in one flow run: every variant is the pipeline with its own stages
    and overrides, nested under one MLflow run; finished stages are shared between variants (the corpus
    always, WM-AMT / FE-SFT wherever config and inputs agree). The table (markdown and CSV) is logged."""
    from foresight_core.config.ablation import apply_variant
    from foresight_tasks.tracking import run_metrics

    cfg = revalidate(cfg)
    logger = get_run_logger()
    variants = [(v, apply_variant(cfg, v)) for v in table.variants]  # every override checked before any work
    rows: list[dict[str, Any]] = []
    with mlflow_run(cfg, f"{cfg.name}-ablation", stage="ablation",
                    tags={"prefect.flow_run_id": str(flow_run.id)}) as parent:
        parent.log_dict(table.model_dump(mode="json"), "ablation.json")
        for variant, vcfg in variants:
            logger.info("variant %s (%s)", variant.name, variant.paper_row)
            refs = _run_stages(vcfg, list(variant.stages), run_name=f"{vcfg.name}-pipeline",
                               parent_run_id=parent.run_id, extra_tags={"foresight.variant": variant.name})
            row: dict[str, Any] = {"variant": variant.name, "paper_row": variant.paper_row}
            if refs.get("eval.run_id"):
                row.update(ablation_columns(run_metrics(cfg, refs["eval.run_id"])))
            rows.append(row)
        parent.log_text(table_markdown(rows), "ablation_table.md")
        parent.log_table(rows, "ablation_table.json")
    print(table_markdown(rows))
    return {"ablation.run_id": parent.run_id, "rows": rows}


def ablation_columns(metrics: Mapping[str, float]) -> dict[str, float]:
    """``avg/<mode>/score`` plus, per mode, each table column averaged over the benchmarks."""
    out: dict[str, float] = {}
    for mode in ("direct", "planning"):
        for col in TABLE_COLUMNS:
            vals = [v for k, v in metrics.items() if k.endswith(f"/{mode}/{col}") and not k.startswith("avg/")]
            if vals:
                out[f"{mode}/{col}"] = sum(vals) / len(vals)
    return out


def table_markdown(rows: list[dict[str, Any]]) -> str:
    cols = sorted({k for r in rows for k in r} - {"variant", "paper_row"})
    lines = ["| variant | paper row | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append(f"| {r['variant']} | {r['paper_row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_deployments(cfg: PipelineConfig, cron: str = "0 3 * * 0", timezone: str = "UTC") -> list[Any]:
    """``pipeline`` on a retraining schedule and ``build_corpus`` on demand, for ``prefect.serve``.

    Parameters are stored in JSON mode, so credentials are masked there; the serving process
    fills them from its environment when a run starts (``revalidate``).
    """
    data = cfg.model_dump(mode="json")  # SecretStr -> "**********"
    for section in data["infra"].values():
        for field, value in section.items():
            if isinstance(value, str) and mask_text(value) != value:
                section[field] = MASK  # a URI with a password: the serving process's environment supplies it
    params = {"cfg": data}
    tags = ["foresight", cfg.name]
    return [
        pipeline.to_deployment(name=f"{cfg.name}-retrain", schedule=Cron(cron, timezone=timezone),
                               parameters=params, tags=tags, entrypoint_type=EntrypointType.MODULE_PATH,
                               description=f"The {cfg.name} pipeline, retrained on a schedule ({cron} {timezone})."),
        build_corpus.to_deployment(name=f"{cfg.name}-corpus", parameters=params, tags=tags,
                                   entrypoint_type=EntrypointType.MODULE_PATH,
                                   description=f"The {cfg.name} corpus, built on demand."),
    ]

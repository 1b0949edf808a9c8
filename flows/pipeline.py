"""The Prefect flows: ``build_corpus`` (stage 0) and ``pipeline`` (the whole DAG).

    from flows.pipeline import build_corpus, pipeline
    refs = pipeline(load_config("tiny"))
    # {"pipeline.run_id": ..., "corpus.manifest_uri": ..., "corpus.run_id": ..., "wm_amt.model_uri": ...}

Each flow's one parameter is ``PipelineConfig``: the Prefect UI builds its form from it,
deployments store it, and the flow validates it again when it starts (the cross-field checks a
UI form cannot run). Credentials never travel in flow parameters: a deployment stores them
masked, and a masked, empty or default infra field is filled from the environment of the
process running the flow (``revalidate``).

The DAG lives here and only here. Every stage is a Prefect task below with one signature,
``stage(cfg, refs, parent_run_id) -> new refs``, and each wraps one adapter of ``tasks``
(``corpus``, ``train``, ``rl``, ``evaluate``), which knows nothing of other stages. What feeds what is
decided here: every stage reads the corpus this pipeline built (``corpus_uri``), and every stage after
WM-AMT starts from the newest model of this pipeline run (``starting_model``: FE-SFT from WM-AMT's,
FC-RL from FE-SFT's, eval from FC-RL's; a stage that did not run is passed over, down to the config's
base model). Stages pass references (manifest and model URIs, MLflow run ids), never tensors, and
reuse their finished output when run again with the same config, inputs and code.
``pipeline`` runs the stages of ``cfg.stages`` in order, skipping any stage whose config says
``enabled: false``. MLflow: one parent run per flow run, one nested run per stage.
"""

from __future__ import annotations

import copy
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
from foresight_core.storage import is_local_uri, local_path
from tasks.runtime import setup_env
from tasks.tracking import MASK, config_yaml, flatten, mask_text, mlflow_run

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
# The stages as Prefect tasks, and the lineage rule. No Prefect retries on the Ray stages: Ray Train's
# FailureConfig already restarts a stage from its last checkpoint, and running the stage again resumes
# its unfinished MLflow run.

MODEL_STAGES = ("wm_amt", "fe_sft", "fc_rl")  # the stages that train a model, in pipeline order


def starting_model(stage: str, refs: Mapping[str, str]) -> str | None:
    """The lineage rule: the newest model that this pipeline run trained before ``stage`` (None: the base model)."""
    earlier = MODEL_STAGES[:MODEL_STAGES.index(stage)] if stage in MODEL_STAGES else MODEL_STAGES
    return next((refs[f"{s}.model_uri"] for s in reversed(earlier) if refs.get(f"{s}.model_uri")), None)


def corpus_uri(cfg: PipelineConfig, refs: Mapping[str, str]) -> str:
    """The corpus the stages read: the one this pipeline built, else the newest finished one of this config."""
    from tasks.corpus import find_corpus

    return find_corpus(cfg, refs.get("corpus.uri")).uri


def _stage_refs(stage: str, ref: dict[str, Any]) -> dict[str, str]:
    """The stage's references, and its format-capability check (``check/*`` metrics), which the CLI prints."""
    out = {f"{stage}.model_uri": str(ref["model_uri"]), f"{stage}.run_id": str(ref["run_id"]),
           f"{stage}.reused": str(ref["reused"]).lower()}
    out.update({f"{stage}.{k}": f"{v:.4g}" for k, v in sorted((ref.get("metrics") or {}).items())
                if k.startswith("check/")})
    return out


@task(name="corpus", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def corpus(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 0: play the environments with the behaviour policy on Ray Data, annotate z_t and q_t in
    hindsight, write the datasets with a manifest. Retried once: the build is idempotent (a folder
    without its manifest is rebuilt, a complete one reused). No Prefect result cache: reuse lives in
    the manifest, so it holds across Prefect servers and machines."""
    from tasks.corpus import run_corpus_stage

    return run_corpus_stage(cfg, parent_run_id)


@task(name="wm_amt", cache_policy=NO_CACHE)
def wm_amt(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 1: next-token loss over the annotated corpus, from the base model."""
    from tasks.train import run_sft_stage

    return _stage_refs("wm_amt", run_sft_stage("wm_amt", cfg, corpus_uri(cfg, refs),
                                               init_model_uri=starting_model("wm_amt", refs),
                                               parent_run_id=parent_run_id))


@task(name="fe_sft", cache_policy=NO_CACHE)
def fe_sft(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 2: assistant-token loss on the FE-SFT set, from WM-AMT's model when WM-AMT ran in this
    pipeline (the full method), else from the base model (the FE-SFT-only baseline)."""
    from tasks.train import run_sft_stage

    return _stage_refs("fe_sft", run_sft_stage("fe_sft", cfg, corpus_uri(cfg, refs),
                                               init_model_uri=starting_model("fe_sft", refs),
                                               parent_run_id=parent_run_id))


@task(name="fc_rl", cache_policy=NO_CACHE)
def fc_rl(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 3: foresight-conditioned GRPO on the corpus's RL tasks, from the newest model of this run."""
    from tasks.rl import run_fc_rl_stage

    return _stage_refs("fc_rl", run_fc_rl_stage(cfg, starting_model("fc_rl", refs), corpus_uri(cfg, refs),
                                                parent_run_id=parent_run_id))


@task(name="eval", cache_policy=NO_CACHE)
def evaluate(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 4: held-out benchmarks for the newest model of this run (else the base model): score,
    calibration, grounding, format and test-time planning."""
    from tasks.evaluate import run_eval_stage

    ref = run_eval_stage(cfg, starting_model("eval", refs), corpus_uri(cfg, refs), parent_run_id=parent_run_id)
    out = {"eval.run_id": str(ref["run_id"]), "eval.reused": str(ref["reused"]).lower()}
    for k in ("avg/direct/score", "avg/planning/score"):
        if k in ref["metrics"]:
            out[f"eval.{k}"] = f"{ref['metrics'][k]:.4f}"
    return out


STAGE_TASKS: dict[str, Any] = {"corpus": corpus, "wm_amt": wm_amt, "fe_sft": fe_sft, "fc_rl": fc_rl, "eval": evaluate}


def _run_stages(cfg: PipelineConfig, stages: list[str], run_name: str,
                parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> dict[str, str]:
    logger = get_run_logger()
    setup_env(cfg)  # Ray and MLflow defaults for a flow started by a worker rather than the CLI
    runnable: list[str] = []
    for stage in stages:
        if not stage_enabled(cfg, stage):
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
            refs.update(STAGE_TASKS[stage](cfg, dict(refs), parent.run_id))
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
    from tasks.tracking import run_metrics

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

"""The Prefect flows: ``build_corpus`` (stage 0), ``pipeline`` (the whole DAG) and ``retrain`` (the
pipeline on a fresh data version, what the schedule runs).

    from flows.pipeline import build_corpus, pipeline, retrain
    refs = pipeline(preset="tiny", overrides={"fc_rl.max_steps": 2})
    refs = pipeline(cfg=load_config("tiny"))
    # {"pipeline.run_id": ..., "corpus.manifest_uri": ..., "wm_amt.model_uri": ..., "registry.version": ...}

Parameters, the same for every flow (``flow_config``): ``preset`` (a preset name, default laptop) plus
``overrides`` (dotted paths to values, ``{"fc_rl.max_steps": 2}``), or ``cfg``, a whole
``PipelineConfig`` (the Prefect UI builds its typed form from it). Another system starting a run
through the API sends a preset and overrides, never a whole config: Prefect merges a run's parameters
into the deployment's one level deep, so a partial ``cfg`` would replace the deployment's. The flow
validates the result when it starts (the cross-field checks a UI form cannot run). Credentials never
travel in flow parameters: a deployment stores them masked, and infrastructure (MLflow, Ray, S3, the
work dir) comes from the environment of the process running the flow (``revalidate``).

The DAG lives here and only here. Every stage is a Prefect task below with one signature,
``stage(cfg, refs, parent_run_id) -> new refs``, and each wraps one adapter of ``tasks``
(``corpus``, ``train``, ``rl``, ``evaluate``), which knows nothing of other stages. What feeds what is
decided here: every stage reads the corpus this pipeline built (``corpus_uri``), and every stage after
WM-AMT starts from the newest model of this pipeline run (``starting_model``: FE-SFT from WM-AMT's,
relabel from FE-SFT's, FC-RL from relabel's or FE-SFT's, eval from FC-RL's; a stage that did not run is passed over, down to the config's
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
from foresight_core.config.load import ENV_OVERRIDES, ConfigError, load_config, set_path, validate
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
    data = _with_secrets(cfg) if isinstance(cfg, PipelineConfig) else copy.deepcopy(dict(cfg))
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


def flow_config(preset: str | None = None, overrides: Mapping[str, Any] | None = None,
                cfg: PipelineConfig | Mapping[str, Any] | None = None,
                environ: Mapping[str, str] = os.environ) -> PipelineConfig:
    """The config of a flow run from its parameters: ``cfg`` (a whole config) or ``preset`` (default
    laptop, with the environment's infrastructure), then every ``overrides`` path. Raises ``ConfigError``
    naming the parameter or path, before any work."""
    if cfg is not None and preset:
        raise ConfigError(f"flow parameters: give preset ({preset!r}) or cfg, not both")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"flow parameter overrides: expected a mapping of dotted paths to values, "
                          f"got {type(overrides).__name__}")
    base = revalidate(cfg, environ) if cfg is not None else load_config(preset or "laptop", env=dict(environ))
    if not overrides:
        return revalidate(base, environ) if cfg is None else base
    data = _with_secrets(base)
    for dotted, value in overrides.items():
        if not isinstance(dotted, str) or not dotted or dotted.startswith(".") or dotted.endswith("."):
            raise ConfigError(f"flow parameter overrides: {dotted!r} is not a dotted config path (e.g. fc_rl.max_steps)")
        set_path(data, dotted, value)
    return revalidate(validate(data, f"flow parameter overrides {sorted(overrides)}"), environ)


def _with_secrets(cfg: PipelineConfig) -> dict[str, Any]:
    """``cfg`` as JSON data with its real credentials (the JSON dump masks them)."""
    data = cfg.model_dump(mode="json")
    storage = cfg.infra.storage
    for name in ("key", "secret"):
        value = getattr(storage, name)
        data["infra"]["storage"][name] = value.get_secret_value() if value is not None else None
    return data


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


# ---------------------------------------------------------------------------------------------
# The stages as Prefect tasks, and the lineage rule. No Prefect retries on the Ray stages: Ray Train's
# FailureConfig already restarts a stage from its last checkpoint, and running the stage again resumes
# its unfinished MLflow run.

MODEL_STAGES = ("wm_amt", "fe_sft", "relabel", "fc_rl")  # the stages that train a model, in pipeline order


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


@task(name="relabel", cache_policy=NO_CACHE)
def relabel(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """Stage 2b (on demand): FE-SFT's model relabels q on part of the FE-SFT set with its own Monte Carlo
    value, then trains briefly on the relabelled trajectories; FC-RL starts from the result."""
    from tasks.train import run_relabel_stage

    return _stage_refs("relabel", run_relabel_stage(cfg, corpus_uri(cfg, refs), starting_model("relabel", refs),
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
    return _eval_refs(ref)


def _eval_refs(ref: dict[str, Any]) -> dict[str, str]:
    out = {"eval.run_id": str(ref["run_id"]), "eval.reused": str(ref["reused"]).lower()}
    for k in ("avg/direct/score", "avg/planning/score", "avg/planning_random/score"):
        if k in ref["metrics"]:
            out[f"eval.{k}"] = f"{ref['metrics'][k]:.4f}"
    return out


@task(name="eval_files", cache_policy=NO_CACHE)
def evaluate_files(cfg: PipelineConfig, model: str | None, benchmarks: list[str],
                   parent_run_id: str | None) -> dict[str, str]:
    """Any model on benchmark files given now: no corpus, no training; the eval run names the model it scored."""
    from foresight_core.config.envs import parse_benchmark
    from tasks.evaluate import benchmark_task_uris, run_eval_stage

    uris = benchmark_task_uris(cfg, [parse_benchmark(b) for b in benchmarks])
    return _eval_refs(run_eval_stage(cfg, model, parent_run_id=parent_run_id, task_uris=uris))


STAGE_TASKS: dict[str, Any] = {"corpus": corpus, "wm_amt": wm_amt, "fe_sft": fe_sft, "relabel": relabel,
                               "fc_rl": fc_rl, "eval": evaluate}


def lineage(cfg: PipelineConfig, refs: Mapping[str, str]) -> dict[str, str]:
    """What a registered model version records of where it came from (tags)."""
    out = {"foresight.config": cfg.name, "foresight.data_version": cfg.corpus.data_version or "-",
           "foresight.pipeline_run_id": refs.get("pipeline.run_id", ""), "prefect.flow_run_id": str(flow_run.id)}
    for k in ("corpus.key", "corpus.uri", "wm_amt.run_id", "fe_sft.run_id", "relabel.run_id", "fc_rl.run_id",
              "eval.run_id"):
        if refs.get(k):
            out[f"foresight.{k}"] = refs[k]
    return out


@task(name="register", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def register(cfg: PipelineConfig, refs: dict[str, str], parent_run_id: str | None) -> dict[str, str]:
    """After eval: the evaluated model (the newest this run trained) becomes a registered version with its
    lineage; the champion alias moves to it only when it beats the champion on the same held-out tasks."""
    from tasks.registry import register_and_promote

    model_uri = starting_model("eval", refs)
    if not model_uri or not refs.get("eval.run_id"):
        return {}
    out = register_and_promote(cfg, model_uri, refs["eval.run_id"], lineage(cfg, refs))
    get_run_logger().info("registry: %s version %s %s: %s", out["registry.model_name"], out["registry.version"],
                          "promoted" if out["registry.promoted"] == "true" else "not promoted", out["registry.reason"])
    return out


def _run_stages(cfg: PipelineConfig, stages: list[str], run_name: str, parent_run_id: str | None = None,
                extra_tags: dict[str, str] | None = None, register_model: bool = True) -> dict[str, str]:
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
        if "eval" in runnable and cfg.registry.enabled and register_model:
            refs.update(register(cfg, dict(refs), parent.run_id))
            if refs.get("registry.version"):
                parent.set_tags({"foresight.registry.version": refs["registry.version"],
                                 "foresight.registry.promoted": refs["registry.promoted"]})
        parent.log_dict(refs, "refs.json")
    return refs


@flow(name="build_corpus", log_prints=True)
def build_corpus(preset: str | None = None, overrides: dict[str, Any] | None = None,
                 cfg: PipelineConfig | None = None) -> dict[str, str]:
    """Stage 0: play the environments with the behaviour policy on Ray Data, annotate z_t and q_t in
    hindsight, write the WM-AMT / FE-SFT / RL / eval datasets with a manifest, record all in MLflow.

    Args:
        preset: A preset name (tiny, laptop, paper); default laptop. Not with ``cfg``.
        overrides: Dotted config paths to values, applied last, e.g. {"corpus.n_train_tasks": 50}.
        cfg: A whole pipeline config instead of a preset (the typed form).
    """
    config = flow_config(preset, overrides, cfg)
    return _run_stages(config, ["corpus"], run_name=f"{config.name}-build_corpus")


@flow(name="pipeline", log_prints=True)
def pipeline(preset: str | None = None, overrides: dict[str, Any] | None = None,
             cfg: PipelineConfig | None = None) -> dict[str, str]:
    """The whole method: corpus -> WM-AMT -> FE-SFT -> FC-RL -> eval (the stages in ``cfg.stages``),
    each stage reusing its finished output, all in one MLflow parent run; then the evaluated model is
    registered, and promoted to champion when it beats the current one.

    Args:
        preset: A preset name (tiny, laptop, paper); default laptop. Not with ``cfg``.
        overrides: Dotted config paths to values, applied last, e.g. {"fc_rl.max_steps": 2}.
        cfg: A whole pipeline config instead of a preset (the typed form).
    """
    config = flow_config(preset, overrides, cfg)
    return _run_stages(config, list(config.stages), run_name=f"{config.name}-pipeline")


@flow(name="evaluate_model", log_prints=True)
def evaluate_model(model: str = "base", benchmarks: list[str] | None = None, preset: str | None = None,
                   overrides: dict[str, Any] | None = None, cfg: PipelineConfig | None = None) -> dict[str, str]:
    """Evaluate any model on benchmark files, without building a corpus or training anything.

    Args:
        model: An MLflow model URI (runs:/..., models:/name@champion), a local Hugging Face folder, or "base"
            (the config's base model).
        benchmarks: Files in their public format: "NAME=PATH[,corpus=PASSAGES][,kind=search_qa|math][,limit=N]".
        preset: A preset name for the evaluation settings (default laptop). Not with ``cfg``.
        overrides: Dotted config paths to values, applied last, e.g. {"eval.max_turns": 6}.
        cfg: A whole pipeline config instead of a preset (the typed form).
    """
    from foresight_core.config.envs import parse_benchmark

    config = flow_config(preset, overrides, cfg)
    if not benchmarks:
        raise ConfigError("evaluate_model: give at least one benchmark (NAME=PATH[,corpus=...][,kind=...])")
    for spec in benchmarks:  # every spec checked before any work
        try:
            parse_benchmark(spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    setup_env(config)
    with mlflow_run(config, f"{config.name}-evaluate_model", stage="pipeline",
                    tags={"prefect.flow_run_id": str(flow_run.id), "foresight.stages": "eval"}) as parent:
        refs = {"pipeline.run_id": parent.run_id,
                **evaluate_files(config, None if model == "base" else model, list(benchmarks), parent.run_id)}
        parent.log_dict(refs, "refs.json")
    return refs


def scheduled_date() -> str:
    """The date this flow run was scheduled for (a run started by hand: the day it started), ISO."""
    when = flow_run.scheduled_start_time
    return when.date().isoformat()


@flow(name="retrain", log_prints=True)
def retrain(preset: str | None = None, overrides: dict[str, Any] | None = None,
            cfg: PipelineConfig | None = None, data_version: str | None = None) -> dict[str, str]:
    """Retraining: the pipeline on a fresh corpus (``corpus.data_version``), evaluated on the same held-out
    sets, then registered; the champion moves only when the new model beats it.

    Args:
        preset: A preset name (tiny, laptop, paper); default laptop. Not with ``cfg``.
        overrides: Dotted config paths to values, applied last, e.g. {"fc_rl.max_steps": 2}.
        cfg: A whole pipeline config instead of a preset (the typed form).
        data_version: The training data's version; default: the date the run was scheduled for.
    """
    config = flow_config(preset, overrides, cfg)
    version = data_version or scheduled_date()
    config = config.model_copy(update={"corpus": config.corpus.model_copy(update={"data_version": version})})
    config = revalidate(config)
    get_run_logger().info("retrain %s on data version %s", config.name, version)
    return _run_stages(config, list(config.stages), run_name=f"{config.name}-retrain-{version}",
                       extra_tags={"foresight.data_version": version})


def lane_share(cfg: PipelineConfig, table: AblationConfig) -> AblationConfig:
    """The table with each stage's CPU share when rows run side by side on a local Ray: its CPUs / lanes
    (``infra.ray.cpus_per_stage``, unless set), as a table-wide override that the rows' configs show."""
    if table.lanes == 1 or cfg.infra.ray.address or cfg.infra.ray.cpus_per_stage or \
            "infra.ray.cpus_per_stage" in table.overrides:
        return table
    import ray

    from tasks.runtime import node_cpus

    # the Ray this process already runs (a notebook's, a test's), else the one a stage will start
    cpus = max(node_cpus(), default=1) if ray.is_initialized() else \
        cfg.infra.ray.num_cpus or len(os.sched_getaffinity(0))
    share = max(1, cpus // table.lanes)
    return table.model_copy(update={"overrides": {**table.overrides, "infra.ray.cpus_per_stage": share}})


def in_lanes(work: Any, n: int, lanes: int) -> None:
    """``work(i)`` for i in 0..n-1, ``lanes`` at a time, taken in order; each thread sees this flow run's
    context (Prefect's run, its logger). After a failure no item starts: the first failure is raised once
    the items in flight have ended (a row never stops another half-way). Ctrl-C returns at once, starting
    nothing more; the stages in flight end as an interrupted stage does (resumed by its key next time)."""
    if lanes <= 1:
        for i in range(n):
            work(i)
        return
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor, wait

    failed = threading.Event()

    def guarded(ctx: contextvars.Context, i: int) -> None:
        if failed.is_set():
            return
        try:
            ctx.run(work, i)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="lane")
    futures = [pool.submit(guarded, contextvars.copy_context(), i) for i in range(n)]
    try:
        pending = set(futures)
        while pending:  # a timeout: a signal's handler runs only once this thread wakes
            pending = wait(pending, timeout=0.5).not_done
    except BaseException:  # KeyboardInterrupt: this thread alone gets it
        failed.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    for f in futures:
        f.result()  # the first failure, in the rows' order


@flow(name="ablation", log_prints=True)
def ablation(cfg: PipelineConfig, table: AblationConfig) -> dict[str, Any]:
    """The method table of METHOD.md in one flow run: every variant at every seed of ``table.seeds`` is the
    pipeline with its own stages, overrides and seed, nested under one MLflow run; finished stages are
    shared wherever config and inputs agree (the corpus across rows of a seed, WM-AMT / FE-SFT across the
    rows that train them alike). The table (``foresight_core.evidence``: means with intervals over tasks
    and seeds, paired differences against the reference row, planning against its random-of-K control,
    calibration over each row's seeds pooled) is logged as Markdown and JSON, and each row's reliability
    diagram and risk-coverage curve as PNGs under ``plots/<row>/``. ``table.lanes`` (row, seed) pipelines
    run at once (``in_lanes``), each stage on its share of a local Ray's CPUs (``lane_share``)."""
    from foresight_core.config.ablation import row_configs
    from foresight_core.evidence import RowRun, RowSpec, evidence_table, pooled_pairs, table_markdown
    from tasks.evaluate import CALIBRATION, TASK_SCORES, log_calibration_plots
    from tasks.progress import row_label
    from tasks.tracking import run_json, run_metrics

    cfg = revalidate(cfg)
    logger = get_run_logger()
    table = lane_share(cfg, table)
    # every override checked before any work
    runs_to_do = row_configs(cfg, table)
    results: list[RowRun | None] = [None] * len(runs_to_do)
    with mlflow_run(cfg, f"{cfg.name}-ablation", stage="ablation",
                    tags={"prefect.flow_run_id": str(flow_run.id), "foresight.lanes": str(table.lanes)}) as parent:
        parent.log_dict(table.model_dump(mode="json"), "ablation.json")

        def row(i: int) -> None:
            variant, seed, vcfg = runs_to_do[i]
            logger.info("variant %s seed %d (%s)", variant.name, seed, variant.paper_row)
            with row_label(f"{variant.name} s{seed}"):  # its stages' progress lines say which row they are
                refs = _run_stages(vcfg, list(variant.stages), run_name=f"{vcfg.name}-seed{seed}-pipeline",
                                   parent_run_id=parent.run_id,
                                   extra_tags={"foresight.variant": variant.name, "foresight.seed": str(seed)},
                                   register_model=False)  # variants are evidence, not candidates for champion
            if refs.get("eval.run_id"):
                results[i] = RowRun(variant.name, seed, run_metrics(cfg, refs["eval.run_id"]),
                                    run_json(cfg, refs["eval.run_id"], TASK_SCORES),
                                    # None from eval runs logged before the pairs: their seeds' means
                                    run_json(cfg, refs["eval.run_id"], CALIBRATION, optional=True))

        in_lanes(row, len(runs_to_do), table.lanes)
        done = [r for r in results if r is not None]
        specs = [RowSpec(v.name, v.paper_row, v.changes, v.plain_twin) for v in table.variants]
        rows = evidence_table(done, specs, table.reference, table.n_boot, table.level)
        markdown = table_markdown(rows, table.reference, table.level)
        parent.log_text(markdown, "ablation_table.md")
        parent.log_dict({"reference": table.reference, "level": table.level, "rows": rows}, "ablation_table.json")
        for variant in table.variants:  # each row's reliability and risk-coverage plots, its seeds pooled
            log_calibration_plots(parent, pooled_pairs([r for r in done if r.variant == variant.name]),
                                  prefix=variant.name)
    print(markdown)
    return {"ablation.run_id": parent.run_id, "rows": rows}


def make_deployments(preset: str | None = None, overrides: Mapping[str, Any] | None = None,
                     cfg: PipelineConfig | None = None, cron: str = "0 3 * * 0",
                     timezone: str = "UTC") -> list[Any]:
    """``retrain`` on a schedule, ``pipeline`` and ``build_corpus`` on demand, for ``prefect.serve``.

    Parameters are a preset and overrides (what ``foresight serve --preset ... --set ...`` was given);
    a whole ``cfg`` (``--config``) is stored in JSON mode, so credentials are masked there and the serving
    process fills them from its environment when a run starts (``revalidate``). Each deployment runs one
    flow run at a time; another one waits in the queue (``concurrency_limit``).
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    if cfg is not None:
        data = cfg.model_dump(mode="json")  # SecretStr -> "**********"
        for section in data["infra"].values():
            for field, value in section.items():
                if isinstance(value, str) and mask_text(value) != value:
                    section[field] = MASK  # a URI with a password: the serving process's environment supplies it
        params: dict[str, Any] = {"cfg": data}
        name = cfg.name
    else:
        params = {"preset": preset or "laptop", "overrides": dict(overrides or {})}
        name = flow_config(preset, overrides).name
    tags = ["foresight", name]
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    common = {"parameters": params, "tags": tags, "entrypoint_type": EntrypointType.MODULE_PATH,
              "concurrency_limit": one_at_a_time}
    return [
        retrain.to_deployment(name=f"{name}-retrain", schedule=Cron(cron, timezone=timezone), **common,
                              description=f"The {name} pipeline retrained on a fresh data version (the scheduled "
                                          f"date), {cron} {timezone}; the champion moves only when beaten."),
        pipeline.to_deployment(name=f"{name}-pipeline", **common,
                               description=f"The {name} pipeline on demand (finished stages are reused)."),
        build_corpus.to_deployment(name=f"{name}-corpus", **common,
                                   description=f"The {name} corpus, built on demand."),
    ]

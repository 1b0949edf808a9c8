"""After evaluation: the final model becomes a version in MLflow's Model Registry, with its lineage as
tags, and the champion alias moves to it only when it is earned (``foresight_core.promotion``). The
version is the servable agent (``tasks.serving``: a pyfunc bundling the weights, the tools and the agent
loop), logged into the weights' run beside them: ``mlflow models serve -m models:/<name>@champion``.

    ref = register_and_promote(cfg, model_uri="runs:/<run>/model", eval_run_id=..., lineage={...})
    ref["registry.version"], ref["registry.promoted"], ref["registry.reason"]

The comparison pairs the new evaluation's per-task scores (the eval run's ``eval_task_scores.json``)
with the champion's, found through the champion version's ``foresight.eval_run_id`` tag. Registering
is idempotent: a pipeline run again with every stage reused finds its version (same model run, same
eval run) and does not add another.
"""

from __future__ import annotations

from typing import Any

from foresight_core.config import PipelineConfig
from foresight_core.promotion import Decision, decide
from tasks.evaluate import TASK_SCORES
from tasks.tracking import artifact_json, mlflow_client

EVAL_RUN_TAG = "foresight.eval_run_id"
PROMOTED_TAG = "foresight.promoted"
REASON_TAG = "foresight.promotion_reason"


class RegistryError(RuntimeError):
    """The model or its evaluation cannot be registered; the message says which and why."""


def model_name(cfg: PipelineConfig) -> str:
    return cfg.registry.model_name or f"foresight-{cfg.name}"


def _run_and_path(model_uri: str) -> tuple[str, str]:
    if not model_uri.startswith("runs:/"):
        raise RegistryError(f"model {model_uri!r}: only a model logged by a stage (runs:/<run id>/<path>) is registered")
    run_id, _, path = model_uri[len("runs:/"):].partition("/")
    if not run_id or not path:
        raise RegistryError(f"model {model_uri!r}: expected runs:/<run id>/<path>")
    return run_id, path


def eval_scores(client: Any, eval_run_id: str, mode: str) -> dict[str, float] | None:
    """The per-task scores an eval run logged for ``mode`` (None: the run has none, e.g. an older run)."""
    data = artifact_json(client, eval_run_id, TASK_SCORES)
    if data is None:
        return None
    return {str(k): float(v) for k, v in (data.get(mode) or {}).items()}


def _existing(client: Any, name: str, run_id: str, eval_run_id: str) -> Any | None:
    for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if mv.tags.get(EVAL_RUN_TAG) == eval_run_id:
            return mv
    return None


def register_and_promote(cfg: PipelineConfig, model_uri: str, eval_run_id: str,
                         lineage: dict[str, str]) -> dict[str, str]:
    """Register ``model_uri`` (evaluated by ``eval_run_id``) and decide whether it takes the alias."""
    reg = cfg.registry
    client = mlflow_client(cfg)
    name = model_name(cfg)
    run_id, _ = _run_and_path(model_uri)
    new_scores = eval_scores(client, eval_run_id, reg.mode)
    if new_scores is None:
        raise RegistryError(f"eval run {eval_run_id} has no {TASK_SCORES}: the model cannot be compared")

    try:
        client.create_registered_model(name, description="Foresight agents: the pipeline's final models, "
                                       f"evaluated on the held-out sets; @{reg.alias} is the best so far.")
    except Exception as e:  # noqa: BLE001 -- already there (another run created it); anything else is re-raised
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) + str(e):
            raise

    mv = _existing(client, name, run_id, eval_run_id)
    if mv is not None and PROMOTED_TAG in mv.tags:  # this very evaluation was registered and decided before
        return _ref(name, mv.version, mv.tags[PROMOTED_TAG] == "true", mv.tags.get(REASON_TAG, ""), reg.alias)

    try:
        champion = client.get_model_version_by_alias(name, reg.alias)
    except Exception:  # noqa: BLE001 -- no version holds the alias yet
        champion = None
    if mv is None:
        from tasks.serving import log_agent

        source = log_agent(cfg, model_uri)  # the servable agent (pyfunc: weights, tools, loop) beside the weights
        tags = {**lineage, EVAL_RUN_TAG: eval_run_id, "foresight.model_uri": model_uri,
                f"foresight.score.{reg.mode}": f"{sum(new_scores.values()) / max(len(new_scores), 1):.4f}"}
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                         description=f"{cfg.name}: {model_uri}, evaluated by run {eval_run_id}")

    if champion is None:
        decision = decide(new_scores, None, reg.promote_margin)
    else:
        champ_eval = champion.tags.get(EVAL_RUN_TAG)
        champ_scores = eval_scores(client, champ_eval, reg.mode) if champ_eval else None
        decision = decide(new_scores, champ_scores or {}, reg.promote_margin)
        decision = Decision(**{**decision.as_dict(), "reason": f"{decision.reason} (champion: version {champion.version})"})
    if decision.promote:
        client.set_registered_model_alias(name, reg.alias, mv.version)
    client.set_model_version_tag(name, mv.version, PROMOTED_TAG, str(decision.promote).lower())
    client.set_model_version_tag(name, mv.version, REASON_TAG, decision.reason[:5000])
    return _ref(name, mv.version, decision.promote, decision.reason, reg.alias)


def _ref(name: str, version: str, promoted: bool, reason: str, alias: str) -> dict[str, str]:
    return {"registry.model_name": name, "registry.version": str(version), "registry.promoted": str(promoted).lower(),
            "registry.reason": reason, "registry.model_uri": f"models:/{name}/{version}",
            "registry.alias_uri": f"models:/{name}@{alias}"}

"""The agent as an MLflow model: a pyfunc around ``foresight_core.serving.Agent``.

    source = log_agent(cfg, weights_uri)   # "<artifact uri of the weights' run>/agent", registered by tasks.registry
    mlflow models serve -m "models:/foresight-laptop@champion" --env-manager local --host 127.0.0.1 --port 5001
    curl -d '{"dataframe_records": [{"question": "What is 6 * 7?", "env": "math"}]}' \\
         -H 'Content-Type: application/json' http://127.0.0.1:5001/invocations

The model folder bundles the weights and tokenizer (``artifacts/model``), the passages the agent searches
(``artifacts/passages.jsonl``: the procedural world's held-out passages, when the config has that world)
and ``agent.json`` (the ``serve`` and ``envs`` config sections and the turn format). A passages file given
at load time replaces the bundled one: ``FORESIGHT_PASSAGES=<path or s3:// URI>`` in the server's environment,
or ``mlflow.pyfunc.load_model(uri, model_config={"passages": path})``.

Each input row is ``{"question", "env"}`` plus, optionally, ``max_turns``, ``temperature``, ``plan_candidates``
and ``min_confidence``; each output row is the answer, the final and per-turn confidence, the turns, the
tokens and ``abstained`` (``foresight_core.serving``), or ``{"error": ...}`` for a bad row.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from foresight_core.config import PipelineConfig
from tasks.tracking import download_artifacts, mlflow_client, tracking_uri

AGENT_ARTIFACT = "agent"
PASSAGES_ENV = "FORESIGHT_PASSAGES"


class AgentModel(mlflow.pyfunc.PythonModel):
    """Loads the bundled model once per server process; ``predict`` answers rows (never raises on a bad row)."""

    _skip_type_hint_validation = True  # rows are checked one by one by the agent, each with its own error

    def load_context(self, context: Any) -> None:
        from foresight_core.config import EnvsConfig, ModelConfig
        from foresight_core.config.serve import ServeConfig
        from foresight_core.envs.loaders import load_passages

        spec = json.loads(Path(context.artifacts["agent_config"]).read_text())
        passages_uri = ((context.model_config or {}).get("passages") or os.environ.get(PASSAGES_ENV)
                        or context.artifacts.get("passages") or spec.get("passages_uri"))
        passages = load_passages(str(passages_uri)) if passages_uri else None
        self.agent = build_agent(ModelConfig(source="hf", name_or_path=context.artifacts["model"]),
                                 ServeConfig.model_validate(spec["serve"]), EnvsConfig.model_validate(spec["envs"]),
                                 passages, spec["turn_format"])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if hasattr(model_input, "to_dict"):  # a DataFrame (the scoring server's dataframe_records / _split)
            rows = model_input.to_dict(orient="records")
        elif isinstance(model_input, dict):
            rows = [model_input]
        else:
            rows = list(model_input)
        return self.agent.predict(rows, params)


def agent_spec(cfg: PipelineConfig) -> dict[str, Any]:
    """What the served agent needs of the pipeline's config."""
    return {"serve": cfg.serve.model_dump(mode="json"), "envs": cfg.envs.model_dump(mode="json"),
            "turn_format": cfg.eval.turn_format, "pipeline": cfg.name}


def world_passages(cfg: PipelineConfig) -> list[dict[str, str]] | None:
    """The procedural world's held-out passages (the world the evaluation asked about), if it is on."""
    sw = cfg.envs.search_world
    if not sw.enabled:
        return None
    from foresight_core.envs.search_world import load_world
    return load_world(sw.eval_seed, sw.n_entities).passages


def save_agent(cfg: PipelineConfig, model_dir: str, out_dir: str | Path) -> Path:
    """The pyfunc folder of the agent whose weights are in ``model_dir`` (a Hugging Face folder)."""
    out_dir = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix="agent-spec-"))
    spec = agent_spec(cfg)
    passages = world_passages(cfg)
    if passages is None:  # a benchmark corpus can be large: the config's URI, read at load time
        spec["passages_uri"] = next((s.corpus_path for s in cfg.envs.search_qa.sources if s.corpus_path), None)
    (work / "agent.json").write_text(json.dumps(spec, indent=2))
    artifacts = {"model": model_dir, "agent_config": str(work / "agent.json")}
    if passages is not None:
        with open(work / "passages.jsonl", "w") as f:
            for p in passages:
                f.write(json.dumps(p) + "\n")
        artifacts["passages"] = str(work / "passages.jsonl")
    # No signature: MLflow would enforce it on the whole request, and a bad row must get its own error
    # (``foresight_core.serving``); no input example: MLflow would load the model to check it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*")
        mlflow.pyfunc.save_model(path=str(out_dir), python_model=AgentModel(), artifacts=artifacts,
                                 pip_requirements=["foresight", "torch", "transformers", "mlflow"])
    return out_dir


def log_agent(cfg: PipelineConfig, weights_uri: str) -> str:
    """Package the agent of the weights at ``weights_uri`` (``runs:/<run>/model``) into that run's artifacts,
    beside the weights, and return its source URI for the registry. Done once per run: an existing ``agent``
    folder is reused."""
    from tasks.train import local_model_dir

    run_id, _, _ = weights_uri[len("runs:/"):].partition("/")
    client = mlflow_client(cfg)
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + AGENT_ARTIFACT
    if any(f.path == f"{AGENT_ARTIFACT}/MLmodel" for f in client.list_artifacts(run_id, AGENT_ARTIFACT)):
        return source
    with tempfile.TemporaryDirectory(prefix="agent-") as tmp:
        model_dir = local_model_dir(weights_uri, tracking_uri(cfg), Path(tmp) / "weights")
        folder = save_agent(cfg, model_dir, Path(tmp) / AGENT_ARTIFACT)
        client.log_artifacts(run_id, str(folder), AGENT_ARTIFACT)
    return source


def load_agent(cfg: PipelineConfig, model: str | None = None, passages: str | None = None) -> Any:
    """A ``foresight_core.serving.Agent`` for ``foresight ask``: a registered agent (``models:/<name>@alias``,
    ``models:/<name>/<version>``, or ``runs:/<run>/agent``) as it was packaged; or weights (``runs:/<run>/model``,
    a local Hugging Face folder, ``base``) with this config's tools and settings. ``model`` None: the config's
    registered champion. ``passages``: a passages file that replaces the agent's own."""
    from foresight_core.envs.loaders import load_passages

    from tasks.registry import model_name

    model = model or f"models:/{model_name(cfg)}@{cfg.registry.alias}"
    if model.startswith("models:/") or (model.startswith("runs:/") and model.rstrip("/").endswith(f"/{AGENT_ARTIFACT}")):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the turns are the display
        local = download_artifacts(model, tracking_uri(cfg), tempfile.mkdtemp(prefix="foresight-ask-"))
        if (Path(local) / "MLmodel").exists():
            loaded = mlflow.pyfunc.load_model(local, model_config={"passages": passages} if passages else None)
            return loaded.unwrap_python_model().agent
        model = local  # a version registered before agents were packaged: its source is the weights folder
    if model == "base":
        model_cfg = cfg.model
    else:
        from tasks.train import local_model_dir
        work = tempfile.mkdtemp(prefix="foresight-ask-")
        model_cfg = cfg.model.saved(local_model_dir(model, tracking_uri(cfg), work))
    rows = load_passages(passages) if passages else world_passages(cfg)
    return build_agent(model_cfg, cfg.serve, cfg.envs, rows, cfg.eval.turn_format, seed=cfg.seed)


def build_agent(model_cfg: Any, serve: Any, envs: Any, passages: Any, turn_format: str, seed: int = 0) -> Any:
    """The one way an ``Agent`` is made, packaged (``AgentModel.load_context``) or not (``load_agent``)."""
    from foresight_core.models import load_model
    from foresight_core.serving import Agent

    model, tokenizer = load_model(model_cfg, train=False, seed=seed)
    return Agent(model, tokenizer, serve, envs, passages=passages, turn_format=turn_format)

"""The flows: the tiny corpus through Prefect + Ray + MLflow, read back from MLflow; reuse;
the flow parameter as a UI form; deployments; credentials kept out of params, tags, artifacts
and Prefect's stored parameters. The S3 + MLflow-server test runs where .ci/run started them."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from foresight_core.config import ConfigError, PipelineConfig, load_config
from foresight_core.storage import is_complete
from tasks.tracking import MASK

SECRETS = ("AKIDFLOWTEST", "flow-test-secret-value")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_texts(client, run_id: str, path: str | None = None) -> dict[str, str]:
    """Every artifact of a run, as text."""
    out = {}
    for a in client.list_artifacts(run_id, path):
        if a.is_dir:
            out.update(_artifact_texts(client, run_id, a.path))
        else:
            local = client.download_artifacts(run_id, a.path)
            out[a.path] = Path(local).read_text()
    return out


def _run_text(client, run) -> str:
    """Params, tags and artifacts of a run as one string (to look for credentials in)."""
    arts = _artifact_texts(client, run.info.run_id)
    return json.dumps([run.data.params, run.data.tags, arts])


def test_flow_parameter_is_a_form() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import build_corpus, pipeline, retrain

    for f in (pipeline, build_corpus, retrain):
        schema = parameter_schema(f).model_dump_for_openapi()
        assert "required" not in schema  # every parameter has a default: a run may send only overrides
        props = schema["properties"]
        assert list(props)[:3] == ["preset", "overrides", "cfg"] and "Dotted config paths" in props["overrides"]["description"]
        defs = schema["definitions"]
        assert props["cfg"]["anyOf"][0] == {"$ref": "#/definitions/PipelineConfig"}
        # field docstrings become the form's help text; enums and defaults are there; secrets are password fields
        assert "Monte Carlo" in defs["CorpusConfig"]["properties"]["mc_rollouts"]["description"]
        assert defs["SFTConfig"]["properties"]["loss_on"]["enum"] == ["all", "assistant", "observation"]
        assert defs["CorpusConfig"]["properties"]["mc_rollouts"]["default"] == 16
        assert defs["StorageConfig"]["properties"]["secret"]["anyOf"][0]["format"] == "password"
    assert "scheduled" in parameter_schema(retrain).model_dump_for_openapi()["properties"]["data_version"]["description"]


def test_setup_env_embedded_default_and_user_values_win(tmp_path: Path) -> None:
    from tasks.runtime import setup_env

    env: dict[str, str] = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}  # the user's own choice stays
    cfg = load_config("tiny", overrides=[f"work_dir={tmp_path / 'w'}"], env={})
    set_now = setup_env(cfg, env)
    assert env["PREFECT_HOME"] == str(tmp_path / "w" / "prefect") and (tmp_path / "w" / "prefect").is_dir()
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true" and "PREFECT_SERVER_ANALYTICS_ENABLED" not in set_now
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_AUTH_MODE"] == "disabled"
    # pointed at servers: the Prefect API from the config, no PREFECT_HOME, Ray's own auth untouched
    env = {}
    cfg = load_config("tiny", env={"PREFECT_API_URL": "http://127.0.0.1:4200/api", "RAY_ADDRESS": "ray://h:10001",
                                   "FORESIGHT_WORK_DIR": "s3://b/w"})
    setup_env(cfg, env)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert not {"PREFECT_HOME", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"} & set(env)


def test_revalidate_fills_masked_fields_from_the_environment() -> None:
    from flows.pipeline import revalidate

    stored = load_config("tiny", env={"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "sekrit"}).model_dump(
        mode="json")
    assert stored["infra"]["storage"]["secret"] == MASK  # what a deployment stores
    stored["infra"]["tracking"]["tracking_uri"] = f"postgresql://u:{MASK}@db/mlflow"
    stored["work_dir"] = PipelineConfig().work_dir  # left at its default, as in deployments/prefect.yaml
    worker_env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "sekrit",
                  "MLFLOW_TRACKING_URI": "postgresql://u:pw@db/mlflow", "FORESIGHT_WORK_DIR": "s3://b/work",
                  "RAY_ADDRESS": "ray://ray-head:10001"}
    cfg = revalidate(stored, environ=worker_env)
    assert cfg.infra.storage.secret.get_secret_value() == "sekrit"
    assert cfg.infra.tracking.tracking_uri == "postgresql://u:pw@db/mlflow"
    assert cfg.work_dir == "s3://b/work" and cfg.infra.ray.address == "ray://ray-head:10001"
    # no environment: masked values become unset (s3fs / MLflow then look for their own)
    cfg = revalidate(stored, environ={})
    assert cfg.infra.storage.key is None and cfg.infra.tracking.tracking_uri is None
    # a local work dir becomes absolute (MLflow tags hold references that must not depend on the cwd)
    assert revalidate(load_config("tiny", env={}), environ={}).work_dir == str(Path("foresight-work/tiny").resolve())
    # a config object keeps its real secrets; a value set in the config beats the environment
    real = load_config("tiny", env={"AWS_SECRET_ACCESS_KEY": "mine"})
    again = revalidate(real, environ={"AWS_SECRET_ACCESS_KEY": "other", "FORESIGHT_WORK_DIR": "s3://b/w"})
    assert again.infra.storage.secret.get_secret_value() == "mine" and again.work_dir.endswith("foresight-work/tiny")
    # the checks a UI form cannot run happen here, naming the field
    bad = load_config("tiny", env={}).model_dump(mode="json")
    bad["fc_rl"]["engine"] = "vllm"
    with pytest.raises(ConfigError, match="fc_rl.*use_gpu"):
        revalidate(bad, environ={})


def test_deployments_schedule_and_masked_parameters() -> None:
    from flows.pipeline import make_deployments

    cfg = load_config("tiny", env={"AWS_ACCESS_KEY_ID": SECRETS[0], "AWS_SECRET_ACCESS_KEY": SECRETS[1],
                                   "MLFLOW_TRACKING_URI": "postgresql://u:pw-123@db/mlflow"})
    retrain, run, corpus = make_deployments(cfg=cfg, cron="30 2 * * 1", timezone="Europe/Paris")
    assert (retrain.name, run.name, corpus.name) == ("tiny-retrain", "tiny-pipeline", "tiny-corpus")
    assert retrain.entrypoint == "flows.pipeline.retrain" and run.entrypoint == "flows.pipeline.pipeline"
    (sched,) = retrain.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("30 2 * * 1", "Europe/Paris")
    assert run.schedules == corpus.schedules == []
    assert all(d.concurrency_limit == 1 and d.concurrency_options.collision_strategy == "ENQUEUE"
               for d in (retrain, run, corpus))  # one run at a time, the others queue
    text = json.dumps(retrain.parameters)
    assert not any(s in text for s in (*SECRETS, "pw-123"))
    PipelineConfig.model_validate(retrain.parameters["cfg"])  # still a valid flow parameter
    # from a preset: the parameters are the preset and its overrides, nothing else
    retrain, _, _ = make_deployments("tiny", {"fc_rl.max_steps": 1})
    assert retrain.parameters == {"preset": "tiny", "overrides": {"fc_rl.max_steps": 1}}


def test_flow_parameters_are_a_preset_and_dotted_overrides() -> None:
    from flows.pipeline import flow_config

    cfg = flow_config("tiny", {"fc_rl.max_steps": 7, "fe_sft.lr": 1e-5, "corpus.noise": {"wrong_query": 0.5}},
                      environ={"FORESIGHT_WORK_DIR": "s3://bucket/work", "AWS_SECRET_ACCESS_KEY": SECRETS[1]})
    tiny = load_config("tiny", env={})
    assert cfg.fc_rl.max_steps == 7 and cfg.fe_sft.lr == 1e-5 and cfg.corpus.noise.wrong_query == 0.5
    # every other field is the preset's, one level down and deeper alike
    assert cfg.fc_rl.group_size == tiny.fc_rl.group_size and cfg.corpus.noise.premature_answer == 0.2
    assert cfg.fe_sft.loss_on == "assistant" and cfg.model.source == "tiny"
    # infrastructure from the environment of the process running the flow
    assert cfg.work_dir == "s3://bucket/work" and cfg.infra.storage.secret.get_secret_value() == SECRETS[1]
    assert flow_config(None, None, environ={}).name == "laptop"  # no parameters: the laptop preset
    with pytest.raises(ConfigError, match=r"fc_rl.max_stepz"):
        flow_config("tiny", {"fc_rl.max_stepz": 2}, environ={})
    with pytest.raises(ConfigError, match=r"fc_rl.max_steps"):
        flow_config("tiny", {"fc_rl.max_steps": "many"}, environ={})
    with pytest.raises(ConfigError, match="give preset .* or cfg, not both"):
        flow_config("tiny", None, tiny, environ={})
    with pytest.raises(ConfigError, match="expected a mapping of dotted paths"):
        flow_config("tiny", ["fc_rl.max_steps=2"], environ={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown preset 'tinny'"):
        flow_config("tinny", None, environ={})


def test_local_ray_listens_on_loopback_only(ray_local) -> None:
    import ray

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}


@pytest.mark.slow
def test_build_corpus_flow_records_to_mlflow_and_reuses(prefect_server, ray_local, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.pipeline import build_corpus, pipeline
    from tasks.corpus import find_corpus

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", overrides=[f"work_dir={tmp_path / 'work'}", f"infra.tracking.tracking_uri={uri}",
                                         "infra.tracking.sample_trajectories=4"],
                      env={"AWS_ACCESS_KEY_ID": SECRETS[0], "AWS_SECRET_ACCESS_KEY": SECRETS[1]})
    t0 = time.perf_counter()
    state = build_corpus(cfg=cfg, return_state=True)
    build_s = time.perf_counter() - t0
    assert state.is_completed(), state
    refs = state.result()
    assert refs["corpus.reused"] == "false" and is_complete(refs["corpus.uri"])

    client = _client(uri)
    parent = client.get_run(refs["pipeline.run_id"])
    run = client.get_run(refs["corpus.run_id"])
    assert run.info.status == parent.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["foresight.stage"] == "corpus" and run.data.tags["foresight.reused"] == "false"
    assert run.data.tags["foresight.corpus.manifest_uri"] == refs["corpus.manifest_uri"]
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)

    # params: the resolved stage config (tiny.yaml: mc_rollouts 4, n_train_tasks 8)
    p = run.data.params
    assert p["corpus.mc_rollouts"] == "4" and p["corpus.n_train_tasks"] == "8" and p["seed"] == "0"
    assert parent.data.params["infra.storage.secret"] == MASK
    # metrics: 8 tasks per environment x 2 environments x 1 rollout = 16 trajectories
    m = run.data.metrics
    assert m["corpus.trajectories"] == 16 and m["corpus.counts.items"] == 16
    assert m["corpus.successes"] >= 1 and m["corpus.failures"] >= 1
    assert m["corpus.successes"] + m["corpus.failures"] == 16
    assert m["corpus.annotated_steps"] >= 1 and 0 <= m["corpus.q_labels.mean"] <= 1
    # datasets as inputs, by reference, with the stage that reads them
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"wm_amt", "fe_sft", "rl_tasks", "eval/search_world", "eval/gsm_symbolic"}
    ctx = {n: {t.key: t.value for t in d.tags}["mlflow.data.context"] for n, d in inputs.items()}
    assert ctx == {"wm_amt": "wm_amt", "fe_sft": "fe_sft", "rl_tasks": "fc_rl", "eval/search_world": "eval",
                   "eval/gsm_symbolic": "eval"}
    assert json.loads(inputs["rl_tasks"].dataset.source)["uri"].endswith("rl_tasks.jsonl")
    # artifacts: manifest and rendered trajectories in the foresight format
    arts = _artifact_texts(client, run.info.run_id)
    samples = arts["corpus/sample_trajectories.md"]
    assert samples.count("## ") >= 2 and "<imaginary>" in samples and "<confidence>" in samples
    assert "success=True" in samples and "success=False" in samples
    assert json.loads(arts["corpus/manifest.json"])["key"] == refs["corpus.key"]
    # credentials appear nowhere: MLflow params, tags, artifacts, Prefect's stored parameters
    for r in (parent, run):
        assert not any(s in _run_text(client, r) for s in SECRETS)
    with get_client(sync_client=True) as pc:
        stored = pc.read_flow_run(state.state_details.flow_run_id).parameters
    assert not any(s in json.dumps(stored) for s in SECRETS)

    # the same config again, through the whole-pipeline flow: the finished corpus is reused
    t0 = time.perf_counter()
    refs2 = pipeline(cfg=cfg.model_copy(update={"stages": ["corpus"]}))
    reuse_s = time.perf_counter() - t0
    assert refs2["corpus.reused"] == "true" and refs2["corpus.uri"] == refs["corpus.uri"]
    run2 = client.get_run(refs2["corpus.run_id"])
    assert run2.data.tags["foresight.reused"] == "true" and run2.data.metrics["corpus.trajectories"] == 16
    assert client.get_run(refs2["pipeline.run_id"]).data.tags["foresight.stages"] == "corpus"
    # a later stage finds the corpus by reference (MLflow tag), not by a path
    assert find_corpus(cfg).uri == refs["corpus.uri"]
    print(f"\nbuild_corpus flow (tiny): {build_s:.1f}s; pipeline flow reusing it: {reuse_s:.1f}s")


@pytest.mark.s3
@pytest.mark.server
@pytest.mark.slow
def test_corpus_on_s3_with_mlflow_server(ray_local) -> None:
    """The embedded default's code, pointed at an MLflow server and S3 (the docker-compose shape)."""
    mlflow_uri, s3 = os.environ.get("FORESIGHT_TEST_MLFLOW_URI"), os.environ.get("FORESIGHT_TEST_S3_ENDPOINT")
    if not (mlflow_uri and s3):
        pytest.skip("needs FORESIGHT_TEST_MLFLOW_URI and FORESIGHT_TEST_S3_ENDPOINT (.ci/run starts both)")
    import s3fs

    from flows.pipeline import corpus

    bucket = f"foresight-test-{uuid.uuid4().hex[:8]}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": s3,
             "MLFLOW_TRACKING_URI": mlflow_uri,
             "FORESIGHT_WORK_DIR": f"s3://{bucket}/work"}
    cfg = load_config("tiny", overrides=["envs.math.enabled=false", "infra.tracking.experiment=foresight-s3"],
                      env=creds)
    s3fs.S3FileSystem(**cfg.infra.storage.storage_options()).mkdir(bucket)
    refs = corpus.fn(cfg, {}, None)
    assert refs["corpus.uri"].startswith(f"s3://{bucket}/work/corpus/")
    assert is_complete(refs["corpus.uri"], cfg.infra.storage)
    client = _client(mlflow_uri)
    run = client.get_run(refs["corpus.run_id"])
    sources = [json.loads(d.dataset.source)["uri"] for d in run.inputs.dataset_inputs]
    assert sources and all(s.startswith(f"s3://{bucket}/") for s in sources)
    assert "<imaginary>" in _artifact_texts(client, run.info.run_id)["corpus/sample_trajectories.md"]
    assert "testing" not in json.dumps([run.data.params, run.data.tags])
    assert corpus.fn(cfg, {}, None)["corpus.reused"] == "true"

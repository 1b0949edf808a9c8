"""The operated stack, used as a team uses it: deployments registered with `prefect deploy`, a run
created through the Prefect REST API with a preset and overrides, executed by the worker with its
stages on a two-node Ray cluster, recorded in MLflow (Postgres + S3) and registered as a model
version; the retraining schedule produces runs; two runs at once do not share work; and no secret
lands anywhere. The servers come from the ``stack`` fixture (conftest.py). Tests run in order."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from typing import Any

import pytest

from servers import BIN, ROOT, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOYMENTS = {"laptop-retrain", "laptop-pipeline", "laptop-corpus"}
TINY = {"preset": "tiny", "overrides": {"wm_amt.max_steps": 2, "fe_sft.max_steps": 2, "fc_rl.max_steps": 2,
                                        "wm_amt.checkpoint_every": 1, "fe_sft.checkpoint_every": 1,
                                        "eval.max_tasks": 1, "eval.plan_candidates": 0}}


def api(stack: Stack, method: str, path: str, body: Any = None) -> Any:
    """One call of the Prefect REST API, as another system would make it (what `curl` does)."""
    req = urllib.request.Request(stack.prefect_api + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return json.loads(text) if text else None


def deployment(stack: Stack, name: str) -> dict:
    (dep,) = [d for d in api(stack, "POST", "/deployments/filter", {}) if d["name"] == name]
    return dep


def wait_run(stack: Stack, run_id: str, timeout: float = 1200, seen: list | None = None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = api(stack, "GET", f"/flow_runs/{run_id}")
        if seen is not None:
            seen.append(run["state"]["name"])
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} not finished after {timeout}s: {run['state']}\n"
                         f"worker log:\n{stack.services['prefect-worker'].tail(60)}")


def run_logs(stack: Stack, run_id: str) -> str:
    logs = api(stack, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> dict[str, dict]:
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                          "deployments/prefect.yaml"], cwd=ROOT, env=stack.env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {name: deployment(stack, name) for name in DEPLOYMENTS}


def test_deployments_are_registered_with_the_typed_form(stack: Stack, deployed: dict[str, dict]) -> None:
    assert set(deployed) == DEPLOYMENTS
    for dep in deployed.values():
        assert dep["parameters"] == {"preset": "laptop", "overrides": {}}
        assert dep["global_concurrency_limit"]["limit"] == 1 and dep["work_pool_name"] == "foresight"
        assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        schema = dep["parameter_openapi_schema"]
        props, defs = schema["properties"], schema["definitions"]
        assert {"preset", "overrides", "cfg"} <= set(props)
        assert props["cfg"]["anyOf"][0] == {"$ref": "#/definitions/PipelineConfig"}
        assert "Monte Carlo" in defs["CorpusConfig"]["properties"]["mc_rollouts"]["description"]
        assert defs["SFTConfig"]["properties"]["loss_on"]["enum"] == ["all", "assistant", "observation"]
        assert defs["StorageConfig"]["properties"]["secret"]["anyOf"][0]["format"] == "password"  # masked
    assert "data_version" in deployed["laptop-retrain"]["parameter_openapi_schema"]["properties"]


def test_the_retraining_schedule_produces_scheduled_runs(stack: Stack, deployed: dict[str, dict]) -> None:
    dep = deployed["laptop-retrain"]
    deadline, runs = time.time() + 90, []
    while time.time() < deadline and not runs:
        runs = api(stack, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}},
                                                       "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        time.sleep(2)
    assert runs, "the scheduler made no run of laptop-retrain"
    assert all(r["expected_start_time"] > time.strftime("%Y-%m-%dT%H:%M", time.gmtime()) for r in runs)
    for schedule in dep["schedules"]:  # the laptop runs are not this suite's to run; runs started by hand still are
        api(stack, "PATCH", f"/deployments/{dep['id']}/schedules/{schedule['id']}", {"active": False})


def test_a_tiny_pipeline_through_the_api_runs_on_the_cluster_and_lands_in_the_registry(
        stack: Stack, deployed: dict[str, dict]) -> None:
    import boto3
    from mlflow import MlflowClient

    dep = deployed["laptop-pipeline"]
    t0 = time.time()
    created = api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": TINY})
    assert created["parameters"] == TINY  # a preset and overrides, merged over the deployment's, nothing else
    run = wait_run(stack, created["id"])
    wall = time.time() - t0
    assert run["state"]["type"] == "COMPLETED", run["state"]["message"] + "\n" + run_logs(stack, created["id"])[-4000:]
    print(f"\ntiny pipeline through the API on the stack: {wall:.0f}s")

    client = MlflowClient(stack.mlflow_url)
    (exp,) = [e for e in client.search_experiments() if e.name == "foresight"]
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{created['id']}'")
    refs = json.loads(open(client.download_artifacts(parent.info.run_id, "refs.json")).read())
    stages = {s: client.get_run(refs[f"{s}.run_id"]) for s in ("corpus", "wm_amt", "fe_sft", "fc_rl", "eval")}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    assert stages["wm_amt"].data.params["wm_amt.max_steps"] == "2"  # the override reached the stage
    assert stages["fc_rl"].data.params["fc_rl.group_size"] == "2"  # and the rest is the tiny preset
    # the stages ran on the Ray cluster that `ray start` made, and say on which node
    nodes = subprocess.run([str(BIN / "python"), "-c", "import ray, json; ray.init(address=__import__('sys').argv[1], "
                            "log_to_driver=False); print(json.dumps([(n['NodeID'], n['NodeManagerAddress']) "
                            "for n in ray.nodes() if n['Alive']]))",
                            stack.ray_address], env=stack.env(), capture_output=True, text=True, timeout=120)
    alive = json.loads(nodes.stdout.strip().splitlines()[-1])
    node_ids, node_ips = {n[0] for n in alive}, {n[1] for n in alive}
    assert len(node_ids) == 2
    for s in ("wm_amt", "fe_sft", "fc_rl"):
        tags = stages[s].data.tags
        assert tags["foresight.worker.node_id"] in node_ids and tags["foresight.worker.node_ip"] in node_ips, s
    assert any(k.startswith("foresight.eval_actor.") and k.endswith(".node_id") and v in node_ids
               for k, v in stages["eval"].data.tags.items())
    # datasets recorded as inputs; artifacts in the S3 bucket
    assert {d.dataset.name for d in stages["wm_amt"].inputs.dataset_inputs} == {"wm_amt"}
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=stack.s3_key,
                      aws_secret_access_key=stack.s3_secret, region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow") for o in
            page.get("Contents", [])]
    assert any(k.endswith(f"{refs['fc_rl.run_id']}/artifacts/model/config.json") for k in keys), keys[:20]
    work = [o["Key"] for o in s3.list_objects_v2(Bucket="foresight", Prefix="work/corpus/").get("Contents", [])]
    assert any(k.endswith("manifest.json") for k in work)
    # the final model is a registered version with its lineage, and (the first) the champion
    version = client.get_model_version("foresight-tiny", refs["registry.version"])
    assert version.run_id == refs["fc_rl.run_id"]
    assert version.tags["foresight.corpus.key"] == refs["corpus.key"]
    assert version.tags["foresight.pipeline_run_id"] == parent.info.run_id
    assert version.tags["prefect.flow_run_id"] == created["id"]
    assert version.tags["foresight.eval.run_id"] == refs["eval.run_id"]
    assert str(client.get_model_version_by_alias("foresight-tiny", "champion").version) == refs["registry.version"]


def test_a_retrain_trains_on_fresh_data_and_promotion_is_earned(stack: Stack, deployed: dict[str, dict]) -> None:
    """The retraining deployment with a data version: a new corpus (not reused), new models, the same
    held-out tasks; the new version is registered, and the champion alias moves only if it won."""
    from mlflow import MlflowClient

    dep = deployed["laptop-retrain"]
    params = {**TINY, "data_version": "2026-12-06"}
    created = api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
    run = wait_run(stack, created["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]["message"] + "\n" + run_logs(stack, created["id"])[-4000:]
    client = MlflowClient(stack.mlflow_url)
    (exp,) = [e for e in client.search_experiments() if e.name == "foresight"]
    parents = client.search_runs([exp.experiment_id], "tags.`foresight.stage` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    first, retrain = (json.loads(open(client.download_artifacts(p.info.run_id, "refs.json")).read())
                      for p in (parents[0], parents[-1]))
    assert retrain["corpus.reused"] == "false" and retrain["corpus.key"] != first["corpus.key"]  # fresh data
    assert retrain["wm_amt.reused"] == "false" and retrain["fc_rl.run_id"] != first["fc_rl.run_id"]  # retrained
    assert client.get_run(parents[-1].info.run_id).data.tags["foresight.data_version"] == "2026-12-06"
    # the same held-out tasks were played, so the comparison is paired task by task
    scores = [json.loads(open(client.download_artifacts(r["eval.run_id"], "eval_task_scores.json")).read())["direct"]
              for r in (first, retrain)]
    assert set(scores[0]) == set(scores[1]) and scores[0]
    version = client.get_model_version("foresight-tiny", retrain["registry.version"])
    assert retrain["registry.version"] == "2" and version.tags["foresight.data_version"] == "2026-12-06"
    champion = str(client.get_model_version_by_alias("foresight-tiny", "champion").version)
    diff = sum(scores[1].values()) / len(scores[1]) - sum(scores[0].values()) / len(scores[0])
    if diff > 0:  # registry.promote_margin is 0 by default
        assert retrain["registry.promoted"] == "true" and champion == "2"
    else:
        assert retrain["registry.promoted"] == "false" and champion == "1"
        assert "does not beat the champion" in version.tags["foresight.promotion_reason"]


def test_an_mlflow_server_away_for_seconds_mid_stage_loses_nothing(stack: Stack, deployed: dict[str, dict]) -> None:
    """The MLflow server is stopped while WM-AMT trains and started again 8 s later on the same port and
    database: the clients retry, the run completes, and every step's loss is there."""
    from mlflow import MlflowClient

    dep = deployed["laptop-pipeline"]
    params = {"preset": "tiny", "overrides": {**TINY["overrides"], "seed": 7, "wm_amt.max_steps": 6,
                                              "stages": ["corpus", "wm_amt"]}}
    created = api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
    client = MlflowClient(stack.mlflow_url)
    deadline = time.time() + 600
    wm_run = None
    while time.time() < deadline and wm_run is None:  # until WM-AMT has logged its first loss
        try:
            (exp,) = [e for e in client.search_experiments() if e.name == "foresight"]
            runs = client.search_runs([exp.experiment_id], "tags.`foresight.stage` = 'wm_amt' and "
                                      "attributes.status = 'RUNNING'")
            wm_run = next((r for r in runs if "loss" in r.data.metrics), None)
        except Exception:  # noqa: BLE001
            pass
        time.sleep(1)
    assert wm_run is not None, "WM-AMT never started: " + run_logs(stack, created["id"])[-3000:]
    stack.restart("mlflow", down_s=8)
    run = wait_run(stack, created["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]["message"] + "\n" + run_logs(stack, created["id"])[-4000:]
    steps = sorted(m.step for m in client.get_metric_history(wm_run.info.run_id, "loss"))
    assert steps == list(range(1, 7)) and client.get_run(wm_run.info.run_id).info.status == "FINISHED"


def test_an_mlflow_server_that_stays_down_fails_the_run_naming_it(stack: Stack, deployed: dict[str, dict]) -> None:
    dep = deployed["laptop-pipeline"]
    params = {"preset": "tiny", "overrides": {**TINY["overrides"], "seed": 8, "wm_amt.max_steps": 6,
                                              "stages": ["corpus", "wm_amt"], "infra.tracking.http_retries": 2}}
    from mlflow import MlflowClient

    created = api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
    client = MlflowClient(stack.mlflow_url)
    deadline = time.time() + 600
    started = False
    while time.time() < deadline and not started:  # until WM-AMT has logged its first loss
        try:
            (exp,) = [e for e in client.search_experiments() if e.name == "foresight"]
            runs = client.search_runs([exp.experiment_id], "tags.`foresight.stage` = 'wm_amt' and "
                                      "attributes.status = 'RUNNING'")
            started = any("loss" in r.data.metrics for r in runs)
        except Exception:  # noqa: BLE001
            pass
        time.sleep(1)
    assert started, "WM-AMT never started: " + run_logs(stack, created["id"])[-3000:]
    t0 = time.time()
    stack.services["mlflow"].stop()
    try:
        run = wait_run(stack, created["id"], timeout=600)
        failed_after = time.time() - t0
    finally:
        stack.restart("mlflow", down_s=0)
    assert run["state"]["type"] in ("FAILED", "CRASHED")
    port = stack.mlflow_url.rsplit(":", 1)[1]
    text = run["state"]["message"] + run_logs(stack, created["id"])
    assert f"127.0.0.1:{port}" in text and "does not answer" in text, text[-3000:]
    print(f"\nMLflow down for good: the run failed {failed_after:.0f}s later, naming the server")


def test_two_runs_at_once_do_not_share_a_run_or_a_folder(stack: Stack, deployed: dict[str, dict]) -> None:
    from mlflow import MlflowClient

    dep = deployed["laptop-corpus"]
    params = {"preset": "tiny", "overrides": {"corpus.n_train_tasks": 3}}
    ids = [api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]
           for _ in range(2)]
    states: dict[str, list[str]] = {i: [] for i in ids}
    deadline = time.time() + 900
    while time.time() < deadline:
        now = {i: api(stack, "GET", f"/flow_runs/{i}")["state"] for i in ids}
        for i, st in now.items():
            states[i].append(st["name"])
        assert sum(st["type"] == "RUNNING" for st in now.values()) <= 1, now  # never both at once
        if all(st["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for st in now.values()):
            break
        time.sleep(1)
    assert all(s[-1] == "Completed" for s in states.values()), states
    assert any("AwaitingConcurrencySlot" in s or "Scheduled" in s[1:] for s in states.values()), states  # one waited
    client = MlflowClient(stack.mlflow_url)
    (exp,) = [e for e in client.search_experiments() if e.name == "foresight"]
    parents = [client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{i}'")[0] for i in ids]
    assert parents[0].info.run_id != parents[1].info.run_id
    corpus_runs = [json.loads(open(client.download_artifacts(p.info.run_id, "refs.json")).read()) for p in parents]
    assert corpus_runs[0]["corpus.run_id"] != corpus_runs[1]["corpus.run_id"]
    assert sorted(r["corpus.reused"] for r in corpus_runs) == ["false", "true"]  # the second found the first's


def test_no_secret_lands_anywhere_and_every_server_binds_loopback(stack: Stack, deployed: dict[str, dict]) -> None:
    import boto3
    import psutil

    needles = [stack.s3_secret.encode(), stack.db_password.encode()]
    found: list[str] = []
    # the databases: MLflow's (params, tags, registry) and Prefect's (parameters, logs, states)
    pg = next(p for p in (BIN, *sorted(__import__("glob").glob("/usr/lib/postgresql/*/bin"))) if
              os.path.exists(os.path.join(str(p), "pg_dump")))
    for db in ("mlflow", "prefect"):
        dump = subprocess.run([os.path.join(str(pg), "pg_dump"), "-h", "127.0.0.1", "-p", str(stack.pg_port), "-U",
                               "foresight", "-d", db], env={**os.environ, "PGPASSWORD": stack.db_password},
                              capture_output=True, timeout=120)
        assert dump.returncode == 0 and len(dump.stdout) > 1000, dump.stderr[-2000:]
        found += [f"postgres:{db}" for n in needles if n in dump.stdout]
    # every object in both buckets: artifacts, models, datasets, checkpoints
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=stack.s3_key,
                      aws_secret_access_key=stack.s3_secret, region_name="us-east-1")
    n_objects = 0
    for bucket in ("mlflow", "foresight"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                n_objects += 1
                found += [f"s3://{bucket}/{o['Key']}" for n in needles if n in body]
    assert n_objects > 20
    # Prefect's flow-run parameters and logs, through its API
    runs = api(stack, "POST", "/flow_runs/filter", {"limit": 200})
    for r in runs:
        text = (json.dumps(r["parameters"]) + run_logs(stack, r["id"])).encode()
        found += [f"prefect flow run {r['id']}" for n in needles if n in text]
    # Ray's logs (drivers, workers, raylets)
    for path in stack.ray_temp.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            found += [f"ray:{path}" for n in needles if n in data]
    assert found == []
    # every listening socket of every server the suite started is on 127.0.0.1, Ray's excepted: Ray 2.60
    # cannot keep a two-node cluster on loopback (servers.py says why); its listeners are printed
    for svc in stack.services.values():
        if svc.name.startswith("ray-"):
            print(f"\n{svc.name}: Ray listens on every interface (a known Ray limitation on one machine)")
            continue
        for pid in svc.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    assert c.laddr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), \
                        f"{svc.name} (pid {pid}) listens on {c.laddr}"

"""The Ray Train adapter: two-worker DDP stages recorded in MLflow, chained by reference, reused when
finished, resumed from their last checkpoint when the driver dies. Tiny model; MLflow on sqlite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foresight_core.config import load_config
from foresight_core.storage import DatasetWriter
from foresight_core.types import Action, Step, Task, Trajectory, Turn, WorldModelBlock

pytestmark = pytest.mark.slow


def trajectory(i: int) -> dict:
    wm = WorldModelBlock(f"look up item {i}, then answer", [f"Item{i}"], "nothing known yet", 0.5)
    steps = [Step(Turn(f"search item {i}", Action("search", f"item {i}"), wm), f"Doc 1 (Item{i}): item {i} is red"),
             Step(Turn("it is red", Action("answer", "red")), None)]
    return Trajectory(Task(f"task-{i}", "search", f"What colour is item {i}?", ["red"]), steps, True, 1.0).to_dict()


def write_corpus(root: Path) -> str:
    """A corpus folder as the corpus stage writes it: datasets + manifest.json (written last)."""
    uri = str(root / "corpus")
    rows = [{"kind": "trajectory", "split": "wm_amt", "annotated": True, "trajectory": trajectory(i)}
            for i in range(24)] + [{"kind": "text", "split": "wm_amt", "text": "Item 3 is a red thing."}]
    held_out = [Task("sw-0", "search", "Who founded the institute?", ["x"], {"world_seed": 7, "n_entities": 24}),
                Task("m-0", "math", "What is 2 + 2?", ["4"])]
    with DatasetWriter(uri) as w:
        w.write_rows("wm_amt.jsonl", rows)
        w.write_rows("fe_sft.jsonl", [{**r, "split": "fe_sft"} for r in rows[:12]])
        w.write_rows("eval/search_world.jsonl", [held_out[0].to_dict()])
        w.write_rows("eval/gsm_symbolic.jsonl", [held_out[1].to_dict()])
        w.commit({"stage": "corpus", "datasets": {"wm_amt": {"file": "wm_amt.jsonl"},
                                                   "fe_sft": {"file": "fe_sft.jsonl"},
                                                   "eval/search_world": {"file": "eval/search_world.jsonl"},
                                                   "eval/gsm_symbolic": {"file": "eval/gsm_symbolic.jsonl"}}})
    return uri


def overrides(tmp_path: Path, mlflow_uri: str, **extra: object) -> list[str]:
    base = {"work_dir": str(tmp_path / "work"), "infra.tracking.tracking_uri": mlflow_uri,
            "wm_amt.seq_len": 128, "fe_sft.seq_len": 128, "wm_amt.max_steps": 2, "fe_sft.max_steps": 2,
            "wm_amt.eval_every": 2, "fe_sft.eval_every": 2, "wm_amt.checkpoint_every": 2,
            "fe_sft.checkpoint_every": 2, "wm_amt.eval_share": 0.2, "fe_sft.eval_share": 0.2,
            "model.tiny_hidden": 32, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def test_two_worker_stages_chain_through_mlflow_and_are_reused(tmp_path: Path, mlflow_uri: str, ray_local):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from tasks.tracking import start_run
    from tasks.train import run_sft_stage

    corpus = write_corpus(tmp_path)
    cfg = load_config("tiny", overrides=overrides(tmp_path, mlflow_uri, **{"wm_amt.scaling.num_workers": 2}), env={})
    parent = start_run(cfg, "pipeline", stage="pipeline")
    wm = run_sft_stage("wm_amt", cfg, corpus, parent_run_id=parent.run_id)
    fe = run_sft_stage("fe_sft", cfg, corpus, init_model_uri=wm["model_uri"], parent_run_id=parent.run_id)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(wm["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert [m.step for m in client.get_metric_history(wm["run_id"], "loss")] == [1, 2]  # rank 0 only, once a step
    for key in ("eval_loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in run.data.metrics, key
    assert run.data.params["wm_amt.loss_on"] == "all" and run.data.params["model.source"] == "tiny"
    assert run.data.tags["foresight.input.corpus_manifest"] == f"{corpus}/manifest.json"
    assert run.data.tags["foresight.output.model_uri"] == wm["model_uri"]
    assert run.data.tags["foresight.worker.world_size"] == "2"
    assert run.data.tags["foresight.worker.torch_threads"] == "1"  # two workers share the 2 CPUs of ray_local
    assert "glibc.malloc.mmap_max=0" in run.data.tags["foresight.worker.glibc_tunables"]  # reached the workers
    # finished and in MLflow: its Ray checkpoints (weights + optimiser state) are deleted (infra.ray default)
    assert wm["checkpoint"] is None and run.data.tags["foresight.output.checkpoints_deleted"] == "true"
    assert run.data.tags["foresight.ray_run"].startswith(str(tmp_path / "work" / "ray"))
    assert not Path(run.data.tags["foresight.ray_run"]).exists()

    fe_run = client.get_run(fe["run_id"])
    assert fe_run.data.tags["foresight.input.init_run_id"] == wm["run_id"]  # the input, by reference
    assert fe_run.data.params["fe_sft.loss_on"] == "assistant"
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(fe["model_uri"], dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_uri)
    assert AutoModelForCausalLM.from_pretrained(local).config.hidden_size == 32  # loadable HF folder
    # the format-capability check (tiny preset: FE-SFT only, 2 held-out tasks) at the final step, in the reference
    check = {k: v for k, v in fe_run.data.metrics.items() if k.startswith("check/")}
    assert check["check/n_tasks"] == 2 and 0.0 <= check["check/format_rate"] <= 1.0
    assert {"check/valid_turn_rate", "check/success_rate", "check/search_world/format_rate",
            "check/gsm_symbolic/success_rate"} <= set(check)
    assert [m.step for m in client.get_metric_history(fe["run_id"], "check/format_rate")] == [2]
    assert {k: fe["metrics"][k] for k in check} == check
    assert not any(k.startswith("check/") for k in run.data.metrics)  # WM-AMT: off

    again = run_sft_stage("fe_sft", cfg, corpus, init_model_uri=wm["model_uri"], parent_run_id=parent.run_id)
    assert again["reused"] and again["run_id"] == fe["run_id"]
    assert {k: again["metrics"][k] for k in check} == check
    n_runs = len(client.search_runs([run.info.experiment_id]))
    assert n_runs == 3  # pipeline + two stages; the reuse started nothing


DRIVER = """
import json, sys
from foresight_core.config import load_config
from tasks.train import run_sft_stage
cfg = load_config("tiny", overrides=json.loads(sys.argv[1]), env={})
run_sft_stage("wm_amt", cfg, sys.argv[2])
"""


def test_a_stage_whose_driver_dies_resumes_from_its_last_checkpoint(tmp_path: Path, mlflow_uri: str, ray_local):
    import ray
    from mlflow import MlflowClient

    from tasks.train import run_sft_stage

    corpus = write_corpus(tmp_path)
    over = overrides(tmp_path, mlflow_uri, **{"wm_amt.max_steps": 12, "wm_amt.eval_every": 12,
                                              "infra.ray.address": ray.get_runtime_context().gcs_address,
                                              "infra.tracking.stage_lease_s": 10,  # the dead driver's lease lapses
                                              "infra.ray.keep_finished_checkpoints": True})
    # a driver in its own process, on this test's Ray cluster; killed once its first checkpoint is stored
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(over), corpus], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    storage = tmp_path / "work" / "ray"

    def registered() -> bool:  # Ray Train has recorded the checkpoint in its snapshot
        snaps = list(storage.glob("*/checkpoint_manager_snapshot.json"))
        return bool(snaps) and "step_000002" in snaps[0].read_text()

    deadline = time.time() + 240
    while not registered() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert registered(), "the first driver stored no checkpoint"
    # Ray ends the dead driver's actors (train controller, workers) within seconds: their CPUs come back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, "the dead driver's Ray Train workers still hold their CPUs"
        time.sleep(0.5)

    # the same stage started again: same MLflow run, Ray restores the latest checkpoint
    cfg = load_config("tiny", overrides=over, env={})
    ref = run_sft_stage("wm_amt", cfg, corpus)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_run(ref["run_id"]).info.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(ref["run_id"], "loss")]
    assert steps.count(1) == 1  # not trained from scratch again
    assert set(steps) == set(range(1, 13))
    assert Path(ref["checkpoint"]).name == "step_000012"


def test_a_killed_train_worker_is_restarted_from_the_last_checkpoint(tmp_path: Path, mlflow_uri: str, ray_local):
    """FailureConfig: Ray Train restarts the worker group from the latest checkpoint; the stage ends with its
    configured step count in its one MLflow run, losing at most one checkpoint interval."""
    import threading

    import psutil
    from mlflow import MlflowClient

    from tasks.train import run_sft_stage

    corpus = write_corpus(tmp_path)
    cfg = load_config("tiny", overrides=overrides(tmp_path, mlflow_uri, **{
        "wm_amt.max_steps": 8, "wm_amt.eval_every": 8, "wm_amt.checkpoint_every": 2,
        "infra.ray.keep_finished_checkpoints": True}), env={})
    storage = tmp_path / "work" / "ray"
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            snaps = list(storage.glob("*/checkpoint_manager_snapshot.json"))
            if snaps and "step_000002" in snaps[0].read_text():
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    killer.start()
    ref = run_sft_stage("wm_amt", cfg, corpus)
    killer.join()
    assert killed, "no Ray Train worker process was found to kill"
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_run(ref["run_id"]).info.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, not two
    steps = [m.step for m in client.get_metric_history(ref["run_id"], "loss")]
    assert set(steps) == set(range(1, 9)) and Path(ref["checkpoint"]).name == "step_000008"
    assert steps.count(1) == steps.count(2) == 1  # resumed from step 2, not from scratch
    assert all(steps.count(k) <= 2 for k in range(3, 9))  # at most one checkpoint interval trained twice

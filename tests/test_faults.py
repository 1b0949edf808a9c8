"""Faults on the tiny preset, as a user meets them: the flow's process killed mid-pipeline and started
again (finished stages reused, the interrupted one resumed in its own MLflow run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _runs(uri: str, stage: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("foresight")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`foresight.stage` = '{stage}'")


def test_a_killed_pipeline_started_again_reuses_finished_stages_and_resumes_the_interrupted_one(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--set", f"work_dir={tmp_path / 'work'}",
            "--set", f"infra.tracking.tracking_uri={uri}", "--set", "infra.tracking.stage_lease_s=5",
            "--set", "fe_sft.max_steps=6", "--set", "fe_sft.checkpoint_every=2", "--set", "fe_sft.eval_every=6",
            "--set", "stages=[corpus, wm_amt, fe_sft]"]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    t0 = time.time()
    first = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:  # kill it once FE-SFT has stored a checkpoint
        if list((tmp_path / "work" / "ray").glob("*fe_sft*/checkpoint_manager_snapshot.json")):
            snap = next((tmp_path / "work" / "ray").glob("*fe_sft*/checkpoint_manager_snapshot.json"))
            if "step_000002" in snap.read_text():
                break
        time.sleep(0.5)
    assert first.poll() is None, first.stderr.read().decode()[-3000:] if first.stderr else ""
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.time() - t0
    (interrupted,) = _runs(uri, "fe_sft")
    assert interrupted.info.status == "RUNNING"  # what a killed process leaves behind

    t1 = time.time()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    rerun_s = time.time() - t1
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client = MlflowClient(uri)
    parents = sorted(_runs(uri, "pipeline"), key=lambda r: r.info.start_time)
    refs = json.loads(Path(client.download_artifacts(parents[-1].info.run_id, "refs.json")).read_text())
    assert refs["corpus.reused"] == "true" and refs["wm_amt.reused"] == "true"
    assert refs["fe_sft.run_id"] == interrupted.info.run_id and refs["fe_sft.reused"] == "false"  # resumed, same run
    assert len(_runs(uri, "wm_amt")) == 1 and len(_runs(uri, "fe_sft")) == 1
    steps = [m.step for m in client.get_metric_history(refs["fe_sft.run_id"], "loss")]
    assert set(steps) == set(range(1, 7)) and steps.count(1) == 1  # from its checkpoint, not from scratch
    wall = {s: float(refs[f"{s}.wall_s"]) for s in ("corpus", "wm_amt", "fe_sft")}
    print(f"\nkilled after {killed_at:.0f}s; the re-run took {rerun_s:.0f}s: " +
          ", ".join(f"{s} {w:.1f}s" for s, w in wall.items()))

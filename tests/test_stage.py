"""The one stage protocol on a real MLflow store (sqlite): reuse, resume after a failure, and two
callers with the same key at once (one trains, the other waits and reuses), a lapsed lease taken over."""

from __future__ import annotations

import threading
import time

import pytest

from foresight_core.config import load_config
from tasks.stage import Launched, StageSpec, claim, run_stage, stage_key
from tasks.tracking import mlflow_client


@pytest.fixture
def cfg(tmp_path):
    return load_config("tiny", overrides=[f"work_dir={tmp_path / 'work'}", "infra.tracking.stage_lease_s=5"], env={})


def spec_for(cfg, launch, produces_model=False):
    return StageSpec(stage="eval", cfg=cfg, entries=("foresight_core.promotion",), inputs=[], launch=launch,
                     produces_model=produces_model)


def test_a_finished_stage_is_reused_and_a_failed_one_resumed_in_its_own_run(cfg):
    calls: list[str] = []

    def failing(tracker, key):
        calls.append(tracker.run_id)
        raise RuntimeError("the job died")

    with pytest.raises(RuntimeError, match="the job died"):
        run_stage(spec_for(cfg, failing))
    client = mlflow_client(cfg)
    assert client.get_run(calls[0]).info.status == "FAILED"

    def ok(tracker, key):
        calls.append(tracker.run_id)
        tracker.log_metrics({"score": 1.0})  # a job logs its own metrics; a reuse reads them from the run
        return Launched({"score": 1.0})

    first = run_stage(spec_for(cfg, ok))
    assert first["run_id"] == calls[0] == calls[1] and not first["reused"]  # the failed run, continued
    again = run_stage(spec_for(cfg, ok))
    assert again["reused"] and again["run_id"] == first["run_id"] and len(calls) == 2
    assert again["metrics"]["score"] == 1.0


def test_two_callers_with_one_key_share_one_run_and_one_job(cfg):
    calls: list[str] = []
    refs: list[dict] = []

    def slow(tracker, key):
        calls.append(tracker.run_id)
        time.sleep(4)
        return Launched({"score": 0.5})

    threads = [threading.Thread(target=lambda: refs.append(run_stage(spec_for(cfg, slow)))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=120)
    assert len(calls) == 1  # one job ran; the other caller waited for it
    assert len(refs) == 2 and refs[0]["run_id"] == refs[1]["run_id"] == calls[0]
    assert sorted(r["reused"] for r in refs) == [False, True]
    runs = mlflow_client(cfg).search_runs([r.experiment_id for r in mlflow_client(cfg).search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]  # no second run, none left RUNNING


def test_a_stage_whose_holder_died_is_resumed_once_its_lease_lapses(cfg):
    spec = spec_for(cfg, None)
    dead = claim(spec, stage_key(spec), None, owner="a-process-that-died")  # holds a 5 s lease, never renews it
    t0 = time.time()
    calls: list[str] = []

    def ok(tracker, key):
        calls.append(tracker.run_id)
        return Launched()

    ref = run_stage(spec_for(cfg, ok))
    assert calls == [dead.run_id] and ref["run_id"] == dead.run_id and not ref["reused"]
    assert time.time() - t0 >= 3  # it waited for the lease to lapse before taking the run over


def test_the_key_leaves_out_what_only_measures_or_speeds_up(tmp_path):
    base = load_config("tiny", overrides=[f"work_dir={tmp_path}"], env={})

    def key(*overrides):
        c = load_config("tiny", overrides=[f"work_dir={tmp_path}", *overrides], env={})
        return stage_key(StageSpec(stage="fe_sft", cfg=c, entries=("foresight_core.sft",), inputs=[], launch=None))

    same = key()
    assert base.fe_sft.format_check_tasks > 0
    # the format check plays the saved model after training: it does not change the model
    assert key("fe_sft.format_check_tasks=0") == same
    assert key("fe_sft.format_check_max_turns=2", "fe_sft.format_check_temperature=0") == same
    assert key("fe_sft.scaling.cpus_per_worker=1") == same
    # what the model learns from is in it
    assert key("fe_sft.lr=3e-5") != same and key("fe_sft.max_steps=7") != same and key("seed=3") != same


def test_a_reused_stage_says_what_its_check_lacks():
    from tasks.train import check_mismatch

    ref = {"run_id": "r1", "model_uri": "runs:/r1/model", "metrics": {"check/n_tasks": 6.0, "loss": 0.2}}
    assert check_mismatch("fe_sft", 6, ref) is None
    assert check_mismatch("fe_sft", 0, ref) is None  # a check nobody asked for is still reported
    assert "on 6 tasks, not the fe_sft.format_check_tasks=2" in check_mismatch("fe_sft", 2, ref)
    none = {**ref, "metrics": {"loss": 0.2}}
    assert "made no format check" in check_mismatch("fe_sft", 6, none) and "runs:/r1/model" in check_mismatch("fe_sft", 6, none)
    assert check_mismatch("fe_sft", 0, none) is None

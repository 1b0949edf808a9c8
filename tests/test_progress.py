"""Progress on the driver's terminal: the worker-side tag (``foresight_core.tracking.Progress``), the
line built from a run's metrics and tags, its plain (non-terminal) rendering, and the poller."""

from __future__ import annotations

import io
import json

from foresight_core.tracking import PROGRESS_TAG, MemoryTracker, Progress
from tasks.progress import (Display, RunWatcher, Status, clock, eta, merge_states, stage_status,
                                      stage_summary)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _tag(tracker: MemoryTracker) -> dict:
    return json.loads(tracker.tags[PROGRESS_TAG])


def test_progress_tag_is_throttled_but_phases_are_written_at_once() -> None:
    tracker, now = MemoryTracker(), FakeClock()
    writes = []
    tracker.set_tags = lambda tags: writes.append(json.loads(tags[PROGRESS_TAG]))  # type: ignore[method-assign]
    p = Progress(tracker, min_interval_s=2.0, clock=now)
    p.phase("train", total=10, unit="steps")
    for step in range(1, 6):  # a step every 0.5 s: written at t=0 (phase), then t=2.0 (step 4)
        now.t += 0.5
        p.update(step)
    assert [(w["phase"], w["done"]) for w in writes] == [("train", 0), ("train", 4)]
    assert writes[-1]["elapsed_s"] == 2.0 and writes[-1]["total"] == 10 and writes[-1]["start"] == 0
    p.phase("format check", total=2, unit="episodes")  # a new phase: at once, whatever the interval
    p.episodes()(1, 2, 1)  # inside the interval: dropped ...
    now.t += 2.0
    p.episodes()(2, 2, 2)  # ... and the next update carries the newer state
    assert [(w["phase"], w["done"]) for w in writes[2:]] == [("format check", 0), ("format check", 2)]
    p.episodes("rollouts")(3, 8, 1)
    now.t += 2.0
    p.episodes("rollouts")(5, 8, 2)
    assert writes[-1]["detail"] == "rollouts 5/8 episodes, turn 2"


def test_progress_without_a_tracker_is_a_no_op() -> None:
    Progress(None).phase("train", total=3, unit="steps")  # NullTracker: nothing to assert, nothing raised


def test_loops_sharing_a_tracker_share_one_phase_history() -> None:
    tracker = MemoryTracker()
    assert Progress.of(tracker) is Progress.of(tracker) and Progress.of(None) is not Progress.of(None)
    Progress.of(tracker).phase("loading the model")
    Progress.of(tracker).phase("train", total=3, unit="steps")
    Progress.of(tracker).update(3, force=True)
    Progress.of(tracker).phase("format check", total=2, unit="episodes")
    past = _tag(tracker)["past"]
    assert [(p["phase"], p["done"], p["total"]) for p in past] == [("loading the model", 0, None), ("train", 3, 3)]


def test_a_finished_stage_leaves_where_its_time_went() -> None:
    tags = {PROGRESS_TAG: json.dumps({
        "phase": "logging the model to MLflow", "done": 0, "total": None, "unit": "", "elapsed_s": 3.2,
        "past": [{"phase": "loading the model", "done": 0, "total": None, "unit": "", "s": 7.9},
                 {"phase": "tokenising and packing the data", "done": 0, "total": None, "unit": "", "s": 0.2},
                 {"phase": "train", "done": 3, "total": 3, "unit": "steps", "s": 4.4},
                 {"phase": "format check", "done": 2, "total": 2, "unit": "episodes", "s": 0.6}]})}
    assert stage_summary("fe_sft", {"loss": 2.5, "tokens_per_s": 900.0}, tags) == (
        "loading the model 0:08 · train 3/3 steps 0:04 · format check 2/2 episodes 0:01 · "
        "logging the model to MLflow 0:03 | loss 2.500 | tok/s 900")


def test_eta_from_the_rate_since_the_phase_began() -> None:
    # 10 steps in 20 s since step 5 (a resumed run) -> 2 s a step; 35 left -> 70 s
    assert eta({"done": 15, "total": 50, "start": 5, "elapsed_s": 20.0}) == 70.0
    assert eta({"done": 5, "total": 50, "start": 5, "elapsed_s": 20.0}) is None  # no rate yet
    assert eta({"done": 3, "total": None, "elapsed_s": 20.0}) is None
    assert clock(42) == "0:42" and clock(3725) == "1:02:05"


def test_stage_status_of_a_training_step_shows_loss_tokens_and_eta() -> None:
    tags = {PROGRESS_TAG: json.dumps({"phase": "train", "done": 12, "total": 100, "unit": "steps", "start": 0,
                                      "detail": "", "elapsed_s": 24.0}), "mlflow.runName": "x"}
    metrics = {"loss": 2.31049, "tokens_per_s": 1234.0, "lr": 1e-4}
    st = stage_status("wm_amt", metrics, tags)
    # 24 s for 12 steps -> 2 s a step, 88 left -> 176 s = 2:56
    assert st.text() == "train 12/100 steps | loss 2.310 | tok/s 1.2k | ETA 2:56"
    rl = {PROGRESS_TAG: json.dumps({"phase": "train", "done": 3, "total": 10, "unit": "steps", "start": 0,
                                    "detail": "rollouts 5/8 episodes", "elapsed_s": 30.0})}
    st = stage_status("fc_rl", {"loss": 0.01, "success_rate": 0.25, "perf/rollout_tokens_per_s": 80.0}, rl)
    assert st.text() == "train 3/10 steps (rollouts 5/8 episodes) | loss 0.010 | success 25% | tok/s 80 | ETA 1:10"
    # the metrics belong to the training phase only
    check = {PROGRESS_TAG: json.dumps({"phase": "format check", "done": 1, "total": 40, "unit": "episodes"})}
    assert stage_status("fe_sft", metrics, check).text() == "format check 1/40 episodes"
    loading = {PROGRESS_TAG: json.dumps({"phase": "loading the model", "done": 0, "total": None, "unit": ""})}
    assert stage_status("fe_sft", {}, loading).text() == "loading the model"
    assert stage_status("fe_sft", {}, {}, waiting="starting Ray Train workers").text() == "starting Ray Train workers"


def test_evaluation_actors_and_received_rows_are_merged() -> None:
    actors = {f"{PROGRESS_TAG}.a1": json.dumps({"phase": "eval", "done": 7, "unit": "episodes"}),
              f"{PROGRESS_TAG}.a2": json.dumps({"phase": "loading the model", "done": 0, "unit": ""}),
              f"{PROGRESS_TAG}.a3": "not json"}
    assert merge_states([json.loads(v) for k, v in actors.items() if k != f"{PROGRESS_TAG}.a3"])["done"] == 7
    st = stage_status("eval", {}, actors, total=100, unit="episodes", counted=4)
    assert st.text() == "eval 7/100 episodes (1/2 actors)"
    # rows received count too, when the actors' tags lag behind
    assert stage_status("eval", {}, actors, total=100, unit="episodes", counted=32).count == "32/100 episodes"
    assert stage_status("eval", {}, {}, waiting="starting the evaluation actors", total=100,
                        unit="episodes").text() == "starting the evaluation actors 0/100 episodes"


def test_plain_display_prints_on_phase_change_and_every_ten_seconds() -> None:
    out, now = io.StringIO(), FakeClock()
    d = Display("wm_amt", out, tty=False, every_s=10.0, clock_fn=now)
    d.show(Status("loading the model"))
    now.t += 3
    d.show(Status("train", 1, 10, "steps"))  # new phase: printed
    now.t += 4
    d.show(Status("train", 3, 10, "steps"))  # 4 s later, same phase: not printed
    now.t += 6
    d.show(Status("train", 5, 10, "steps", info="loss 2.000"))  # 10 s after the last line: printed
    d.close()
    assert out.getvalue().splitlines() == [
        "[wm_amt 0:00] loading the model",
        "[wm_amt 0:03] train 1/10 steps",
        "[wm_amt 0:13] train 5/10 steps | loss 2.000",
        "[wm_amt 0:13] train 5/10 steps | loss 2.000",  # close(): where it got
    ]


def test_run_watcher_renders_what_the_fake_run_says() -> None:
    script = iter([
        ({}, {}),
        ({}, {PROGRESS_TAG: json.dumps({"phase": "loading the model"})}),
        ({"loss": 3.0, "tokens_per_s": 500.0},
         {PROGRESS_TAG: json.dumps({"phase": "train", "done": 1, "total": 4, "unit": "steps", "elapsed_s": 2.0})}),
        RuntimeError("database is locked"),
        ({"loss": 2.5, "tokens_per_s": 520.0, "eval_loss": 2.7},
         {PROGRESS_TAG: json.dumps({"phase": "train", "done": 4, "total": 4, "unit": "steps", "elapsed_s": 8.0})}),
    ])

    def fetch():
        item = next(script)
        if isinstance(item, Exception):
            raise item
        return item

    out, now = io.StringIO(), FakeClock()
    watcher = RunWatcher("wm_amt", fetch, Display("wm_amt", out, tty=False, every_s=0.0, clock_fn=now),
                         waiting="starting Ray Train workers")
    statuses = []
    for _ in range(5):
        now.t += 2
        statuses.append(watcher.poll())
    assert statuses[3] is None  # a failed read keeps the last line
    assert out.getvalue().splitlines() == [
        "[wm_amt 0:02] starting Ray Train workers",
        "[wm_amt 0:04] loading the model",
        "[wm_amt 0:06] train 1/4 steps | loss 3.000 | tok/s 500 | ETA 0:06",
        "[wm_amt 0:10] train 4/4 steps | loss 2.500 | held-out 2.700 | tok/s 520",
    ]


def test_tty_display_draws_a_bar_and_leaves_one_line() -> None:
    out = io.StringIO()
    d = Display("fc_rl", out, tty=True)
    d.show(Status("train", 2, 10, "steps", detail="rollouts 3/8 episodes", info="loss 0.100", eta_s=80))
    d.close("[fc_rl 0:12] done: train 10/10 steps")
    assert out.getvalue().rstrip().endswith("[fc_rl 0:12] done: train 10/10 steps")


def test_stages_in_flight_share_one_terminal_display_and_name_their_row() -> None:
    import threading

    from tasks.progress import _SharedBar, row_label

    out = io.StringIO()
    lines: dict[str, Display] = {}

    def lane(label: str, stage: str) -> None:
        with row_label(label):
            lines[label] = Display(stage, out, tty=True)

    for label, stage in (("full s0", "fc_rl"), ("sft_only s1", "fe_sft")):
        t = threading.Thread(target=lane, args=(label, stage))
        t.start()
        t.join()
    a, b = lines["full s0"], lines["sft_only s1"]
    assert (a.name, b.name) == ("full s0 fc_rl", "sft_only s1 fe_sft")
    assert a._bar is b._bar and len(a._bar.tasks) == 2  # one live display, a line for each stage
    a.show(Status("train", 2, 10, "steps"))
    b.show(Status("train", 5, 16, "steps"))
    a.close(f"[{a.name} 0:12] done: train 10/10 steps")
    assert len(b._bar.tasks) == 1 and id(out) in _SharedBar._bars  # b's line still live
    b.close(f"[{b.name} 0:30] done: train 16/16 steps")
    assert id(out) not in _SharedBar._bars  # the last stage out stops the display
    text = out.getvalue()
    assert "[full s0 fc_rl 0:12] done: train 10/10 steps" in text
    assert text.rstrip().endswith("[sft_only s1 fe_sft 0:30] done: train 16/16 steps")
    assert Display("eval", io.StringIO(), tty=False).name == "eval"  # outside a row: the stage alone

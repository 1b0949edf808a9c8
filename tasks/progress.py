"""What the terminal of ``foresight run`` shows while a stage works: one progress line per stage.

    with watch_stage("wm_amt", tracker):          # around trainer.fit(): polls the stage's MLflow run
        result = trainer.fit()
    with watch_stage("eval", tracker, total=n, unit="episodes") as watch:
        for row in ds.iter_rows():
            watch.advance(1)                       # counted by the driver, merged with what actors report
    with activity("ray", "starting a local Ray"):  # a phase with no count: its label and elapsed time
        ray.init(...)

Ray workers do not print to the driver (``log_to_driver=False``), and on a cluster they run
elsewhere, so the driver reads what rank 0 writes to the stage's MLflow run: its per-step
metrics (loss, tokens/s) and the ``foresight.progress`` tag (``foresight_core.tracking.Progress``:
phase, done / total, elapsed), polled every ``POLL_S``. Evaluation actors write one tag each,
``foresight.progress.<actor>``; their episode counts are summed.

On a terminal the line is a rich progress bar (phase, bar, count, loss, tokens/s, ETA, elapsed);
elsewhere (CI, a log file, a Prefect worker) it is a plain line when the phase changes and every
``PLAIN_EVERY_S`` in between. Either way a stage ends with one plain line saying where it got.
"""

from __future__ import annotations

import contextvars
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TextIO

from foresight_core.tracking import PROGRESS_TAG

POLL_S = 1.5  # how often the driver reads the stage's run
PLAIN_EVERY_S = 10.0  # without a terminal: a line at most this often (and on every phase change)


# ---------------------------------------------------------------------------------------------
# What one line says (pure functions: metrics and progress tags in, text out)


def clock(seconds: float) -> str:
    """``42`` -> ``0:42``; ``3725`` -> ``1:02:05``."""
    s = max(0, int(round(seconds)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _si(x: float) -> str:
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


# the latest metrics a training stage's line shows during its ``train`` phase: (key, label, format)
SHOWN_METRICS: dict[str, tuple[tuple[str, str, Callable[[float], str]], ...]] = {
    "wm_amt": (("loss", "loss", _num), ("eval_loss", "held-out", _num), ("tokens_per_s", "tok/s", _si)),
    "fe_sft": (("loss", "loss", _num), ("eval_loss", "held-out", _num), ("tokens_per_s", "tok/s", _si)),
    "fc_rl": (("loss", "loss", _num), ("reward/episode_mean", "reward", _num), ("success_rate", "success", _pct),
              ("perf/rollout_tokens_per_s", "tok/s", _si)),
}


@dataclass(frozen=True)
class Status:
    """Where a stage is: the phase, a count when it has one, and what the line adds to it."""

    phase: str
    done: int | None = None
    total: int | None = None
    unit: str = ""
    detail: str = ""  # "rollouts 3/8 episodes", "held-out loss"
    info: str = ""  # the shown metrics: "loss 2.310 | tok/s 1.2k"
    eta_s: float | None = None

    @property
    def count(self) -> str:
        if self.done is None:
            return ""
        return f"{self.done}/{self.total if self.total is not None else '?'} {self.unit}".rstrip()

    def text(self) -> str:
        """``train 12/100 steps (rollouts 3/8 episodes) | loss 2.310 | tok/s 1.2k | ETA 3:10``."""
        head = " ".join(p for p in (self.phase, self.count) if p)
        if self.detail:
            head += f" ({self.detail})"
        tail = [self.info] if self.info else []
        if self.eta_s is not None:
            tail.append(f"ETA {clock(self.eta_s)}")
        return " | ".join([head, *tail])


def progress_states(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """The ``foresight.progress`` tag and the ``foresight.progress.<actor>`` tags of a run, parsed
    (a tag that is not JSON is skipped)."""
    out = []
    for key in sorted(tags):
        if key == PROGRESS_TAG or key.startswith(PROGRESS_TAG + "."):
            try:
                state = json.loads(tags[key])
            except ValueError:
                continue
            if isinstance(state, dict) and state.get("phase"):
                out.append(state)
    return out


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One state from several writers (evaluation actors): the episodes of the playing ones summed."""
    if len(states) <= 1:
        return states[0] if states else None
    counted = [s for s in states if s.get("unit")]
    if not counted:
        return {**states[0], "detail": f"{len(states)} actors"}
    return {"phase": counted[0]["phase"], "unit": counted[0]["unit"], "total": None,
            "done": sum(int(s.get("done") or 0) for s in counted),
            "detail": f"{len(counted)}/{len(states)} actors" if len(counted) < len(states) else ""}


def stage_summary(stage: str, metrics: Mapping[str, float], tags: Mapping[str, str]) -> str:
    """Where the time of a finished stage went, and its last shown metrics (the line a stage leaves)::

        loading the model 0:08 · train 3/3 steps 0:04 · format check 2/2 episodes 0:03 | loss 2.310 | tok/s 1.2k

    From the ``foresight.progress`` tag's phase history; phases under a second without a count are left out.
    Without that tag (evaluation: one per actor): the merged line."""
    try:
        state = json.loads(tags[PROGRESS_TAG])
    except (KeyError, ValueError):
        state = None
    if not isinstance(state, dict) or "past" not in state:
        return stage_status(stage, metrics, tags).text()
    phases = [*state["past"], {**state, "s": state.get("elapsed_s")}]
    parts = []
    for ph in phases:
        count = Status(str(ph.get("phase")), ph.get("done"), ph.get("total"), str(ph.get("unit") or "")).count \
            if ph.get("unit") else ""
        if count or (ph.get("s") or 0) >= 1:
            parts.append(" ".join(p for p in (str(ph.get("phase")), count, clock(ph.get("s") or 0)) if p))
    info = [f"{label} {fmt(metrics[k])}" for k, label, fmt in SHOWN_METRICS.get(stage, ()) if k in metrics]
    return " | ".join([" · ".join(parts), *info])


def eta(state: Mapping[str, Any]) -> float | None:
    """Seconds left at the phase's rate so far: ``elapsed * (total - done) / (done - start)``."""
    done, total, start = state.get("done"), state.get("total"), state.get("start") or 0
    elapsed = state.get("elapsed_s")
    if done is None or not total or elapsed is None or done <= start or done >= total:
        return None
    return float(elapsed) * (total - done) / (done - start)


def stage_status(stage: str, metrics: Mapping[str, float], tags: Mapping[str, str], *, waiting: str = "starting",
                 total: int | None = None, unit: str = "", counted: int = 0) -> Status:
    """The line of ``stage`` from its run's latest ``metrics`` and ``tags``.

    ``waiting``: the phase shown before any worker has said where it is. ``total`` / ``unit`` /
    ``counted``: a count the driver keeps itself (evaluation rows received); the larger of it and
    the workers' count is shown.
    """
    state = merge_states(progress_states(tags))
    if state is None and not counted:
        return Status(phase=waiting, done=0 if total else None, total=total, unit=unit)
    state = dict(state or {"phase": unit or "progress", "unit": unit})
    if counted or total is not None:
        state["done"] = max(int(state.get("done") or 0), counted)
        state["total"] = total if total is not None else state.get("total")
        state["unit"] = state.get("unit") or unit
    info = ""
    if state["phase"] == "train":
        info = " | ".join(f"{label} {fmt(metrics[k])}" for k, label, fmt in SHOWN_METRICS.get(stage, ())
                          if k in metrics)
    return Status(phase=str(state["phase"]), done=state.get("done") if state.get("unit") else None,
                  total=state.get("total"), unit=str(state.get("unit") or ""), detail=str(state.get("detail") or ""),
                  info=info, eta_s=eta(state))


# ---------------------------------------------------------------------------------------------
# Where the line goes: a live bar on a terminal, plain throttled lines elsewhere


ROW: contextvars.ContextVar[str] = contextvars.ContextVar("foresight_row", default="")
"""The ablation row (and seed) this thread works for: its stages' lines start with it (``row_label``)."""


@contextmanager
def row_label(label: str) -> Iterator[None]:
    """Lines of the stages run inside start with ``label`` (rows side by side: ``foresight ablate`` lanes)."""
    token = ROW.set(label)
    try:
        yield
    finally:
        ROW.reset(token)


class _SharedBar:
    """One rich progress display per output, shared by the stages in flight (one bar line each): two live
    displays on one terminal would overwrite each other's lines."""

    _lock = threading.Lock()
    _bars: dict[int, tuple[Any, int]] = {}  # id(out) -> (rich Progress, stages using it)

    @classmethod
    def acquire(cls, out: TextIO) -> Any:
        with cls._lock:
            bar, users = cls._bars.get(id(out), (None, 0))
            if bar is None:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[stage]}"),
                               TextColumn("{task.description}"), BarColumn(bar_width=30),
                               TextColumn("{task.fields[count]}"), TextColumn("{task.fields[info]}"),
                               TimeElapsedColumn(), console=Console(file=out), transient=True, refresh_per_second=4)
                bar.start()
            cls._bars[id(out)] = (bar, users + 1)
            return bar

    @classmethod
    def release(cls, out: TextIO, task: Any, final: str | None) -> None:
        """Drop ``task``'s line and write ``final`` above the bars left (or alone, once none is left)."""
        with cls._lock:
            bar, users = cls._bars[id(out)]
            bar.remove_task(task)
            if users > 1:
                cls._bars[id(out)] = (bar, users - 1)
                if final:
                    bar.console.print(final, markup=False, highlight=False, soft_wrap=True)
                return
            del cls._bars[id(out)]
            bar.stop()
        if final:
            out.write(final + "\n")
            out.flush()


class Display:
    """One stage's progress line on ``out`` (stdout): a rich bar when ``out`` is a terminal (one display shared
    by the stages in flight), else a plain line on each phase change and at most every ``every_s`` seconds.
    The line starts with the row it works for, when there is one (``row_label``)."""

    def __init__(self, name: str, out: TextIO | None = None, tty: bool | None = None,
                 every_s: float = PLAIN_EVERY_S, clock_fn: Callable[[], float] = time.monotonic) -> None:
        self.name = f"{ROW.get()} {name}".strip()
        self.out = out or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)()) if tty is None else tty
        self.every_s, self.clock = every_s, clock_fn
        self.t0 = clock_fn()
        self.status: Status | None = None
        self._printed_at = -float("inf")
        self._printed_phase: str | None = None
        self._bar: Any = None
        self._task: Any = None
        self._lock = threading.Lock()
        if self.tty:
            self._bar = _SharedBar.acquire(self.out)
            self._task = self._bar.add_task("", total=None, stage=self.name, count="", info="")

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def line(self, status: Status) -> str:
        return f"[{self.name} {clock(self.elapsed())}] {status.text()}"

    def show(self, status: Status) -> None:
        with self._lock:
            self.status = status
            if self._bar is not None:
                description = status.phase + (f" ({status.detail})" if status.detail else "")
                info = " | ".join(p for p in (status.info, f"ETA {clock(status.eta_s)}" if status.eta_s is not None
                                              else "") if p)
                self._bar.update(self._task, description=description, total=status.total,
                                 completed=status.done or 0, count=status.count, info=info)
                return
            now = self.clock()
            if status.phase != self._printed_phase or now - self._printed_at >= self.every_s:
                self._printed_at, self._printed_phase = now, status.phase
                self.out.write(self.line(status) + "\n")
                self.out.flush()

    def close(self, final: str | None = None) -> None:
        """Stop the bar and write one last plain line: ``final``, or where the stage got."""
        with self._lock:
            text = final if final is not None else self.line(self.status) if self.status else None
            if self._bar is not None:
                self._bar = None
                _SharedBar.release(self.out, self._task, text)
            elif text:
                self.out.write(text + "\n")
                self.out.flush()


@contextmanager
def activity(name: str, label: str, out: TextIO | None = None) -> Iterator[Display]:
    """A phase the driver waits on with nothing to count (starting Ray): its label and elapsed time."""
    display = Display(name, out)
    display.show(Status(phase=label))
    ok = False
    try:
        yield display
        ok = True
    finally:
        display.close(f"[{display.name} {clock(display.elapsed())}] {label}: {'done' if ok else 'failed'}")


# ---------------------------------------------------------------------------------------------
# The poller: a thread that reads the stage's run while the driver waits on Ray


class RunWatcher:
    """Calls ``fetch() -> (metrics, tags)`` every ``interval_s`` on a thread and shows ``stage_status``;
    ``advance(n)`` adds to the driver's own count. A failed read keeps the last line (the store may be
    busy for a moment); the worker's writes are never blocked by it."""

    def __init__(self, stage: str, fetch: Callable[[], tuple[Mapping[str, float], Mapping[str, str]]],
                 display: Display, *, waiting: str = "starting", total: int | None = None, unit: str = "",
                 interval_s: float = POLL_S) -> None:
        self.stage, self.fetch, self.display = stage, fetch, display
        self.waiting, self.total, self.unit, self.interval_s = waiting, total, unit, interval_s
        self.counted = 0
        self.last: tuple[Mapping[str, float], Mapping[str, str]] = ({}, {})  # the latest read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def advance(self, n: int = 1) -> None:
        self.counted += n

    def poll(self) -> Status | None:
        try:
            metrics, tags = self.fetch()
        except Exception:  # noqa: BLE001 - a busy sqlite file, a server hiccup: try again next time
            if self.display.status is not None and self.counted:
                self.display.show(replace(self.display.status, done=max(self.display.status.done or 0, self.counted)))
            return None
        self.last = (metrics, tags)
        status = stage_status(self.stage, metrics, tags, waiting=self.waiting, total=self.total, unit=self.unit,
                              counted=self.counted)
        self.display.show(status)
        return status

    def start(self) -> RunWatcher:
        self.display.show(stage_status(self.stage, {}, {}, waiting=self.waiting, total=self.total, unit=self.unit))
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()  # the last word: the final metrics and phase


def run_fetcher(tracker: Any) -> Callable[[], tuple[dict[str, float], dict[str, str]]]:
    """``fetch`` for ``RunWatcher``: the latest metrics and the tags of ``tracker``'s MLflow run, read
    with a client of its own (``MlflowTracker``: tracking URI + run id)."""
    from tasks.tracking import MlflowTracker

    reader = MlflowTracker(tracker.tracking_uri, tracker.run_id)

    def fetch() -> tuple[dict[str, float], dict[str, str]]:
        data = reader.client.get_run(reader.run_id).data
        return dict(data.metrics), dict(data.tags)

    return fetch


@contextmanager
def watch_stage(stage: str, tracker: Any, *, waiting: str = "starting Ray Train workers", total: int | None = None,
                unit: str = "", reset: bool = True, out: TextIO | None = None) -> Iterator[RunWatcher]:
    """Show ``stage``'s progress while the block runs, read from ``tracker``'s MLflow run.

    ``reset``: the run's ``foresight.progress`` tag is set to ``waiting`` first, so a continued run does
    not show where its dead attempt stopped (a new run with several writers has nothing to reset).
    The block's end (or its exception) stops the poller and leaves one line: where the stage got, and
    its elapsed time.
    """
    if reset:
        tracker.set_tags({PROGRESS_TAG: json.dumps({"phase": waiting})})
    display = Display(stage, out)
    watcher = RunWatcher(stage, run_fetcher(tracker), display, waiting=waiting, total=total, unit=unit).start()
    ok = False
    try:
        yield watcher
        ok = True
    finally:
        watcher.stop()
        if ok:
            metrics, tags = watcher.last
            line = "done: " + (stage_summary(stage, metrics, tags) if reset
                               else replace(display.status, detail="").text())
        else:
            line = "failed during: " + (display.status.text() if display.status else "")
        display.close(f"[{display.name} {clock(display.elapsed())}] {line}")

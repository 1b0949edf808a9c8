"""What the science code may say to an experiment tracker, with no tracker imported.

Training loops take a ``Tracker``; the orchestration layer passes an MLflow-backed one
(``tasks.tracking``) on rank 0 and ``NullTracker`` elsewhere, in tests and when
tracking is off -- the no-op logger of nanochat.

``Progress`` says where a long loop is (the phase, episodes or steps done of how many) through the
same tracker, as one run tag that the driver polls (``tasks.progress``): a Ray worker's
terminal is not the user's, and the tag reaches the driver wherever the worker runs.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

PROGRESS_TAG = "foresight.progress"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class MemoryTracker(NullTracker):
    """Keeps everything in lists; for tests and for loops run without any tracking server."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.texts: dict[str, str] = {}
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.tags: dict[str, str] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts[artifact_file] = text

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        self.tables.setdefault(artifact_file, []).extend(rows)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


_SHARED: weakref.WeakKeyDictionary[Any, dict[str, Progress]] = weakref.WeakKeyDictionary()


class Progress:
    """Where a long loop is, as JSON in one run tag (``PROGRESS_TAG``) written with ``tracker.set_tags``::

        {"phase": "train", "done": 12, "total": 100, "unit": "steps", "start": 0, "detail": "rollouts 3/8",
         "elapsed_s": 41.2, "past": [{"phase": "loading the model", "done": 0, "total": null, "unit": "", "s": 7.9}]}

    ``elapsed_s`` is the time since the phase began (this process's clock, so the driver needs no
    synchronised clocks) and ``start`` the count it began at (a resumed run), from which the driver
    estimates the time left; ``past``: the last ``MAX_PAST`` finished phases and their seconds. A new
    phase is written at once; updates within a phase at most every ``min_interval_s`` (a tag write is
    a few ms on sqlite: at one per 2 s it costs the loop nothing). An update that falls inside the
    interval is not written: the next one carries the newer state.
    """

    MAX_PAST = 12

    def __init__(self, tracker: Tracker | None, key: str = PROGRESS_TAG, min_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tracker = tracker or NullTracker()
        self.key, self.min_interval_s, self.clock = key, min_interval_s, clock
        self.state: dict[str, Any] = {}
        self.past: list[dict[str, Any]] = []
        self._t0 = clock()
        self._written = -math.inf

    @classmethod
    def of(cls, tracker: Tracker | None, key: str = PROGRESS_TAG) -> Progress:
        """The one ``Progress`` of ``tracker`` (for None, a new one that writes nothing): the loops that
        share a tracker (model loading, training, the format check) add to one phase history."""
        if tracker is None:
            return cls(None, key)
        try:
            return _SHARED.setdefault(tracker, {}).setdefault(key, cls(tracker, key))
        except TypeError:  # a tracker that takes no weak reference: a Progress of its own
            return cls(tracker, key)

    def phase(self, name: str, total: int | None = None, unit: str = "", done: int = 0, detail: str = "") -> None:
        """A new phase (``"loading the model"``, ``"train"``, ``"format check"``): written at once."""
        now = self.clock()
        if self.state:
            self.past = [*self.past, {k: self.state.get(k) for k in ("phase", "done", "total", "unit")}
                         | {"s": round(now - self._t0, 2)}][-self.MAX_PAST:]
        self.state = {"phase": name, "done": done, "total": total, "unit": unit, "start": done, "detail": detail}
        self._t0 = now
        self._write()

    def update(self, done: int | None = None, total: int | None = None, detail: str | None = None,
               force: bool = False) -> None:
        """Move within the phase; written when ``min_interval_s`` has passed since the last write (or ``force``)."""
        for k, v in (("done", done), ("total", total), ("detail", detail)):
            if v is not None:
                self.state[k] = v
        if force or self.clock() - self._written >= self.min_interval_s:
            self._write()

    def episodes(self, label: str = "", offset: int = 0) -> Callable[[int, int, int], None]:
        """An ``on_progress(done, total, turn)`` callback for ``rollout.play_group``: with ``label`` the
        episodes go into the detail (``"rollouts 3/8 episodes, turn 2"``: rollouts inside a training
        step), else they are the phase's ``done`` (plus ``offset``: groups played one after another)."""
        if label:
            return lambda done, total, turn: self.update(detail=f"{label} {done}/{total} episodes, turn {turn}")
        return lambda done, total, turn: self.update(done=offset + done, total=None if offset else total,
                                                     detail=f"turn {turn}")

    def _write(self) -> None:
        self._written = self.clock()
        state = {**self.state, "elapsed_s": round(self._written - self._t0, 2), "past": self.past}
        self.tracker.set_tags({self.key: json.dumps(state)})

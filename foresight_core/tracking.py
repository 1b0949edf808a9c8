"""What the science code may say to an experiment tracker, with no tracker imported.

Training loops take a ``Tracker``; the orchestration layer passes an MLflow-backed one
(``foresight_tasks.tracking``) on rank 0 and ``NullTracker`` elsewhere, in tests and when
tracking is off -- the no-op logger of nanochat.
"""

from __future__ import annotations

from typing import Any, Protocol


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

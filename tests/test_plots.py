"""Calibration plots: real PNGs, drawn from the same numbers as the metrics."""

from __future__ import annotations

import io

import pytest

from foresight_core.plots import reliability_diagram, risk_coverage_plot


@pytest.mark.parametrize("plot", [reliability_diagram, risk_coverage_plot])
def test_plots_are_pngs_of_the_figure_size(plot):
    from PIL import Image

    png = plot([0.9, 0.9, 0.5, 0.2, 0.75], [1, 0, 1, 0, 1], title="search_world / direct")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).size == (420, 400)


def test_plots_refuse_what_the_metrics_refuse():
    with pytest.raises(ValueError, match="outside"):
        reliability_diagram([1.5], [1])
    with pytest.raises(ValueError, match="no \\(confidence, outcome\\) pairs"):
        risk_coverage_plot([], [])


def test_the_eval_stage_logs_both_plots_per_benchmark_and_mode():
    from pathlib import Path

    from foresight_core.evaluation import first_confidences
    from tasks.evaluate import log_calibration_plots

    class Tracker:
        def __init__(self):
            self.logged = []

        def log_artifact(self, local_path, artifact_path=None):
            self.logged.append((artifact_path, Path(local_path).name, Path(local_path).read_bytes()[:4]))

    def rec(bench, mode, q, ok, task="t"):
        return {"benchmark": bench, "mode": mode, "task_id": task, "confidences": [q, 0.1], "success": ok}

    records = [rec("nq", "direct", 0.8, True, "a"), rec("nq", "direct", 0.3, False, "b"),
               rec("nq", "planning", 0.6, True),
               {"benchmark": "math", "mode": "direct", "task_id": "m", "confidences": [None], "success": True},
               {"benchmark": "math", "mode": "direct", "task_id": "m2", "confidences": [], "success": False}]
    pairs = first_confidences(records)  # the first stated q of each episode that stated one, in order
    assert pairs == {"direct": {"nq": [["a", 0.8, 1.0], ["b", 0.3, 0.0]]}, "planning": {"nq": [["t", 0.6, 1.0]]}}
    tracker = Tracker()
    log_calibration_plots(tracker, pairs)
    assert sorted(name for _, name, _ in tracker.logged) == [
        "nq_direct_reliability.png", "nq_direct_risk_coverage.png", "nq_planning_reliability.png",
        "nq_planning_risk_coverage.png"]
    assert {a for a, _, _ in tracker.logged} == {"plots"} and {h for _, _, h in tracker.logged} == {b"\x89PNG"}
    tracker = Tracker()
    log_calibration_plots(tracker, pairs, prefix="full")  # the ablation's pooled plots, one folder per row
    assert {a for a, _, _ in tracker.logged} == {"plots/full"} and len(tracker.logged) == 4

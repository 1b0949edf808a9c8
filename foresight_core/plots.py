"""Calibration plots of stated confidence against outcomes, as PNG bytes (matplotlib, headless).

    png = reliability_diagram(qs, outcomes, title="search_world / direct")   # accuracy per confidence bin
    png = risk_coverage_plot(qs, outcomes, title="search_world / direct")    # accuracy when answering only above q

Both read the numbers from ``foresight_core.metrics`` (``reliability_bins``, ``risk_coverage``), so a plot
shows exactly what the logged ECE and AUROC summarise.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from foresight_core.metrics import auroc, expected_calibration_error, reliability_bins, risk_coverage


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: a worker, a CI machine
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(4.2, 4.0), dpi=100)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def reliability_diagram(confidences: Sequence[float], outcomes: Sequence[float | bool], title: str = "",
                        n_bins: int = 10) -> bytes:
    """Bars: accuracy per equal-width confidence bin (width: the bin; labels: episodes); the diagonal is
    perfect calibration. The title carries ECE and the number of stated confidences."""
    bins = reliability_bins(confidences, outcomes, n_bins)
    ece = expected_calibration_error(confidences, outcomes, n_bins)
    plt, fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for b in bins:
        if b.count:
            ax.bar(b.lo, b.accuracy, width=b.hi - b.lo, align="edge", color="tab:blue", alpha=0.7, edgecolor="black")
            ax.text((b.lo + b.hi) / 2, min(0.97, (b.accuracy or 0) + 0.02), str(b.count), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="stated confidence q", ylabel="success rate",
           title=f"{title}\nECE {ece:.3f}, n = {len(confidences)}".strip())
    ax.legend(loc="upper left", fontsize=7)
    return _png(plt, fig)


def risk_coverage_plot(confidences: Sequence[float], outcomes: Sequence[float | bool], title: str = "") -> bytes:
    """Accuracy against coverage when the agent answers only at q >= a threshold, swept over every stated q;
    the dotted line is the accuracy of answering always. The title carries AUROC."""
    points = risk_coverage(confidences, outcomes)
    area = auroc(confidences, outcomes)
    plt, fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([c for _, c, _ in points], [a for _, _, a in points], marker="o", markersize=3, color="tab:green")
    ax.axhline(points[-1][2], linestyle=":", color="grey", linewidth=1, label="answer always")
    auroc_text = "AUROC -" if area is None else f"AUROC {area:.3f}"
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="coverage (share of episodes answered)",
           ylabel="accuracy of the answered", title=f"{title}\n{auroc_text}, n = {len(confidences)}".strip())
    ax.legend(loc="lower left", fontsize=7)
    return _png(plt, fig)

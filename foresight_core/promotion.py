"""Promotion: does a newly evaluated model beat the registry's champion? A paired comparison on the
held-out tasks that both evaluations played.

    scores = task_scores(records, mode="direct")     # {"<benchmark>/<task id>": mean score over its samples}
    d = decide(new_scores, champion_scores, margin=0.02)
    d.promote, d.reason                               # True, "beats the champion by +0.125 (> 0.02) on 8 paired tasks ..."

The rule: the first model is promoted (there is nothing to beat). Otherwise only the tasks both
evaluations scored count, each task compared with itself (so a harder or easier draw of tasks cannot
make a model look better), and the new model is promoted when its mean paired difference is above
the margin. No common task: not promoted, since nothing was compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


def task_scores(records: Iterable[Mapping[str, Any]], mode: str = "direct") -> dict[str, float]:
    """Mean score per held-out task (over its samples) of one evaluation mode, keyed ``benchmark/task_id``."""
    sums: dict[str, list[float]] = {}
    for r in records:
        if r["mode"] == mode:
            sums.setdefault(f"{r['benchmark']}/{r['task_id']}", []).append(float(r["score"]))
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    tasks: int = 0
    """Paired tasks compared."""
    new_mean: float | None = None
    champion_mean: float | None = None
    diff: float | None = None
    """Mean of (new - champion) over the paired tasks."""
    wins: int = 0
    losses: int = 0
    ties: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(new: Mapping[str, float], champion: Mapping[str, float] | None, margin: float) -> Decision:
    """Promote ``new`` over ``champion`` (None: there is no champion yet)?"""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if champion is None:
        return Decision(True, "first model: there is no champion yet")
    common = sorted(set(new) & set(champion))
    if not common:
        return Decision(False, "no held-out task in common with the champion's evaluation: nothing to compare")
    diffs = [new[k] - champion[k] for k in common]
    n = len(common)
    d = Decision(promote=False, reason="", tasks=n, new_mean=sum(new[k] for k in common) / n,
                 champion_mean=sum(champion[k] for k in common) / n, diff=sum(diffs) / n,
                 wins=sum(x > 0 for x in diffs), losses=sum(x < 0 for x in diffs), ties=sum(x == 0 for x in diffs))
    counts = f"on {n} paired tasks ({d.wins} better, {d.losses} worse, {d.ties} tied)"
    assert d.diff is not None
    if d.diff > margin:
        return _with(d, True, f"beats the champion by {d.diff:+.3f} (> margin {margin:g}) {counts}")
    return _with(d, False, f"does not beat the champion by more than {margin:g}: {d.diff:+.3f} {counts}")


def _with(d: Decision, promote: bool, reason: str) -> Decision:
    return Decision(**{**d.as_dict(), "promote": promote, "reason": reason})

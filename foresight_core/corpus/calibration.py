"""Corpus step 5: calibration of the q labels (ECE, Brier) against fresh rollouts from the same states."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from foresight_core.config.pipeline import PipelineConfig
from foresight_core.corpus.collect import Rollouts, state_key
from foresight_core.types import CorpusRow

N_BINS = 10  # equal-width bins of the q labels' histogram and calibration


# ---------------------------------------------------------------------------------------------
# 5. Calibration of the q labels against fresh rollouts from the same states


def calibration_pairs(rows: Iterable[dict[str, Any]], cfg: PipelineConfig, fresh: int = 4) -> list[dict[str, Any]]:
    """(q_t, outcome) pairs: ``fresh`` new rollouts from each labelled state (rng salt "fresh",
    independent of the labels' "mc" draws). States are deduplicated; plain copies carry no labels."""
    ro = Rollouts(cfg)
    seen: set[str] = set()
    pairs: list[dict[str, Any]] = []
    for row in rows:
        parsed = CorpusRow.from_dict(row)
        if parsed.trajectory is None:
            continue
        traj = parsed.trajectory
        for lab in traj.meta.get("q_labels", []):
            prefix = traj.steps[:lab["prefix"]]
            key = state_key(traj.task, prefix)
            if key in seen:
                continue
            seen.add(key)
            pairs += [{"state": key, "env": traj.task.env, "q": lab["q"], "outcome": float(ok)}
                      for ok in ro.outcomes(traj.task, prefix, fresh, "fresh")]
    return pairs


def summarize_calibration(pairs: Sequence[dict[str, Any]], n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE, Brier and reliability bins of (q, outcome) pairs, overall and per environment."""
    from foresight_core.metrics import brier_score, expected_calibration_error, reliability_bins
    if not pairs:
        raise ValueError("no q labels to calibrate (no annotated trajectory rows)")

    def one(ps: Sequence[dict[str, Any]]) -> dict[str, Any]:
        qs, ys = [p["q"] for p in ps], [p["outcome"] for p in ps]
        return {"states": len({p["state"] for p in ps}), "pairs": len(ps),
                "ece": expected_calibration_error(qs, ys, n_bins=n_bins), "brier": brier_score(qs, ys)}

    qs, ys = [p["q"] for p in pairs], [p["outcome"] for p in pairs]
    envs = sorted({p["env"] for p in pairs})
    return {**one(pairs), "by_env": {e: one([p for p in pairs if p["env"] == e]) for e in envs},
            "bins": [dataclasses.asdict(b) for b in reliability_bins(qs, ys, n_bins=n_bins)]}


def calibration_report(rows: Iterable[dict[str, Any]], cfg: PipelineConfig, fresh: int = 4,
                       n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE and Brier of the q labels in ``rows`` against ``fresh`` new rollouts from each labelled state."""
    return {"fresh_per_state": fresh, **summarize_calibration(calibration_pairs(rows, cfg, fresh), n_bins)}

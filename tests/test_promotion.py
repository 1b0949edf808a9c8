"""The promotion rule, on numbers worked by hand: first model, better, worse, tie, no common task."""

from __future__ import annotations

import pytest

from foresight_core.promotion import decide, task_scores


def rec(benchmark, task_id, score, mode="direct"):
    return {"benchmark": benchmark, "task_id": task_id, "score": score, "mode": mode}


def test_task_scores_average_samples_per_task_of_one_mode():
    records = [rec("nq", "a", 1.0), rec("nq", "a", 0.0), rec("nq", "b", 1.0), rec("math", "a", 0.5),
               rec("nq", "a", 1.0, mode="planning")]
    assert task_scores(records) == {"math/a": 0.5, "nq/a": 0.5, "nq/b": 1.0}
    assert task_scores(records, mode="planning") == {"nq/a": 1.0}


def test_the_first_model_is_promoted():
    d = decide({"nq/a": 0.0}, None, margin=0.1)
    assert d.promote and "first model" in d.reason


def test_a_better_model_is_promoted_on_the_paired_tasks_only():
    champion = {"nq/a": 0.0, "nq/b": 1.0, "nq/c": 0.5, "nq/old": 0.0}
    new = {"nq/a": 1.0, "nq/b": 1.0, "nq/c": 0.0, "nq/new": 0.0}
    d = decide(new, champion, margin=0.1)
    # paired: a +1, b 0, c -0.5 -> mean +0.5/3 = 0.1667 > 0.1; "old" and "new" do not count
    assert d.promote and d.tasks == 3 and (d.wins, d.losses, d.ties) == (1, 1, 1)
    assert d.diff == pytest.approx(0.5 / 3) and d.new_mean == pytest.approx(2 / 3) and d.champion_mean == 0.5
    assert "beats the champion by +0.167 (> margin 0.1) on 3 paired tasks" in d.reason


def test_a_worse_or_not_better_enough_model_is_not_promoted():
    champion = {"nq/a": 1.0, "nq/b": 0.0}
    worse = decide({"nq/a": 0.0, "nq/b": 0.0}, champion, margin=0.0)
    assert not worse.promote and worse.diff == -0.5 and "-0.500" in worse.reason
    tie = decide(dict(champion), champion, margin=0.0)  # equal is not better
    assert not tie.promote and tie.ties == 2
    small = decide({"nq/a": 1.0, "nq/b": 0.2}, champion, margin=0.1)  # +0.1 is not above 0.1
    assert not small.promote and small.diff == pytest.approx(0.1)


def test_no_common_task_is_not_a_comparison():
    d = decide({"nq/a": 1.0}, {"math/a": 0.0}, margin=0.0)
    assert not d.promote and "nothing to compare" in d.reason


def test_a_negative_margin_is_refused():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        decide({}, {}, margin=-0.1)

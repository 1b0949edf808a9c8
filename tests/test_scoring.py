"""Scoring played episodes (foresight_core/scoring.py): keyword matching, the real future, episode metrics.

The first two tests moved here from tests/test_grpo.py with the functions they test."""

from __future__ import annotations

import math

import pytest

from foresight_core import scoring


def test_grounding_reward_whole_token_match():
    future = "Doc 1 (Eiffel Tower): The Eiffel-Tower stands in Paris.\n1889"
    # "eiffel tower" found (hyphen -> space), "PARIS" found (case), "tow" not a whole token,
    # "1889" found, "" dropped: 3 found of 4 usable keywords = 0.75
    assert scoring.grounding(["eiffel tower", "PARIS", "tow", "1889", "  "], future) == pytest.approx(0.75)
    assert scoring.grounding([], future) == 0.0
    assert scoring.grounding(["!!"], future) == 0.0
    assert scoring.occurs("Eiffel tower", future) and not scoring.occurs("tow", future)
    assert not scoring.occurs("!!", "!!")


def test_future_texts():
    acts = ["who founded X", "Y", "Paris"]
    obs = ["Doc 1: X was founded by Y", "Doc 1: Y was born in Paris", None]
    fut = scoring.future_texts(acts, obs)
    # step 0 sees everything from its own action on; the last step sees its answer only
    assert fut[0] == "who founded X\nDoc 1: X was founded by Y\nY\nDoc 1: Y was born in Paris\nParis"
    assert fut[2] == "Paris"
    # a keyword that only shows up two steps later still grounds step 0, not step 2
    assert scoring.grounding(["born"], fut[0]) == 1.0
    assert scoring.grounding(["born"], fut[2]) == 0.0
    with pytest.raises(ValueError):
        scoring.future_texts(["a"], [])


def ep(success, confs, grounding=(), fmt=True, turns=None, valid=None, tokens=10, finish="answer"):
    turns = len(confs) if turns is None else turns
    return {"success": success, "score": float(success), "format_ok": fmt, "confidences": list(confs),
            "grounding": list(grounding), "turns": turns, "valid_turns": turns if valid is None else valid,
            "gen_tokens": tokens, "finish": finish}


def test_summarise_episodes_worked_example():
    # 1: success, q 0.6 then 0.9, grounding 1 and 0.5; 2: failure, q 0.3 then a malformed turn (None)
    eps = [ep(True, [0.6, 0.9], [1.0, 0.5], tokens=30), ep(False, [0.3, None], [0.0], fmt=False, valid=1,
                                                            tokens=10, finish="malformed")]
    m = scoring.summarise_episodes(eps)
    assert m["success_rate"] == 0.5 and m["format_rate"] == 0.5
    assert m["valid_turn_rate"] == pytest.approx(3 / 4)
    assert m["grounding_rate"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert m["confidence_rate"] == pytest.approx(3 / 4) and m["mean_confidence"] == pytest.approx(0.6)
    # Brier over (0.6, 1), (0.9, 1), (0.3, 0): (0.16 + 0.01 + 0.09) / 3
    assert m["brier"] == pytest.approx(0.26 / 3)
    # first turns only: (0.6, 1), (0.3, 0): (0.16 + 0.09) / 2
    assert m["brier_first"] == pytest.approx(0.125)
    # ECE, 10 bins, each q alone in its bin: (|0.6-1| + |0.9-1| + |0.3-0|) / 3
    assert m["ece"] == pytest.approx(0.8 / 3)
    assert m["turns"] == 2 and m["gen_tokens"] == 20
    assert m["finish/answer"] == 0.5 and m["finish/malformed"] == 0.5 and m["finish/truncated"] == 0


def test_summarise_episodes_without_confidence_is_nan_not_perfect():
    m = scoring.summarise_episodes([ep(True, [None])])
    assert math.isnan(m["ece"]) and math.isnan(m["brier_first"]) and math.isnan(m["mean_confidence"])
    with pytest.raises(ValueError):
        scoring.summarise_episodes([])

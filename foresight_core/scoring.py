"""Scoring played episodes, once for every stage: keyword matching, the real future, and episode metrics.

    fut = future_texts(actions, observations)       # tau_{>t} of every step
    grounding(["Eiffel Tower"], fut[0])             # share of keywords found in it
    facts = episode_facts(rollout)                  # what any summary needs of one played episode
    summarise_episodes([facts, ...])                # format, success, grounding, calibration, lengths

The corpus annotates keywords with ``occurs`` over ``future_texts`` (so it only teaches keywords the reward
will count), FC-RL rewards grounding with ``grounding``, and the format check, FC-RL's logging and the
evaluation all summarise episodes with ``summarise_episodes``. Pure functions: no model, no stage.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from foresight_core.metrics import auroc, brier_score, expected_calibration_error

_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")

FINISH_REASONS = ("answer", "turn_limit", "malformed", "truncated", "context_limit", "env_error")


# ---------------------------------------------------------------------------------------------
# Keywords and the future


def normalise_text(s: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: the form keywords are matched in."""
    return " ".join(_PUNCT.sub(" ", s.lower()).split())


def occurs(term: str, text: str) -> bool:
    """``term`` occurs in ``text`` as whole normalised tokens, contiguously ("eiffel tower" matches
    "...the Eiffel-Tower's..." but "tow" does not match "tower"); a term that normalises to nothing never does."""
    t = normalise_text(term)
    return bool(t) and f" {t} " in f" {normalise_text(text)} "


def grounding(keywords: Sequence[str], future: str) -> float:
    """Share of predicted keywords that occur in the future text (``occurs``). Keywords that normalise to
    nothing are dropped; no usable keyword gives 0 (nothing predicted, nothing grounded)."""
    kws = [k for k in (normalise_text(k) for k in keywords) if k]
    if not kws:
        return 0.0
    haystack = f" {normalise_text(future)} "
    return sum(f" {k} " in haystack for k in kws) / len(kws)


def future_texts(actions: Sequence[str], observations: Sequence[str | None]) -> list[str]:
    """tau_{>t} for every step t of one episode, as text.

    The future of step t is what happens once its world-model block is written: its own action
    a_t (the first step of the imagined plan) and every later action, plus every observation from
    o_t on; the final answer is the last action. Our choice: later ``<think>`` and world-model text
    is left out, so a model cannot ground its keywords by merely repeating them to itself.
    """
    if len(actions) != len(observations):
        raise ValueError(f"{len(actions)} actions but {len(observations)} observations")
    out = []
    for t in range(len(actions)):
        parts = [p for a, o in zip(actions[t:], observations[t:]) for p in (a, o) if p]
        out.append("\n".join(parts))
    return out


# ---------------------------------------------------------------------------------------------
# Episodes


def episode_facts(r: Any) -> dict[str, Any]:
    """What every summary needs of one played episode (a ``rollout.Rollout``): outcome, format, the stated
    confidence of each turn (None where the turn was malformed or stated none), the grounding of each
    well-formed turn that predicted keywords, the turns, the generated tokens and how it ended."""
    futures = future_texts([s.action.content if s.action else "" for s in r.steps], [s.observation for s in r.steps])
    return {"success": bool(r.success), "score": float(r.score), "format_ok": bool(r.format_ok),
            "confidences": [s.confidence if s.valid else None for s in r.steps],
            "grounding": [grounding(s.keywords, fut) for s, fut in zip(r.steps, futures) if s.valid and s.keywords],
            "valid_turns": sum(bool(s.valid) for s in r.steps), "turns": len(r.steps),
            "gen_tokens": int(r.generated_tokens), "finish": r.finish}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def first_confidence(episode: Mapping[str, Any]) -> float | None:
    """The q an episode stated in its first turn, before acting (None: it stated none)."""
    qs = episode.get("confidences") or []
    return None if not qs or qs[0] is None else float(qs[0])


def calibration(confidences: Sequence[float], outcomes: Sequence[float]) -> dict[str, float | None]:
    """``ece``, ``brier`` and ``auroc`` of stated confidences against outcomes; None where undefined (no
    pair; AUROC with one outcome only)."""
    if not confidences:
        return {"ece": None, "brier": None, "auroc": None}
    return {"ece": expected_calibration_error(confidences, outcomes), "brier": brier_score(confidences, outcomes),
            "auroc": auroc(confidences, outcomes)}


def summarise_episodes(episodes: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics of a set of episodes (``episode_facts`` dicts, or evaluation records holding those keys):

    - ``success_rate``, ``format_rate`` (every turn well formed), ``valid_turn_rate``;
    - ``grounding_rate``: the mean share of a turn's keywords found in its real future;
    - ``ece`` / ``brier`` of every stated confidence against the episode's outcome, ``ece_first`` /
      ``brier_first`` of the first turn's alone (NaN when no confidence was stated: undefined, not perfect);
      ``confidence_rate`` (turns that stated one) and ``mean_confidence``;
    - ``turns`` and ``gen_tokens`` per episode; ``finish/<reason>``: the share that ended so.
    """
    if not episodes:
        raise ValueError("summarise_episodes() needs at least one episode")
    pairs = [(q, float(e["success"])) for e in episodes for q in e["confidences"] if q is not None]
    first = [(q, float(e["success"])) for e in episodes if (q := first_confidence(e)) is not None]
    turns = sum(e["turns"] for e in episodes)
    out = {
        "episodes": float(len(episodes)),
        "success_rate": _mean([float(e["success"]) for e in episodes]),
        "format_rate": _mean([float(e["format_ok"]) for e in episodes]),
        "grounding_rate": _mean([g for e in episodes for g in e["grounding"]]),
        "confidence_rate": len(pairs) / max(1, turns),
        "mean_confidence": _mean([q for q, _ in pairs]),
        "turns": _mean([float(e["turns"]) for e in episodes]),
        "gen_tokens": _mean([float(e["gen_tokens"]) for e in episodes]),
    }
    if all("valid_turns" in e for e in episodes):
        out["valid_turn_rate"] = sum(e["valid_turns"] for e in episodes) / turns if turns else math.nan
    for suffix, ps in (("", pairs), ("_first", first)):
        for k, v in calibration([q for q, _ in ps], [o for _, o in ps]).items():
            out[k + suffix] = math.nan if v is None else v  # NaN: no pair (AUROC: or one outcome only)
    if all("candidate_tokens" in e for e in episodes):  # test-time planning: all K candidates' tokens
        out["candidate_tokens"] = _mean([float(e["candidate_tokens"]) for e in episodes])
    if all("finish" in e for e in episodes):
        for reason in FINISH_REASONS:
            out[f"finish/{reason}"] = _mean([float(e["finish"] == reason) for e in episodes])
    return out

"""Scoring: answer matching (EM / F1) and calibration (ECE / Brier / reliability bins).

Answer matching follows the official SQuAD v1.1 and HotpotQA evaluation scripts, which the
Search-R1 benchmarks (NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle) also use:

    normalize_answer("The  Big-Cat!")      -> "bigcat"        # lower, drop punctuation, articles, extra spaces
    exact_match("the big cat", ["Big cat"]) -> 1.0
    f1_score("the big cat", ["a big dog"])  -> 0.5            # tokens [big, cat] vs [big, dog]

Both take a list of gold answers and return the best score over them (max over golds).

Calibration of verbalised confidences q (the paper's <confidence>) against 0/1 outcomes:

    expected_calibration_error([0.9, 0.2], [1, 0])   # equal-width bins, weighted |accuracy - mean q|
    brier_score([0.9, 0.2], [1, 0])                  # mean (q - outcome)^2
    reliability_bins(qs, outcomes)                   # per-bin count / mean q / accuracy, for reports
    auroc([0.9, 0.2, 0.6], [1, 0, 0])                # does q rank successes above failures? (1.0 here)
    risk_coverage([0.9, 0.2], [1, 0])                # accuracy when answering only above each threshold

Sampling and uncertainty:

    pass_at_k(n=5, c=2, k=2)                         # unbiased pass@k from n samples, c correct: 1 - C(3,2)/C(5,2) = 0.7
    bootstrap_interval([0, 1, 1, 0], seed=0)         # 95% percentile interval of the mean (resampling the values)
    paired_difference({"t1": 1, "t2": 0}, {"t1": 0, "t2": 0})  # mean difference on common keys, with its interval
    seeds_tasks_interval({(0, "t1"): 1, (1, "t1"): 0, ...})  # mean over seeds and tasks; both resampled
    cells_to_resolve(9)                              # 4: of 9 paired 0/1 cells, 4 must differ (one way) to resolve
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---------------------------------------------------------------------------- answer matching

def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, remove punctuation, remove articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _check_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str):
        raise TypeError("golds must be a list of gold answers, not a single string")
    if len(golds) == 0:
        raise ValueError("no gold answers to score against")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    _check_golds(golds)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1_one(prediction: str, gold: str) -> float:
    """Token F1 of one prediction against one gold (HotpotQA script: yes/no/noanswer must match exactly)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Best token-level F1 of the prediction over the gold answers."""
    _check_golds(golds)
    return max(_f1_one(prediction, g) for g in golds)


# ---------------------------------------------------------------------------- calibration

@dataclass
class ReliabilityBin:
    """One equal-width confidence bin [lo, hi) (the last bin includes 1.0)."""

    lo: float
    hi: float
    count: int
    mean_confidence: float | None  # None for an empty bin
    accuracy: float | None  # share of successes; None for an empty bin


def _check_pairs(confidences: Sequence[float], outcomes: Sequence[float | bool]) -> tuple[list[float], list[float]]:
    if len(confidences) != len(outcomes):
        raise ValueError(f"{len(confidences)} confidences but {len(outcomes)} outcomes")
    if len(confidences) == 0:
        raise ValueError("no (confidence, outcome) pairs to score")
    qs = [float(q) for q in confidences]
    ys = [float(y) for y in outcomes]
    for i, q in enumerate(qs):
        if not 0.0 <= q <= 1.0:  # also rejects NaN
            raise ValueError(f"confidence #{i} is {q}, outside [0, 1]")
    for i, y in enumerate(ys):
        if y not in (0.0, 1.0):
            raise ValueError(f"outcome #{i} is {y}, expected 0/1")
    return qs, ys


def reliability_bins(confidences: Sequence[float], outcomes: Sequence[float | bool],
                     n_bins: int = 10) -> list[ReliabilityBin]:
    """Split predictions into ``n_bins`` equal-width confidence bins; bin i is [i/n, (i+1)/n), 1.0 in the last."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    qs, ys = _check_pairs(confidences, outcomes)
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, q in enumerate(qs):
        members[min(int(q * n_bins), n_bins - 1)].append(i)
    bins = []
    for b, idx in enumerate(members):
        mean_q = sum(qs[i] for i in idx) / len(idx) if idx else None
        acc = sum(ys[i] for i in idx) / len(idx) if idx else None
        bins.append(ReliabilityBin(lo=b / n_bins, hi=(b + 1) / n_bins, count=len(idx),
                                   mean_confidence=mean_q, accuracy=acc))
    return bins


def expected_calibration_error(confidences: Sequence[float], outcomes: Sequence[float | bool],
                               n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin count / N) * |accuracy(bin) - mean confidence(bin)|."""
    bins = reliability_bins(confidences, outcomes, n_bins)
    n = sum(b.count for b in bins)
    return sum(b.count / n * abs(b.accuracy - b.mean_confidence)  # type: ignore[operator]
               for b in bins if b.count)


def brier_score(confidences: Sequence[float], outcomes: Sequence[float | bool]) -> float:
    """Mean squared error between confidence and the 0/1 outcome (0 is perfect, 1 is worst)."""
    qs, ys = _check_pairs(confidences, outcomes)
    return sum((q - y) ** 2 for q, y in zip(qs, ys)) / len(qs)


def auroc(confidences: Sequence[float], outcomes: Sequence[float | bool]) -> float | None:
    """Area under the ROC curve of q as a score for success: the probability that a random success has a
    higher q than a random failure, ties counting one half (Mann-Whitney U / (n_pos * n_neg)).
    None when all outcomes are equal (no pair to rank)."""
    qs, ys = _check_pairs(confidences, outcomes)
    pos = [q for q, y in zip(qs, ys) if y == 1.0]
    neg = [q for q, y in zip(qs, ys) if y == 0.0]
    if not pos or not neg:
        return None
    # average ranks (1-based) over all values, ties sharing their mean rank
    order = sorted(range(len(qs)), key=lambda i: qs[i])
    ranks = [0.0] * len(qs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and qs[order[j + 1]] == qs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, ys) if y == 1.0)
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def risk_coverage(confidences: Sequence[float], outcomes: Sequence[float | bool]) -> list[tuple[float, float, float]]:
    """``(threshold, coverage, accuracy)`` for every distinct q, highest first: answering only when q >= the
    threshold covers that share of the episodes with that accuracy (the risk-coverage curve)."""
    qs, ys = _check_pairs(confidences, outcomes)
    pairs = sorted(zip(qs, ys), key=lambda p: -p[0])
    out: list[tuple[float, float, float]] = []
    hits = 0.0
    for i, (q, y) in enumerate(pairs):
        hits += y
        if i + 1 == len(pairs) or pairs[i + 1][0] != q:
            out.append((q, (i + 1) / len(pairs), hits / (i + 1)))
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} correct of n={n} samples is impossible")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def bootstrap_interval(values: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("bootstrap_interval: no values")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_interval: level must be in (0, 1), got {level}")
    rng = random.Random(seed)
    return _percentile_interval([sum(rng.choices(xs, k=len(xs))) / len(xs) for _ in range(n_boot)], level)


def _percentile_interval(draws: Sequence[float], level: float) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap draws (the percentile method)."""
    draws = sorted(draws)
    return (draws[int(math.floor((1 - level) / 2 * (len(draws) - 1)))],
            draws[int(math.ceil((1 + level) / 2 * (len(draws) - 1)))])


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float, int]:
    """``(mean of a[k] - b[k], interval low, interval high, pairs)`` over the keys both hold (tasks, or
    task x seed), the interval by bootstrapping the paired differences."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("paired_difference: the two sides share no key (task)")
    diffs = [float(a[k]) - float(b[k]) for k in common]
    lo, hi = bootstrap_interval(diffs, n_boot, level, seed)
    return sum(diffs) / len(diffs), lo, hi, len(common)


def cells_to_resolve(n: int, level: float = 0.95) -> int:
    """The fewest of ``n`` paired 0/1 cells (seed x task) that must differ, all the same way, for the percentile
    bootstrap interval of the paired mean difference to exclude 0: the best case of a budget's resolution.

    A resample of the n differences keeps none of the d non-zero ones with probability (1 - d/n)^n; the
    interval's lower end is then 0 unless that is below (1 - level) / 2. For level 0.95: n = 3 -> 3 (all of
    them), n = 9 -> 4 ((6/9)^9 = 0.026 is not below 0.025, (5/9)^9 = 0.005 is), and about 4 for any large n
    (e^-d < 0.025): a difference of 4/n at best. Cells that differ the other way raise it."""
    if n < 1:
        raise ValueError(f"cells_to_resolve: n must be >= 1, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"cells_to_resolve: level must be in (0, 1), got {level}")
    return next(d for d in range(1, n + 1) if (1 - d / n) ** n < (1 - level) / 2)


def seeds_tasks_interval(values: Mapping[tuple[Any, Any], float], n_boot: int = 2000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """``(mean, interval low, interval high)`` of values keyed ``(seed, task)``: the two-way bootstrap.

    The estimate is the mean over seeds of each seed's mean over its tasks. Each bootstrap draw resamples
    the seeds and, independently, the tasks (both with replacement) and takes the same mean over the
    drawn cells that hold a value, so the interval carries both the task sampling and the training-seed
    noise. With one seed it is ``bootstrap_interval`` over the tasks (the seed axis has no spread)."""
    if not values:
        raise ValueError("seeds_tasks_interval: no values")
    if not 0 < level < 1:
        raise ValueError(f"seeds_tasks_interval: level must be in (0, 1), got {level}")
    seeds = sorted({s for s, _ in values}, key=str)
    tasks = sorted({t for _, t in values}, key=str)
    grid = {s: {t: float(v) for (s2, t), v in values.items() if s2 == s} for s in seeds}

    def estimate(ss: Sequence[Any], ts: Sequence[Any]) -> float | None:
        means = []
        for s in ss:
            cells = [grid[s][t] for t in ts if t in grid[s]]
            if cells:
                means.append(sum(cells) / len(cells))
        return sum(means) / len(means) if means else None

    point = estimate(seeds, tasks)
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        e = estimate(rng.choices(seeds, k=len(seeds)), rng.choices(tasks, k=len(tasks)))
        if e is not None:
            draws.append(e)
    lo, hi = _percentile_interval(draws, level)
    return float(point), lo, hi

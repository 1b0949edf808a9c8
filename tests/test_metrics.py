"""EM / F1 (SQuAD / HotpotQA scripts) and calibration metrics, against numbers worked by hand."""

from __future__ import annotations

import pytest

from foresight_core.metrics import (
    auroc,
    bootstrap_interval,
    paired_difference,
    pass_at_k,
    risk_coverage,
    brier_score,
    exact_match,
    expected_calibration_error,
    f1_score,
    normalize_answer,
    reliability_bins,
)


def test_normalize_answer():
    # lower -> "the  big-cat!"; punctuation dropped (no space) -> "the  bigcat"; article -> " bigcat"
    assert normalize_answer("The  Big-Cat!") == "bigcat"
    # "an" and "a" are articles only as whole words: "banana" keeps its "an"s
    assert normalize_answer("An apple, a banana") == "apple banana"
    assert normalize_answer("  ") == ""


def test_exact_match_max_over_golds():
    assert exact_match("the Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0  # any gold counts
    assert exact_match("Paris, France", ["Paris"]) == 0.0


def test_f1_hand_worked():
    # "the big cat" -> [big, cat]; "a big dog" -> [big, dog]; overlap 1, P = R = 1/2, F1 = 0.5
    assert f1_score("the big cat", ["a big dog"]) == pytest.approx(0.5)
    # [new, york, city] vs [new, york]: overlap 2, P = 2/3, R = 1, F1 = 2*(2/3)/(5/3) = 0.8
    assert f1_score("New York City", ["new york"]) == pytest.approx(0.8)
    # max over golds: 0.8 against "new york", 1.0 against "New York City"
    assert f1_score("New York City", ["new york", "New York City"]) == pytest.approx(1.0)
    # repeated tokens count with multiplicity: [big, big] vs [big]: common 1,
    # P = 1/2, R = 1, F1 = 2*0.5/1.5 = 2/3
    assert f1_score("big big", ["big"]) == pytest.approx(2 / 3)
    assert f1_score("cat", ["dog"]) == 0.0


def test_f1_yes_no_must_match_exactly():
    # HotpotQA script: "yes" vs "yes it is" would share a token, but yes/no answers score 0 unless equal
    assert f1_score("yes it is", ["yes"]) == 0.0
    assert f1_score("Yes.", ["yes"]) == 1.0


def test_gold_answers_must_be_a_list():
    with pytest.raises(TypeError, match="list of gold answers"):
        exact_match("x", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no gold answers"):
        f1_score("x", [])


def test_reliability_bins_and_ece_hand_worked():
    qs = [0.05, 0.15, 0.95, 1.0, 0.9]
    ys = [0, 1, 1, 1, 0]
    bins = reliability_bins(qs, ys, n_bins=10)
    assert [b.count for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]  # 1.0 lands in the last bin
    last = bins[-1]
    # last bin: q = 0.95, 1.0, 0.9 -> mean 0.95; outcomes 1, 1, 0 -> accuracy 2/3
    assert last.mean_confidence == pytest.approx(0.95)
    assert last.accuracy == pytest.approx(2 / 3)
    assert bins[2].mean_confidence is None and bins[2].accuracy is None
    # ECE = 1/5*|0 - 0.05| + 1/5*|1 - 0.15| + 3/5*|2/3 - 0.95|
    #     = 0.01 + 0.17 + 0.6*0.28333 = 0.18 + 0.17 = 0.35
    assert expected_calibration_error(qs, ys) == pytest.approx(0.35)


def test_ece_perfect_and_worst():
    # one bin (all q = 0.5) with half successes: perfectly calibrated
    assert expected_calibration_error([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(0.0)
    # fully confident and always wrong: |0 - 1| = 1
    assert expected_calibration_error([1.0, 1.0], [False, False]) == pytest.approx(1.0)


def test_brier_hand_worked():
    # ((0.9-1)^2 + (0.2-0)^2 + (0.6-0)^2) / 3 = (0.01 + 0.04 + 0.36) / 3 = 0.13667
    assert brier_score([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx(0.41 / 3)


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        brier_score([1.2], [1])
    with pytest.raises(ValueError, match="2 confidences but 1 outcomes"):
        expected_calibration_error([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="expected 0/1"):
        brier_score([0.5], [0.5])
    with pytest.raises(ValueError, match="no \\(confidence"):
        brier_score([], [])


def test_auroc_hand_worked():
    assert auroc([0.9, 0.2, 0.6], [1, 0, 0]) == 1.0  # the success ranks above both failures
    assert auroc([0.1, 0.9], [1, 0]) == 0.0
    # pos {0.5, 0.8} vs neg {0.5, 0.1}: 0.5 (tie) + 1 + 1 + 1 = 3.5 of 4 pairs
    assert auroc([0.5, 0.5, 0.8, 0.1], [1, 0, 1, 0]) == 0.875
    assert auroc([0.3, 0.7], [1, 1]) is None  # one class: nothing to rank


def test_auroc_and_brier_agree_with_scikit_learn():
    import random

    from sklearn.metrics import brier_score_loss, roc_auc_score

    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 60)
        qs = [round(rng.random(), 1) for _ in range(n)]  # rounded: many ties
        ys = [int(rng.random() < q) for q in qs]
        if 0 < sum(ys) < n:
            assert auroc(qs, ys) == pytest.approx(roc_auc_score(ys, qs))
        assert brier_score(qs, ys) == pytest.approx(brier_score_loss(ys, qs))


def test_ece_agrees_with_an_independent_numpy_implementation():
    import numpy as np

    rng = np.random.default_rng(5)
    for _ in range(20):
        q = rng.random(40)
        y = (rng.random(40) < q ** 2).astype(float)
        idx = np.minimum((q * 10).astype(int), 9)
        ece = sum(abs(y[idx == b].mean() - q[idx == b].mean()) * (idx == b).sum() / 40 for b in range(10)
                  if (idx == b).any())
        assert expected_calibration_error(q.tolist(), y.tolist()) == pytest.approx(ece)


def test_pass_at_k_hand_worked_and_against_enumeration():
    import itertools

    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(3, 1, 3) == 1.0 and pass_at_k(3, 0, 3) == 0.0  # n = k: "any sample solved"
    assert pass_at_k(4, 1, 1) == 0.25  # k = 1: the success rate
    for n in range(1, 7):  # the estimator is the mean over every k-subset of "some sample in it is correct"
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError, match="k=4 must be between 1 and the number of samples n=3"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c=4 correct of n=3"):
        pass_at_k(3, 4, 1)


def test_risk_coverage_hand_worked():
    # answering only at q >= 0.9: half the episodes, half right; >= 0.5: 3 of 4, 2 right; all: 2 of 4
    assert risk_coverage([0.9, 0.9, 0.5, 0.2], [1, 0, 1, 0]) == [(0.9, 0.5, 0.5), (0.5, 0.75, 2 / 3), (0.2, 1.0, 0.5)]


def test_bootstrap_and_paired_difference():
    assert bootstrap_interval([0.4] * 10) == pytest.approx((0.4, 0.4))
    lo, hi = bootstrap_interval([0, 1] * 50, seed=1)  # mean 0.5, standard error 0.05: about +-0.098
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.196, abs=0.03)
    assert bootstrap_interval([0, 1] * 50, seed=1) == (lo, hi)  # seeded: reproducible
    diff, lo, hi, n = paired_difference({"t1": 1, "t2": 0, "t3": 1}, {"t1": 0, "t2": 0, "t4": 1})
    assert (diff, n) == (0.5, 2) and 0.0 <= lo <= diff <= hi <= 1.0  # t1 +1, t2 0; t3 and t4 are not paired
    with pytest.raises(ValueError, match="share no key"):
        paired_difference({"a": 1}, {"b": 1})


def test_seeds_tasks_interval_hand_cases():
    from foresight_core.metrics import seeds_tasks_interval

    # seed 0 solves t1 and t2, seed 1 solves t1 only: seed means 1.0 and 0.5 -> 0.75
    values = {(0, "t1"): 1.0, (0, "t2"): 1.0, (1, "t1"): 1.0, (1, "t2"): 0.0}
    mean, lo, hi = seeds_tasks_interval(values, seed=3)
    assert mean == pytest.approx(0.75) and 0.0 <= lo <= mean <= hi <= 1.0
    assert seeds_tasks_interval({(0, "a"): 0.4, (1, "a"): 0.4, (1, "b"): 0.4}) == pytest.approx((0.4, 0.4, 0.4))
    # one seed: the task bootstrap alone, about mean +- 1.96 * sd / sqrt(n)
    one = {(0, f"t{i}"): float(i % 2) for i in range(100)}
    mean, lo, hi = seeds_tasks_interval(one, seed=1)
    assert mean == 0.5 and hi - lo == pytest.approx(0.196, abs=0.03)
    # seed noise widens it: the same tasks, seed means 0.3 / 0.5 / 0.7
    three = {(s, f"t{i}"): float(i % 10 < 3 + 2 * s) for s in range(3) for i in range(100)}
    mean3, lo3, hi3 = seeds_tasks_interval(three, seed=1)
    assert mean3 == pytest.approx(0.5) and hi3 - lo3 > hi - lo
    assert seeds_tasks_interval(three, seed=1) == (mean3, lo3, hi3)  # seeded: reproducible
    with pytest.raises(ValueError, match="no values"):
        seeds_tasks_interval({})


def test_cells_to_resolve_by_hand_and_against_the_bootstrap_it_predicts():
    from foresight_core.metrics import cells_to_resolve

    # (6/9)^9 = 0.0260 is not below 0.025, (5/9)^9 = 0.0051 is; n = 3: only all three cells
    assert [cells_to_resolve(n) for n in (1, 3, 9, 18, 300)] == [1, 3, 4, 4, 4]
    assert cells_to_resolve(9, level=0.5) == 2  # (8/9)^9 = 0.346 is not below 0.25, (7/9)^9 = 0.104 is
    # what it predicts, by the bootstrap itself: 9 cells, d of them won, none lost
    for d, resolved in ((3, False), (4, True)):
        a = {f"c{i}": 1.0 if i < d else 0.0 for i in range(9)}
        b = {f"c{i}": 0.0 for i in range(9)}
        _, lo, _, _ = paired_difference(a, b, n_boot=4000, seed=1)
        assert (lo > 0) == resolved, (d, lo)
    with pytest.raises(ValueError, match="n must be"):
        cells_to_resolve(0)

"""Packing: exact rows on hand-built samples, long samples, and no attention across samples."""

from __future__ import annotations

import pytest
import torch

from foresight_core.packing import IGNORE as X
from foresight_core.packing import LMSample, pack, shifted_labels


def sample(ids: list[int], mask: list[int]) -> LMSample:
    return LMSample(ids, {"loss": mask})


def test_shifted_labels_hand_example():
    # position j predicts token j+1 when that token is a target; the last position never predicts
    assert shifted_labels([5, 6, 7, 8], [1, 1, 0, 1]) == [6, X, 8, X]
    assert shifted_labels([5], [1]) == [X]
    assert shifted_labels([], []) == []


def test_pack_rows_positions_and_labels_exactly():
    a = sample([10, 11, 12, 13, 14], [0, 0, 1, 1, 1])
    b = sample([20, 21, 22], [1, 1, 1])
    c = sample([30, 31], [0, 1])
    p = pack([c, a, b], seq_len=8, pad_id=0)
    # best-fit decreasing: a (5) opens row 0, b (3) fills it exactly, c (2) opens row 1
    assert p.input_ids.tolist() == [[10, 11, 12, 13, 14, 20, 21, 22],
                                    [30, 31, 0, 0, 0, 0, 0, 0]]
    # positions restart at 0 for every sample and for the padding
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2],
                                       [0, 1, 0, 1, 2, 3, 4, 5]]
    # a: 11 is not a target, 12 13 14 are; a's last token predicts nothing (no loss across a|b);
    # b's first token 20 has no predecessor inside b, so it is never a target although its bit is 1
    assert p.labels["loss"].tolist() == [[X, 12, 13, 14, X, 21, 22, X],
                                         [31, X, X, X, X, X, X, X]]
    assert p.n_real.tolist() == [8, 2]
    assert p.stats.rows == 2 and p.stats.tokens == 10 and p.stats.targets == {"loss": 6}
    assert p.stats.fill == pytest.approx(10 / 16)


def test_batch_names_label_rows():
    s = LMSample([1, 2, 3], {"loss": [1, 1, 1], "wm": [0, 0, 1]})
    b = pack([s], seq_len=4, pad_id=0).batch([0])
    assert set(b) == {"input_ids", "position_ids", "n_real", "labels", "labels_wm"}
    assert b["labels"].tolist() == [[2, 3, X, X]]
    assert b["labels_wm"].tolist() == [[X, 3, X, X]]


def test_long_sample_split_trains_every_target_once():
    ids = list(range(100, 110))  # 10 tokens, seq_len 4 -> chunks [0:4] [3:7] [6:10], overlapping by one
    p = pack([sample(ids, [1] * 10)], seq_len=4, pad_id=0)
    assert p.stats.split == 1 and p.stats.rows == 3
    assert sorted(p.input_ids.tolist()) == [[100, 101, 102, 103], [103, 104, 105, 106], [106, 107, 108, 109]]
    targets = sorted(t for row in p.labels["loss"].tolist() for t in row if t != X)
    assert targets == ids[1:]  # 101..109, each exactly once; only the very first token is never a target


def test_long_sample_truncate_is_counted():
    p = pack([sample(list(range(10)), [1] * 10)], seq_len=4, pad_id=0, long_samples="truncate")
    assert p.stats.truncated == 1 and p.stats.dropped_tokens == 6
    assert p.input_ids.tolist() == [[0, 1, 2, 3]]
    assert p.labels["loss"].tolist() == [[1, 2, 3, X]]


def test_samples_without_targets_are_dropped_and_counted():
    # the only marked token is the first one, which has no predecessor: nothing to learn
    p = pack([sample([1, 2, 3], [1, 0, 0]), sample([4, 5], [0, 1])], seq_len=4, pad_id=0)
    assert p.stats.empty == 1 and p.input_ids.tolist() == [[4, 5, 0, 0]]


def test_bad_masks_are_refused():
    with pytest.raises(ValueError, match="mask 'loss' has 2 entries for 3 tokens"):
        LMSample([1, 2, 3], {"loss": [1, 1]})
    with pytest.raises(ValueError, match="every sample needs masks"):
        pack([LMSample([1, 2], {"loss": [1, 1]}), LMSample([1, 2], {"wm": [1, 1]})], 4, 0)


@pytest.fixture(scope="module")
def tiny_model():
    from foresight_core.config.model import ModelConfig
    from foresight_core.models import load_model

    model, _ = load_model(ModelConfig(source="tiny", tiny_layers=2, tiny_hidden=32), seed=0)
    return model.eval()


@torch.no_grad()
def test_packed_logits_equal_each_sample_alone(tiny_model):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(3, 1000, (7,), generator=g).tolist()
    b = torch.randint(3, 1000, (5,), generator=g).tolist()
    p = pack([sample(a, [1] * 7), sample(b, [1] * 5)], seq_len=16, pad_id=0)
    assert p.input_ids[0, :12].tolist() == a + b
    packed = tiny_model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits[0]
    alone_a = tiny_model(input_ids=torch.tensor([a]), use_cache=False).logits[0]
    alone_b = tiny_model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[:7], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[7:12], alone_b, rtol=1e-5, atol=1e-5)

    # the control: without the position restarts, b attends to a and its logits change
    leaky = tiny_model(input_ids=p.input_ids, position_ids=torch.arange(16)[None], use_cache=False).logits[0]
    torch.testing.assert_close(leaky[:7], alone_a, rtol=1e-5, atol=1e-5)  # a comes first: unaffected
    assert (leaky[7:12] - alone_b).abs().max() > 1e-3

"""FC-RL maths against numbers worked by hand (foresight_core/grpo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from foresight_core import grpo


def test_episode_reward():
    # EM 1 and well formed, format_weight 0.1: 1 + 0.1 * 1 = 1.1
    assert grpo.episode_reward(1.0, True, 0.1) == pytest.approx(1.1)
    # F1 0.5, malformed: 0.5 + 0.1 * 0 = 0.5
    assert grpo.episode_reward(0.5, False, 0.1) == pytest.approx(0.5)


def test_calibration_reward_brier_form():
    # success, q = 0.7: 1 - (0.7 - 1)^2 = 1 - 0.09 = 0.91
    assert grpo.calibration_reward(0.7, True) == pytest.approx(0.91)
    # failure, q = 0.7: 0 - (0.7 - 0)^2 = -0.49
    assert grpo.calibration_reward(0.7, False) == pytest.approx(-0.49)
    # failure, q = 0.1: -0.01 ; perfectly calibrated extremes: 1 and 0
    assert grpo.calibration_reward(0.1, 0) == pytest.approx(-0.01)
    assert grpo.calibration_reward(1.0, 1) == 1.0 and grpo.calibration_reward(0.0, 0) == 0.0
    # a correct answer always beats a wrong one: worst success (q=0) 1 - 1 = 0 >= best failure (q=0) 0
    assert grpo.calibration_reward(0.0, 1) >= grpo.calibration_reward(0.0, 0)


def test_world_model_reward_switches():
    # 0.91 + 0.5 = 1.41 ; no grounding: 0.91 ; no calibration: 0.5 ; missing terms count 0
    assert grpo.world_model_reward(0.91, 0.5) == pytest.approx(1.41)
    assert grpo.world_model_reward(0.91, 0.5, use_grounding=False) == pytest.approx(0.91)
    assert grpo.world_model_reward(0.91, 0.5, use_calibration=False) == pytest.approx(0.5)
    assert grpo.world_model_reward(None, 0.5) == pytest.approx(0.5)


def test_group_normalise():
    # group 0: [1, 0, 0, 1] mean 0.5, population std 0.5 -> [1, -1, -1, 1] (eps 0)
    # group 1: [2, 2] all equal -> [0, 0]
    a = grpo.group_normalise([1, 0, 0, 1, 2, 2], [0, 0, 0, 0, 1, 1], eps=0.0)
    assert a[:4] == pytest.approx([1, -1, -1, 1]) and a[4:] == [0.0, 0.0]
    # Dr.GRPO: centring only -> [0.5, -0.5, -0.5, 0.5]
    a = grpo.group_normalise([1, 0, 0, 1], [0, 0, 0, 0], std_normalise=False)
    assert a == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # [3, 1, 2]: mean 2, std sqrt(2/3) = 0.8165 -> [1.2247, -1.2247, 0]
    a = grpo.group_normalise([3, 1, 2], [7, 7, 7], eps=0.0)
    assert a == pytest.approx([1.2247449, -1.2247449, 0.0])
    with pytest.raises(ValueError):
        grpo.group_normalise([1.0], [0, 0])


def test_step_advantages():
    # q = 0.3, 0.6, 0.8 then success: [0.6-0.3, 0.8-0.6, 1-0.8] = [0.3, 0.2, 0.2]
    assert grpo.step_advantages([0.3, 0.6, 0.8], True) == pytest.approx([0.3, 0.2, 0.2])
    # failure after q = 0.9: last step 0 - 0.9 = -0.9
    assert grpo.step_advantages([0.5, 0.9], False) == pytest.approx([0.4, -0.9])
    # a plain step (None) zeroes itself and the step before it
    assert grpo.step_advantages([0.5, None, 0.4], True) == pytest.approx([0.0, 0.0, 0.6])
    # policy advantage, omega 0.2: A_E 1.0 + 0.2 * 0.3 = 1.06
    assert grpo.policy_advantage(1.0, 0.3, 0.2) == pytest.approx(1.06)


def test_token_advantages_per_span():
    # response: turn 0 = tokens 0..5 (wm 0-1, policy 2-4, eos 5), observation 6-7, turn 1 = 8..10 (policy 8-9, eos 10)
    wm = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    pol = [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    obs = [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    adv = grpo.token_advantages(11, [(0, 6), (8, 11)], wm, pol, obs, a_episode=0.5,
                                a_wm=[-1.0, None], a_policy=[0.56, 0.44])
    assert adv == pytest.approx([-1, -1, 0.56, 0.56, 0.56, 0.5, 0, 0, 0.44, 0.44, 0.5])
    # plain GRPO (no A_WM, omega 0 -> policy advantage = A_E): every generated token A_E, observations 0
    adv = grpo.token_advantages(11, [(0, 6), (8, 11)], wm, pol, obs, 0.5, [None, None], [0.5, 0.5])
    assert adv == pytest.approx([0.5] * 6 + [0, 0] + [0.5] * 3)
    with pytest.raises(ValueError):
        grpo.token_advantages(3, [], [0], [0], [0], 0.0, [], [])


def test_k3_kl():
    # d = ref - lp = log(0.5) - log(0.25) = ln 2 = 0.6931: e^d - d - 1 = 2 - 0.6931 - 1 = 0.3069
    lp, ref = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    assert grpo.k3_kl(lp, ref).item() == pytest.approx(0.30685, abs=1e-5)
    assert grpo.k3_kl(lp, lp).item() == 0.0


def test_grpo_loss_clipping_by_hand():
    # four tokens, eps 0.2:
    #  t0: ratio e^0.2 = 1.2214, A=+1 -> min(1.2214, 1.2) = 1.2 (clipped)      loss -1.2
    #  t1: ratio e^-0.5 = 0.6065, A=+1 -> min(0.6065, 0.8) = 0.6065 (unclipped) loss -0.6065
    #  t2: ratio e^-0.5 = 0.6065, A=-1 -> min(-0.6065, -0.8) = -0.8 (clipped)   loss 0.8
    #  t3: masked out
    # token mean over 3: (-1.2 - 0.6065 + 0.8) / 3 = -0.33551 ; clipped 2 of 3
    old = torch.zeros(4)
    lp = torch.tensor([0.2, -0.5, -0.5, 3.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, 5.0])
    mask = torch.tensor([1, 1, 1, 0])
    loss, st = grpo.grpo_loss(lp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - math.exp(-0.5) + 0.8) / 3, abs=1e-5)
    assert st.tokens == 3 and st.clipped == 2
    loss.backward()
    # gradient flows only through the unclipped token: d(-ratio*A/3)/dlp = -ratio/3 = -0.20218
    assert lp.grad.tolist() == pytest.approx([0.0, -math.exp(-0.5) / 3, 0.0, 0.0], abs=1e-6)
    # asymmetric clip-higher 0.28: t0 no longer clipped (1.2214 < 1.28)
    _, st = grpo.grpo_loss(lp.detach(), old, adv, mask, clip_high=0.28)
    assert st.clipped == 1


def test_grpo_loss_kl_and_sequence_agg():
    # on-policy (ratio 1): per-token loss = -A + kl_coef * k3
    lp = torch.log(torch.tensor([0.25, 0.5, 0.5]))
    ref = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -2.0])
    mask = torch.ones(3)
    seq = torch.tensor([0, 0, 1])
    # per token: [-1 + 0.1*0.30685, -1, 2] = [-0.969315, -1, 2]
    # token mean: (0.030685) / 3 = 0.0102283
    loss, st = grpo.grpo_loss(lp, lp, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.0102283, abs=1e-6)
    assert st.ref_kl == pytest.approx(0.30685, abs=1e-5)
    # sequence mean: seq0 mean (-0.969315 - 1)/2 = -0.9846575, seq1 2 -> (-0.9846575 + 2) / 2 = 0.5076713
    loss, _ = grpo.grpo_loss(lp, lp, adv, mask, ref_logprobs=ref, kl_coef=0.1, loss_agg="sequence", seq_ids=seq)
    assert loss.item() == pytest.approx(0.5076713, abs=1e-6)
    # micro-batches with the mini-batch normaliser add up to the whole batch's loss
    l1, _ = grpo.grpo_loss(lp[:2], lp[:2], adv[:2], mask[:2], normaliser=3)
    l2, _ = grpo.grpo_loss(lp[2:], lp[2:], adv[2:], mask[2:], normaliser=3)
    whole, _ = grpo.grpo_loss(lp, lp, adv, mask)
    assert (l1 + l2).item() == pytest.approx(whole.item())
    with pytest.raises(ValueError):
        grpo.grpo_loss(lp, lp, adv, mask, loss_agg="sequence")

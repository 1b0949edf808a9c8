"""FC-RL maths: rewards, advantages and the GRPO loss, as pure functions.

Everything the stage loop (``fc_rl.py``) needs to turn played rollouts into a loss lives here,
with no model, engine or environment in sight, so each formula is tested against numbers
worked by hand (``tests/test_grpo.py``). The paper's terms:

- episode reward      R_E = task score (EM / F1 / verified) + format_weight * format_ok
- calibration         R_calib(q, I) = I - (q - I)^2                   (RLCR's Brier form)
- grounding           R_ground = share of a step's keywords found in the real future tau_{>t}
                      (``scoring.grounding`` over ``scoring.future_texts``: the corpus and evaluation match alike)
- world-model reward  R_WM = R_calib + R_ground  -> group-normalised -> A_WM (world-model span tokens)
- episode advantage   A_E = (R_E - mean_group) / (std_group + eps)   (Dr.GRPO: no std division)
- step advantage      A_S,t = q_{t+1} - q_t, the last step I - q_T
- policy advantage    A_E + omega * A_S,t                              (policy span tokens)

Plain GRPO, "no grounding" and "omega = 0" are the same functions with terms switched off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# Rewards


def episode_reward(score: float, format_ok: bool, format_weight: float) -> float:
    """R_E = task score + format_weight * format_ok. ``score`` is already EM, F1 or math-verify (0/1)."""
    return float(score) + format_weight * float(format_ok)


def calibration_reward(q: float, outcome: bool | float) -> float:
    """R_calib = I - (q - I)^2 for a stated confidence q and the episode outcome I in {0, 1}.

    Maximised by q = I, and a correct answer always beats a wrong one whatever the q (RLCR, eq. 2).
    """
    i = float(outcome)
    return i - (float(q) - i) ** 2


def world_model_reward(calib: float | None, ground: float | None, use_calibration: bool = True,
                       use_grounding: bool = True) -> float:
    """R_WM = R_calib + R_ground, each term switchable; a missing term (no q, no keywords) counts 0."""
    return (calib or 0.0) * use_calibration + (ground or 0.0) * use_grounding


# ---------------------------------------------------------------------------------------------
# Advantages


def group_normalise(rewards: Sequence[float], groups: Sequence[int], std_normalise: bool = True,
                    eps: float = 1e-6) -> list[float]:
    """(r - mean_g) / (std_g + eps) within each group g (population std); Dr.GRPO: r - mean_g.

    ``groups[i]`` names the group of ``rewards[i]``: a task's G rollouts for A_E, or all the steps of a
    task's G rollouts for A_WM. A group whose rewards are all equal gets advantage 0.
    """
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards but {len(groups)} group ids")
    r = torch.tensor(rewards, dtype=torch.float64)
    g = torch.tensor(groups, dtype=torch.long)
    out = torch.zeros_like(r)
    for gid in g.unique():
        sel = g == gid
        x = r[sel]
        a = x - x.mean()
        std = x.std(unbiased=False)
        if std_normalise and std > 0:
            a = a / (std + eps)
        out[sel] = a
    return out.tolist()


def step_advantages(confidences: Sequence[float | None], outcome: bool | float) -> list[float]:
    """A_S,t = q_{t+1} - q_t, and I - q_T for the last step: how much step t raised the success estimate.

    A step without a stated confidence (plain turn) gets 0, and so does the step before it.
    """
    qs = list(confidences) + [float(outcome)]
    return [0.0 if qs[t] is None or qs[t + 1] is None else float(qs[t + 1]) - float(qs[t])
            for t in range(len(confidences))]


def policy_advantage(a_episode: float, a_step: float, omega: float) -> float:
    """A_E + omega * A_S: the advantage of a step's policy-span tokens."""
    return a_episode + omega * a_step


def token_advantages(n_tokens: int, turn_spans: Sequence[tuple[int, int]], wm_mask: Sequence[int],
                     policy_mask: Sequence[int], obs_mask: Sequence[int], a_episode: float,
                     a_wm: Sequence[float | None], a_policy: Sequence[float]) -> list[float]:
    """Per-token advantages of one rollout's response (prompt excluded).

    Generated tokens get A_E by default (the end-of-turn token, whitespace between tags, a malformed
    turn); a turn's world-model-span tokens get its A_WM when that is not None; its policy-span tokens
    its A_E + omega * A_S; observation tokens 0 (they are masked out of the loss anyway).
    ``turn_spans[t] = (start, end)`` are the token positions generated in turn t.
    """
    if not (len(wm_mask) == len(policy_mask) == len(obs_mask) == n_tokens):
        raise ValueError("masks must have one entry per response token")
    if not (len(turn_spans) == len(a_wm) == len(a_policy)):
        raise ValueError("need one turn span, A_WM and policy advantage per turn")
    adv = [0.0 if obs_mask[i] else a_episode for i in range(n_tokens)]
    for (start, end), awm, apol in zip(turn_spans, a_wm, a_policy):
        for i in range(start, end):
            if wm_mask[i] and awm is not None:
                adv[i] = awm
            elif policy_mask[i]:
                adv[i] = apol
    return adv


# ---------------------------------------------------------------------------------------------
# Loss


@dataclass
class LossStats:
    """Token-weighted diagnostics of one loss call (summed, so micro-batches add up; divide by tokens)."""

    tokens: float
    clipped: float  # tokens whose clipped term was the one taken (the gradient is cut)
    ratio: float  # sum of pi / pi_old
    approx_kl: float  # sum of k3(pi_old || pi): how far the update moved
    ref_kl: float  # sum of k3(pi_ref || pi), when a reference is given

    def __add__(self, o: "LossStats") -> "LossStats":
        return LossStats(self.tokens + o.tokens, self.clipped + o.clipped, self.ratio + o.ratio,
                         self.approx_kl + o.approx_kl, self.ref_kl + o.ref_kl)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) on tokens sampled from pi: e^d - d - 1, d = ref - lp >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 0.2, clip_high: float = 0.2, ref_logprobs: torch.Tensor | None = None,
              kl_coef: float = 0.0, loss_agg: str = "token", normaliser: float | None = None,
              seq_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """GRPO clipped surrogate with per-token advantages, over flat (N,) token tensors.

    per token:  ratio = exp(lp - lp_old)
                l = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3(lp, lp_ref)
    loss_agg "token":    sum(l * mask) / normaliser      (normaliser: tokens in the whole mini-batch;
                                                           default this call's masked tokens)
    loss_agg "sequence": sum over sequences of mean(l over the sequence's masked tokens) / normaliser
                         (normaliser: sequences in the mini-batch; ``seq_ids`` (N,) names each token's sequence)
    Passing the mini-batch's normaliser to every micro-batch makes the accumulated gradient equal the
    mini-batch's mean. Returns the loss and summed token stats.
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr = ratio * advantages
    surr_clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(surr, surr_clipped)
    ref_kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        ref_kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + kl_coef * ref_kl
    if loss_agg == "token":
        denom = float(mask.sum().item()) if normaliser is None else normaliser
        loss = (per_token * mask).sum() / max(denom, 1.0)
    elif loss_agg == "sequence":
        if seq_ids is None:
            raise ValueError("loss_agg 'sequence' needs seq_ids")
        n_seq = int(seq_ids.max().item()) + 1 if seq_ids.numel() else 0
        tok_per_seq = torch.zeros(n_seq, dtype=per_token.dtype).index_add_(0, seq_ids, mask)
        loss_per_seq = torch.zeros(n_seq, dtype=per_token.dtype).index_add_(0, seq_ids, per_token * mask)
        has = tok_per_seq > 0
        denom = float(has.sum().item()) if normaliser is None else normaliser
        loss = (loss_per_seq[has] / tok_per_seq[has]).sum() / max(denom, 1.0)
    else:
        raise ValueError(f"loss_agg must be 'token' or 'sequence', got {loss_agg!r}")
    with torch.no_grad():
        clipped = (surr_clipped < surr).to(mask.dtype)  # min picked the clipped term, strictly
        stats = LossStats(tokens=float(mask.sum()), clipped=float((clipped * mask).sum()),
                          ratio=float((ratio * mask).sum()),
                          approx_kl=float((k3_kl(logprobs, old_logprobs) * mask).sum()),
                          ref_kl=float((ref_kl * mask).sum()))
    return loss, stats

"""Training losses that never hold a (tokens, vocabulary) logits tensor: the fused linear cross-entropy.

    loss_fn = CausalLMLoss(model, chunk=1024, dtype=torch.bfloat16)
    sums = loss_fn(input_ids, position_ids, {"all": labels, "wm": wm_labels})   # name -> summed NLL

Only target positions go through the LM head, chunk by chunk, with the gradient computed in the forward
(Liger's trick). ``foresight_core.sft`` trains with it; ``tests/test_sft.py`` checks it against
``F.cross_entropy`` on full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foresight_core.packing import IGNORE


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) with the gradients computed chunk by chunk during the forward,
    so no (N, V) logits tensor outlives its chunk (the trick of Liger's fused linear CE)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype):
        # hidden (N, H), weight (V, H), targets (N,)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            need_w = ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hidden)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, h.shape[0], chunk):
                hc, y = h[s:s + chunk], targets[s:s + chunk]
                logits = (hc @ w.T).float()  # (c, V)
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(y), device=y.device), y] -= 1.0  # dCE/dlogits
                g = probs.to(dtype)
                grad_h[s:s + chunk] = g @ w  # (c, H)
                if need_w:
                    grad_w += (g.T @ hc).float()  # (V, H)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h * grad_out, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 1024, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, matmuls in ``dtype``, softmax in fp32."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (and DDP's hooks) connected
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = (hidden[s:s + chunk].to(dtype) @ weight.to(dtype).T).float()
        total += F.cross_entropy(logits, targets[s:s + chunk], reduction="sum")
    return total


class CausalLMLoss(nn.Module):
    """A causal LM that returns summed next-token losses of packed rows, one per label row.

    The decoder runs on the packed rows (position ids restart per sample; no attention mask, so
    transformers builds the block-diagonal causal mask); then only target positions go through
    the LM head (``linear_cross_entropy``). Wrap *this* module in DDP, so its forward is what DDP
    sees. Models with logit soft-capping or scaling (Gemma 2, Cohere) are refused: their logits are
    not a plain ``lm_head`` projection.
    """

    def __init__(self, model: nn.Module, chunk: int = 1024, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model = model
        self.chunk, self.dtype = chunk, dtype
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        cfg = base.config
        for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(cfg, attr, None) not in (None, 1.0):
                raise ValueError(f"{type(base).__name__} has {attr}={getattr(cfg, attr)}: its logits are not "
                                 "lm_head(hidden), which the fused loss assumes")
        self.decoder, self.lm_head = base.get_decoder(), base.get_output_embeddings()
        if getattr(self.lm_head, "bias", None) is not None:
            raise ValueError("an LM head with a bias is not supported by the fused loss")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # input_ids, position_ids, labels[*]: (B, T)
        hidden = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        out = {}
        for name, lab in labels.items():
            sel = lab != IGNORE  # (B, T)
            out[name] = linear_cross_entropy(hidden[sel], self.lm_head.weight, lab[sel], self.chunk, self.dtype)
        return out  # name -> summed NLL over that row's targets

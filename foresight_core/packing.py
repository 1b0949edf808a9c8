"""Sequence packing: many tokenised samples in fixed ``seq_len`` rows, with no cross-contamination.

A packed row holds several samples back to back, then padding::

    input_ids     a0 a1 a2 a3 | b0 b1 b2 | pad pad
    position_ids   0  1  2  3 |  0  1  2 |   0   1     <- restart at 0 for every sample
    labels        a1 a2 a3  x | b1 b2  x |   x   x     <- pre-shifted targets; x = -100 (no loss)

Isolation: the model is called with ``position_ids`` and *no* attention mask (and ``use_cache=False``).
transformers (5.x, ``masking_utils.find_packed_sequence_indices``) reads the restarts in
``position_ids`` and builds a block-diagonal causal mask for SDPA, so a token attends only to
earlier tokens of its own sample; RoPE sees each sample's own positions. ``tests/test_packing.py``
proves it: the logits of a packed row equal those of each sample run alone. (Measured on this
CPU: SDPA with that mask costs ~30 ms/layer fwd+bwd vs ~25 ms for a plain causal row of the same
size, so a hand-written per-sample varlen kernel would save ~3% of a step; not worth the code.)

Labels are shifted here, inside each sample: ``labels[o + j] = ids[j + 1]`` when token ``j + 1``
is a target (its mask bit is 1), else -100; the last token of a sample never has a target, so no
loss crosses a sample boundary. The loss is then a plain cross-entropy of position i's logits
against ``labels[i]`` (no further shift).

Long samples (more than ``seq_len`` tokens): ``long_samples="split"`` (default) cuts them into
chunks of ``seq_len`` that overlap by one token, so every target of the sample is trained exactly
once (chunk k covers tokens ``[k(T-1), k(T-1)+T)``; each chunk starts at position 0, i.e. without
the earlier context -- the usual pretraining trade-off); ``"truncate"`` keeps the first ``seq_len``
tokens and drops the rest. Both are counted in ``PackStats``.

Samples go into rows by best-fit decreasing (longest first, each into the fullest row it still
fits), which leaves little padding; row order is shuffled per epoch by the training loop.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

IGNORE = -100


@dataclass
class LMSample:
    """Token ids plus named 0/1 masks of the same length; each mask becomes one label row when packed
    (e.g. ``{"loss": ..., "wm": ...}``: the training targets, the world-model-span targets)."""

    input_ids: list[int]
    masks: dict[str, list[int]]

    def __post_init__(self) -> None:
        for name, m in self.masks.items():
            if len(m) != len(self.input_ids):
                raise ValueError(f"mask {name!r} has {len(m)} entries for {len(self.input_ids)} tokens")


@dataclass
class PackStats:
    seq_len: int = 0
    """Row length."""
    samples: int = 0
    """Samples given to the packer."""
    rows: int = 0
    """Packed rows produced."""
    split: int = 0
    """Samples longer than seq_len cut into chunks (long_samples="split")."""
    truncated: int = 0
    """Samples longer than seq_len cut to their first seq_len tokens (long_samples="truncate")."""
    dropped_tokens: int = 0
    """Tokens lost to truncation."""
    empty: int = 0
    """Samples / chunks dropped because they had no target under ``drop_empty``'s mask."""
    tokens: int = 0
    """Real (non-pad) tokens in the rows."""
    targets: dict[str, int] = field(default_factory=dict)
    """Number of targets per label row."""

    @property
    def fill(self) -> float:
        """Share of row slots holding real tokens (1 - padding waste)."""
        return self.tokens / max(1, self.rows * self.seq_len)


@dataclass
class Packed:
    """Rows of equal length, ready to be batched by indexing (``packed.batch(idx)``)."""

    input_ids: torch.Tensor  # (N, T) int64
    position_ids: torch.Tensor  # (N, T) int64, restarting at 0 per sample
    labels: dict[str, torch.Tensor]  # name -> (N, T) int64, IGNORE where no target
    n_real: torch.Tensor  # (N,) int64, real (non-pad) tokens per row
    stats: PackStats

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, idx: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"input_ids", "position_ids", "labels" (the "loss" row), "labels_<name>" ...}``, each (B, T),
        and ``"n_real"`` (B,): real tokens per row."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {"input_ids": self.input_ids[idx], "position_ids": self.position_ids[idx], "n_real": self.n_real[idx]}
        for name, lab in self.labels.items():
            out["labels" if name == "loss" else f"labels_{name}"] = lab[idx]
        return out


def shifted_labels(input_ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """Targets of one sample: position j predicts token j+1 when ``mask[j+1]`` is 1; the last is -100.

    >>> shifted_labels([5, 6, 7, 8], [0, 1, 0, 1])
    [6, -100, 8, -100]
    """
    n = len(input_ids)
    return [input_ids[j + 1] if mask[j + 1] else IGNORE for j in range(n - 1)] + ([IGNORE] if n else [])


def _chunks(sample: LMSample, seq_len: int) -> list[LMSample]:
    """Chunks of at most ``seq_len`` tokens overlapping by one token, so every target stays trained once."""
    n, step = len(sample.input_ids), seq_len - 1
    out, start = [], 0
    while True:
        end = min(start + seq_len, n)
        out.append(LMSample(sample.input_ids[start:end], {k: m[start:end] for k, m in sample.masks.items()}))
        if end == n:
            return out
        start += step


def pack(samples: Sequence[LMSample], seq_len: int, pad_id: int,
         long_samples: Literal["split", "truncate"] = "split", drop_empty: str | None = "loss") -> Packed:
    """Pack ``samples`` into rows of ``seq_len`` (best-fit decreasing); see the module docstring.

    ``drop_empty``: name of the mask whose targets a sample must have to be kept (None keeps all).
    Every sample must carry the same mask names.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    names = list(samples[0].masks) if samples else []
    stats = PackStats(seq_len=seq_len, samples=len(samples), targets={k: 0 for k in names})

    # ---- long samples: split or truncate; drop samples without targets
    pieces: list[LMSample] = []
    for s in samples:
        if list(s.masks) != names:
            raise ValueError(f"every sample needs masks {names}, got {list(s.masks)}")
        if len(s.input_ids) > seq_len:
            if long_samples == "split":
                stats.split += 1
                parts = _chunks(s, seq_len)
            else:
                stats.truncated += 1
                stats.dropped_tokens += len(s.input_ids) - seq_len
                parts = [LMSample(s.input_ids[:seq_len], {k: m[:seq_len] for k, m in s.masks.items()})]
        else:
            parts = [s]
        for p in parts:
            # a target is a mask bit on a token that has a predecessor in the same piece
            if drop_empty is not None and not any(p.masks[drop_empty][1:]):
                stats.empty += 1
            elif len(p.input_ids) > 0:
                pieces.append(p)

    # ---- best-fit decreasing: rows kept sorted by free space, each piece goes to the tightest fit
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i].input_ids), i))
    rows: list[list[int]] = []  # piece indices per row
    free: list[tuple[int, int]] = []  # sorted (free slots, row index)
    for i in order:
        n = len(pieces[i].input_ids)
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))

    # ---- materialise the rows
    N = len(rows)
    input_ids = torch.full((N, seq_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros((N, seq_len), dtype=torch.long)
    labels = {k: torch.full((N, seq_len), IGNORE, dtype=torch.long) for k in names}
    n_real = torch.zeros(N, dtype=torch.long)
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            p = pieces[i]
            n = len(p.input_ids)
            input_ids[r, o:o + n] = torch.tensor(p.input_ids)
            position_ids[r, o:o + n] = torch.arange(n)
            for k in names:
                labels[k][r, o:o + n] = torch.tensor(shifted_labels(p.input_ids, p.masks[k]))
            o += n
        position_ids[r, o:] = torch.arange(seq_len - o)  # padding: its own segment, no targets
        n_real[r] = o
        stats.tokens += o
    stats.rows = N
    for k in names:
        stats.targets[k] = int((labels[k] != IGNORE).sum())
    return Packed(input_ids, position_ids, labels, n_real, stats)

"""Attention on a slice of the heads, with masks defined by the GLOBAL head index.

Under Ulysses sequence parallelism (docs/long_sequences.md) a rank attends with heads
[offset, offset + local) of a model with ``total`` heads. Two patterns depend on the head:

- S2/SF-Attn shift the last round(total * shift_fraction) heads. Those form a suffix of the
  global heads, so on a slice they are again a suffix: the slice's own spec with
  shift_fraction = (shifted heads in the slice) / local gives the same mask on every backend
  (``localize``), and no kernel needs to know about the offset.
- block_sparse strides its column by h * head_step: the offset changes which blocks a head
  sees, so the backends that evaluate the predicate (dense, sdpa, flex) take ``HeadSlice``
  and evaluate ``mask_mod`` at h + offset with the global head count (``dense_mask_at``,
  ``mask_mod_at``); head_step defaults from the global count too.
Causal and sink_window do not depend on the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.masks import TRAINING_ONLY, head_dependent, head_step, mask_mod, num_shifted_heads, resolve_spec


@dataclass(frozen=True)
class HeadSlice:
    """Heads [offset, offset + local) of ``total``."""

    offset: int
    local: int
    total: int

    def __post_init__(self):
        if not (0 <= self.offset and self.offset + self.local <= self.total and self.local > 0):
            raise ValueError(f"head slice [{self.offset}, {self.offset + self.local}) outside 0..{self.total}")


def localize(spec: dict, heads: HeadSlice | None) -> tuple[dict, HeadSlice | None]:
    """(spec for the slice, the HeadSlice the backend still needs or None)."""
    if heads is None or (heads.offset == 0 and heads.local == heads.total):
        return spec, None
    spec = resolve_spec(spec)
    if spec["pattern"] in TRAINING_ONLY:
        first_shifted = heads.total - num_shifted_heads(spec, heads.total)
        shifted = min(heads.local, max(0, heads.offset + heads.local - first_shifted))
        return {**spec, "shift_fraction": shifted / heads.local}, None
    if spec["pattern"] == "block_sparse":
        return {**spec, "head_step": head_step(spec, heads.total)}, heads
    return spec, None


def mask_mod_at(spec: dict, ctx, heads: HeadSlice):
    """The predicate of the slice: local head h is global head h + offset."""
    allowed = mask_mod(spec, ctx, heads.total)

    def at(b, h, q_idx, kv_idx):
        return allowed(b, h + heads.offset, q_idx, kv_idx)

    return at


def dense_mask_at(spec: dict, ctx, heads: HeadSlice) -> torch.Tensor:
    """Boolean mask (B, local or 1, Lq, Lk) of the slice (kernels.masks.dense_mask on global heads)."""
    spec = resolve_spec(spec)
    B, Lq, Lk = ctx.batch, ctx.t_q.shape[1], ctx.t_k.shape[1]
    dev = ctx.t_q.device
    n = heads.local if head_dependent(spec, heads.total) else 1
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(n, device=dev).view(1, n, 1, 1)
    q = torch.arange(Lq, device=dev).view(1, 1, Lq, 1)
    k = torch.arange(Lk, device=dev).view(1, 1, 1, Lk)
    return mask_mod_at(spec, ctx, heads)(b, h, q, k).expand(B, n, Lq, Lk)

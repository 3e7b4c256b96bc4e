"""PyTorch SDPA with the predicate's boolean mask (or ``is_causal`` when the mask is plain causal).

The general fallback: any pattern, any context (decode steps, compact caches, ``wrap: roll``),
GQA through ``enable_gqa`` (no repeated K/V). Costs full attention: the mask is not skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.masks import MaskContext, dense_mask


def forward(q, k, v, spec: dict, ctx: MaskContext, scale: float, heads=None) -> torch.Tensor:
    """``heads``: a kernels.heads.HeadSlice when q holds a slice of the model's heads."""
    gqa = q.shape[1] != k.shape[1]
    if spec["pattern"] == "causal" and ctx.trivial:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if heads is None:
        mask = dense_mask(spec, ctx, q.shape[1])
    else:
        from kernels.heads import dense_mask_at

        mask = dense_mask_at(spec, ctx, heads)
    # A query with no visible key (padding) would give NaN in some kernels: let it see everything,
    # its output is zeroed below.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out * ctx.valid_q[:, None, :, None].to(out.dtype)

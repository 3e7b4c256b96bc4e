"""Causal self-attention that also returns each query row's log-sum-exp, in one fused pass.

H2O (finetune/caches/h2o.py) scores every key by the attention it received; with the row
log-sum-exp ``lse_i = log sum_j exp(s_ij)`` the probability of any (query, key) pair is
``exp(s_ij - lse_i)``, so the scores can be summed blockwise afterwards without a second
softmax over the prompt. On CPU this is PyTorch's flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``, the one backends/cpu_blocks.py calls), which
returns (out, lse); elsewhere a query-chunked explicit softmax (backends/dense.py) stands in.
The CPU kernel has no GQA: it is called once per KV head with that head repeated over its query
heads by a stride-0 view (no copy), as in cpu_blocks.
"""

from __future__ import annotations

import torch

from kernels.backends import dense
from kernels.masks import build_context, dense_mask

_OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

#: query rows per chunk of the non-CPU fallback (bounds its (B, H, rows, L) score block)
FALLBACK_ROWS = 512


def causal_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Causal self-attention of (B, H, L, D) queries over (B, Hkv, L, D) keys/values at positions
    0..L-1: (out (B, H, L, D) in q's dtype, lse (B, H, L) float32 or float64)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if q.device.type == "cpu":
        out = q.new_empty(B, H, L, v.shape[-1])
        lse = torch.empty(B, H, L, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        for g in range(Hkv):
            hs = slice(g * rep, (g + 1) * rep)
            kg = k[:, g : g + 1].expand(B, rep, L, D)
            vg = v[:, g : g + 1].expand(B, rep, L, v.shape[-1])
            o, l = _OP(q[:, hs], kg, vg, 0.0, True, attn_mask=None, scale=scale)
            out[:, hs] = o
            lse[:, hs] = l
        return out, lse
    ctx = build_context(B, L, L, q.device)
    outs, lses = [], []
    for start in range(0, L, FALLBACK_ROWS):
        sl = slice(start, min(L, start + FALLBACK_ROWS))
        o, l, _ = dense.attention_with_lse(q[:, :, sl], k, v, dense_mask({"pattern": "causal"},
                                           dense.slice_queries(ctx, sl), H), scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)

"""Dense reference: the predicate's boolean mask and a plain softmax.

Works in any dtype (tests use float64) and returns log-sum-exp and probabilities when asked,
which is what the LSE-merge tests and the H2O observer need. O(Lq * Lk) memory: a reference,
not a training kernel.
"""

from __future__ import annotations

import torch

from kernels.masks import MaskContext, dense_mask


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    B, H, L, D = q.shape
    return q.view(B, num_kv_heads, H // num_kv_heads, L, D)


def scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q @ k^T * scale for GQA without repeating K: (B, H, Lq, Lk)."""
    B, H, Lq, _ = q.shape
    s = torch.einsum("bgrqd,bgkd->bgrqk", _grouped(q, k.shape[1]), k) * scale
    return s.reshape(B, H, Lq, k.shape[2])


def apply_probs(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, H, Lq, Lk = p.shape
    out = torch.einsum("bgrqk,bgkd->bgrqd", p.view(B, v.shape[1], H // v.shape[1], Lq, Lk), v)
    return out.reshape(B, H, Lq, v.shape[-1])


def _upcast(*xs):
    """fp16/bf16 math in float32 (the sink part of the flash path runs here)."""
    return [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs]


def attention_with_lse(q, k, v, mask: torch.Tensor, scale: float):
    """(out, lse, probs) of masked softmax attention; rows with no visible key give out 0, lse -inf.
    Half-precision inputs are computed in float32; out is returned in q's dtype."""
    dtype = q.dtype
    q, k, v = _upcast(q, k, v)
    s = scores(q, k, scale).masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / denom.clamp_min(torch.finfo(e.dtype).tiny)
    lse = (torch.log(denom) + m).squeeze(-1)
    return apply_probs(p, v).to(dtype), lse, p


def attention_backward(dout, q, k, v, mask, scale, out, lse):
    """Gradients of one key part, given the FINAL (merged) out and lse.

    With P = exp(S - lse_final) on this part's keys and D = rowsum(dout * out_final), the
    gradients of a partition of the keys add up to those of the whole (the ring-attention
    identity); flash-attn's backward is called the same way in backends/flash.py.
    """
    dtypes = (q.dtype, k.dtype, v.dtype)
    dout, q, k, v, out = _upcast(dout, q, k, v, out)
    s = scores(q, k, scale).masked_fill(~mask, float("-inf"))
    lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)
    p = torch.exp(s - lse_f)
    B, H, Lq, Lk = p.shape
    Hkv = k.shape[1]
    dv = torch.einsum("bgrqk,bgrqd->bgkd", p.view(B, Hkv, H // Hkv, Lq, Lk), _grouped(dout, Hkv))
    dp = torch.einsum("bgrqd,bgkd->bgrqk", _grouped(dout, Hkv), v).reshape(B, H, Lq, Lk)
    delta = (dout * out).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bgrqk,bgkd->bgrqd", ds.view(B, Hkv, H // Hkv, Lq, Lk), k).reshape(q.shape)
    dk = torch.einsum("bgrqk,bgrqd->bgkd", ds.view(B, Hkv, H // Hkv, Lq, Lk), _grouped(q, Hkv))
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


def slice_queries(ctx: MaskContext, sl: slice) -> MaskContext:
    return MaskContext(
        ctx.t_q[:, sl], ctx.t_k, ctx.p_q[:, sl], ctx.p_k, ctx.doc_q[:, sl], ctx.doc_k,
        ctx.valid_q[:, sl], ctx.valid_k, ctx.length, False, False,
    )


def _mask(spec: dict, ctx: MaskContext, num_heads: int, heads) -> torch.Tensor:
    if heads is None:
        return dense_mask(spec, ctx, num_heads)
    from kernels.heads import dense_mask_at

    return dense_mask_at(spec, ctx, heads)


def forward(q, k, v, spec: dict, ctx: MaskContext, scale: float, observer=None, layer_idx=None,
            chunk: int | None = None, heads=None) -> torch.Tensor:
    """(B, H, Lq, D). With ``observer``, probabilities are computed in query chunks and handed
    to ``observer.observe_attention(layer_idx, probs)`` (probs: (B, H, chunk, Lk)).
    ``heads``: a kernels.heads.HeadSlice when q holds a slice of the model's heads."""
    H, Lq = q.shape[1], q.shape[2]
    if chunk is None or chunk >= Lq:
        out, _, p = attention_with_lse(q, k, v, _mask(spec, ctx, H, heads), scale)
        if observer is not None:
            observer.observe_attention(layer_idx, p.detach())
        return out
    outs = []
    for start in range(0, Lq, chunk):
        sl = slice(start, min(Lq, start + chunk))
        mask = _mask(spec, slice_queries(ctx, sl), H, heads)
        o, _, p = attention_with_lse(q[:, :, sl], k, v, mask, scale)
        if observer is not None:
            observer.observe_attention(layer_idx, p.detach())
        outs.append(o)
    return torch.cat(outs, dim=2)

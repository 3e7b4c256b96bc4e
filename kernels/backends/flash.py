"""flash-attn varlen kernels (CUDA + flash-attn installed only; imported lazily).

- S2/SF-Attn: a group intersected with a document is a contiguous run of a sample's tokens, so
  grouped causal attention is flash-attn varlen *causal* attention with cu_seqlens cut at group
  and document boundaries (per sample, from its own length). Shifted heads: a second call with
  boundaries offset by S. Nothing wraps.
- sink_window: varlen over documents with ``window_size=(window - 1, 0)``.
- causal with packed documents or padding: varlen over documents (no (L, L) mask).
- Sink tokens: attended separately (dense math, a few keys) and merged by log-sum-exp with an
  exact backward (backends/merge.py; the merge math is tested on CPU).
GQA is native in flash-attn (no repeated K/V). On CPU, tests/test_backends.py runs this module
against a dense stand-in of the flash-attn varlen API (cu_seqlens cuts, sink merge, backward
through the merged out/LSE); the real kernels only run in the ``gpu``-marked tests.
"""

from __future__ import annotations

import functools
import inspect

import torch

from kernels.backends.merge import Part, dense_part, merged_attention
from kernels.backends.sdpa_groups import kv_heads
from kernels.masks import TRAINING_ONLY, MaskContext, num_shifted_heads, ratio_fraction


@functools.lru_cache(maxsize=1)
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # missing, or built for another CUDA/torch
        return False
    return True


def supports(spec: dict, ctx: MaskContext) -> bool:
    if not ctx.self_attention:
        return False
    if spec["pattern"] in TRAINING_ONLY:
        return spec["wrap"] == "none"
    return spec["pattern"] in ("sink_window", "causal")


def _cu(starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and max length from a bool 'segment starts here' vector."""
    total = starts.numel()
    idx = starts.nonzero().squeeze(1)
    cu = torch.cat([idx, idx.new_tensor([total])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if total else 0


def _flash_part(cu, max_len, scale, window) -> Part:
    """A Part over packed (1, H, total, D) tensors, flash-attn inside."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward

    fwd_params = inspect.signature(_flash_attn_varlen_forward).parameters
    bwd_params = inspect.signature(_flash_attn_varlen_backward).parameters
    common = {"cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": max_len, "max_seqlen_k": max_len,
              "dropout_p": 0.0, "softmax_scale": scale, "causal": True}
    win = {"window_size_left": window[0], "window_size_right": window[1]} if "window_size_left" in fwd_params \
        else {"window_size": window}

    def pack(x):
        return x[0].transpose(0, 1).contiguous()  # (1, H, T, D) -> (T, H, D)

    def fwd(q, k, v):
        kw = {n: v_ for n, v_ in {**common, **win, "softcap": 0.0, "alibi_slopes": None,
                                   "return_softmax": False}.items() if n in fwd_params}
        res = _flash_attn_varlen_forward(pack(q), pack(k), pack(v), **kw)
        # 2.7+: (out, lse, S, rng); 2.6: (out, q, k, v, out_padded, lse, S, rng)
        out, lse = res[0], (res[1] if len(res) <= 4 else res[5])
        return out.transpose(0, 1).unsqueeze(0), lse.unsqueeze(0)  # lse (H, T) float32 -> (1, H, T)

    def bwd(dout, q, k, v, out, lse):
        dq, dk, dv = torch.empty_like(pack(q)), torch.empty_like(pack(k)), torch.empty_like(pack(v))
        kw = {**common, **win, "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "rng_state": None}
        kw = {n: v_ for n, v_ in kw.items() if n in bwd_params}
        _flash_attn_varlen_backward(pack(dout), pack(q), pack(k), pack(v), pack(out.to(q.dtype)),
                                    lse[0].contiguous(), dq, dk, dv, **kw)
        unpack = lambda x: x.transpose(0, 1).unsqueeze(0)
        return unpack(dq), unpack(dk), unpack(dv)

    return Part(fwd, bwd)


def _attend_packed(qp, kp, vp, seg_start, sink_mask, sink_idx, scale, window):
    """qp (1, Hs, T, D); flash over segments, sinks (1, 1, T, m) merged when present."""
    cu, max_len = _cu(seg_start)
    if sink_idx.numel() == 0 or sink_mask is None or not bool(sink_mask.any()):
        from flash_attn import flash_attn_varlen_func

        pack = lambda x: x[0].transpose(0, 1)
        out = flash_attn_varlen_func(pack(qp), pack(kp), pack(vp), cu, cu, max_len, max_len,
                                     softmax_scale=scale, causal=True, window_size=window)
        return out.transpose(0, 1).unsqueeze(0)
    ks, vs = kp[:, :, sink_idx], vp[:, :, sink_idx]
    return merged_attention(qp, [(kp, vp, _flash_part(cu, max_len, scale, window)),
                                 (ks, vs, dense_part(sink_mask, scale))])


def forward(q, k, v, spec: dict, ctx: MaskContext, scale: float) -> torch.Tensor:
    B, H, L, D = q.shape
    rep = H // k.shape[1]
    valid = ctx.valid_q
    b_tok = torch.arange(B, device=q.device)[:, None].expand(B, L)[valid]
    t, p, doc = ctx.t_q[valid], ctx.p_q[valid], ctx.doc_q[valid]
    to_packed = lambda x: x.transpose(1, 2)[valid].transpose(0, 1).unsqueeze(0)
    qp, kp, vp = to_packed(q), to_packed(k), to_packed(v)
    first = torch.ones_like(t, dtype=torch.bool)
    first[1:] = (b_tok[1:] != b_tok[:-1]) | (doc[1:] != doc[:-1])
    sinks = int(spec.get("num_sink_tokens", 0))
    is_sink = p < sinks
    sink_idx = is_sink.nonzero().squeeze(1)
    same = (b_tok[:, None] == b_tok[sink_idx][None]) & (doc[:, None] == doc[sink_idx][None]) \
        & (t[sink_idx][None] <= t[:, None])

    if spec["pattern"] == "causal":  # packed documents / padding without a (L, L) mask
        out_p = _attend_packed(qp, kp, vp, first, None, sink_idx[:0], scale, (-1, -1))
    elif spec["pattern"] == "sink_window":
        W = int(spec["window"])
        sink_mask = (same & (t[:, None] - t[sink_idx][None] >= W))[None, None]
        out_p = _attend_packed(qp, kp, vp, first, sink_mask, sink_idx, scale, (W - 1, 0))
    else:
        num, den = ratio_fraction(spec["group_ratio"])
        n_tok = ctx.length[b_tok]
        G = torch.clamp(n_tok * num // den, min=1)
        full = G >= n_tok
        split = H - num_shifted_heads(spec, H)
        outs = []
        for h0, h1, shifted in ((0, split, False), (split, H, True)):
            if h0 == h1:
                continue
            off = torch.where(full | (not shifted), 0, G // 2)
            grp = torch.where(full, 0, (t + off) // G)
            start = first.clone()
            start[1:] |= grp[1:] != grp[:-1]
            seg = torch.cumsum(start.long(), 0)
            sink_mask = (same & (seg[sink_idx][None] != seg[:, None]))[None, None]
            ks, vs = kv_heads(kp, h0, h1, rep), kv_heads(vp, h0, h1, rep)
            outs.append(_attend_packed(qp[:, h0:h1], ks, vs, start, sink_mask, sink_idx, scale, (-1, -1)))
        out_p = torch.cat(outs, dim=1)
    out = q.new_zeros(B, L, H, D)
    out[valid] = out_p[0].transpose(0, 1).to(q.dtype)
    return out.transpose(1, 2)

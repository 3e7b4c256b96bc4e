"""Grouped SDPA: S2/SF-Attn groups (and sink_window chunks) become batch rows.

For every query row we gather a *superset* of the keys the pattern allows (its group, or its
window range, plus the sample's sink tokens prepended), evaluate the same predicate from
kernels/masks.py on that gathered block, and run SDPA on (rows, heads, G, keys). Shifted heads
use groups offset by S (S dummy slots in front), so nothing wraps and nothing leaks. A sink key
that already lies in the row's own group/range is dropped from the prepended part, so no key
is counted twice. Cost: n * (G + sinks) per head instead of n^2 / 2.

Padding and packed documents: each sample's real tokens are gathered in order (G from its own
length), and the predicate removes cross-document pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.masks import TRAINING_ONLY, MaskContext, mask_mod, num_shifted_heads, ratio_fraction


def supports(spec: dict, ctx: MaskContext) -> bool:
    if not ctx.self_attention:
        return False
    if spec["pattern"] in TRAINING_ONLY:
        return spec["wrap"] == "none"
    return spec["pattern"] == "sink_window"


def _kv_heads(k: torch.Tensor, h0: int, h1: int, rep: int) -> torch.Tensor:
    """K/V heads serving query heads [h0, h1): a slice when aligned (SDPA's enable_gqa then
    maps them), else an index (materialised, only for odd shift fractions)."""
    if h0 % rep == 0 and h1 % rep == 0:
        return k[:, h0 // rep : h1 // rep]
    if h0 // rep == (h1 - 1) // rep:
        return k[:, h0 // rep : h0 // rep + 1]
    return k[:, torch.arange(h0, h1, device=k.device) // rep]


def _rows_attention(q_b, k_b, v_b, rows, qt, kt, extra, allowed, b, h0, scale):
    """SDPA over gathered rows. q_b (Hs, L, D), k_b/v_b (Hkv_s, L, D); qt (R, Gq), kt (R, K) are
    sample indices (-1 = dummy); extra (R, 1, K) or None further restricts the keys.
    Returns (Hs, n, D): outputs of the real queries in sample order."""
    q_row, k_row = rows[qt.clamp(min=0)], rows[kt.clamp(min=0)]
    dev = q_b.device
    mask = allowed(torch.tensor(b, device=dev), torch.tensor(h0, device=dev),
                   q_row[:, None, :, None], k_row[:, None, None, :])
    mask = mask & (qt >= 0)[:, None, :, None] & (kt >= 0)[:, None, None, :]
    if extra is not None:
        mask = mask & extra[:, None]
    mask = mask | ~mask.any(dim=-1, keepdim=True)  # dummy query rows: output discarded
    qg = q_b[:, q_row].transpose(0, 1)  # (R, Hs, Gq, D)
    kg = k_b[:, k_row].transpose(0, 1)
    vg = v_b[:, k_row].transpose(0, 1)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale,
                                       enable_gqa=qg.shape[1] != kg.shape[1])
    o = o.transpose(0, 1).reshape(o.shape[1], -1, o.shape[-1])  # (Hs, R*Gq, D)
    keep = (qt.reshape(-1) >= 0).nonzero().squeeze(1)
    return o[:, keep]


def _sink_t(ctx: MaskContext, b: int, rows: torch.Tensor, sinks: int) -> torch.Tensor:
    if sinks <= 0:
        return rows.new_zeros(0)
    return (ctx.p_k[b, rows] < sinks).nonzero().squeeze(1)


def _group_rows(n: int, G: int, off: int, sink_t: torch.Tensor, device):
    R = -(-(n + off) // G)
    qt = torch.arange(R * G, device=device) - off
    qt = torch.where((qt >= 0) & (qt < n), qt, torch.full_like(qt, -1)).view(R, G)
    if sink_t.numel() == 0:
        return qt, qt, None
    m = sink_t.numel()
    kt = torch.cat([sink_t.expand(R, m), qt], dim=1)
    r = torch.arange(R, device=device)[:, None]
    not_in_group = (sink_t[None, :] + off) // G != r
    extra = torch.cat([not_in_group, torch.ones(R, G, dtype=torch.bool, device=device)], dim=1)
    return qt, kt, extra[:, None, :]


def _window_rows(n: int, window: int, chunk: int, sink_t: torch.Tensor, device):
    R = -(-n // chunk)
    qt = torch.arange(R * chunk, device=device)
    qt = torch.where(qt < n, qt, torch.full_like(qt, -1)).view(R, chunk)
    start = torch.arange(R, device=device)[:, None] * chunk - window + 1
    kt = start + torch.arange(chunk + window - 1, device=device)[None, :]
    kt = torch.where((kt >= 0) & (kt < n), kt, torch.full_like(kt, -1))
    if sink_t.numel() == 0:
        return qt, kt, None
    m = sink_t.numel()
    extra = torch.cat([sink_t[None, :] < start, torch.ones_like(kt, dtype=torch.bool)], dim=1)
    return qt, torch.cat([sink_t.expand(R, m), kt], dim=1), extra[:, None, :]


def default_chunk(window: int) -> int:
    """Query chunk for sink_window: keys per chunk = window + chunk, so smaller chunks waste less
    but make more, smaller SDPA rows; window/4 (>= 64) measured best on CPU (docs/benchmarks.md)."""
    return max(64, min(window, window // 4))


def forward(q, k, v, spec: dict, ctx: MaskContext, scale: float, chunk: int | None = None) -> torch.Tensor:
    B, H, L, D = q.shape
    rep = H // k.shape[1]
    allowed = mask_mod(spec, ctx, H)
    pattern = spec["pattern"]
    sinks = int(spec.get("num_sink_tokens", 0))
    outs = []
    for b in range(B):
        rows = ctx.valid_q[b].nonzero().squeeze(1) if not ctx.trivial else torch.arange(L, device=q.device)
        n = rows.numel()
        sink_t = _sink_t(ctx, b, rows, sinks)
        if pattern == "sink_window":
            W = int(spec["window"])
            qt, kt, extra = _window_rows(n, W, chunk or default_chunk(W), sink_t, q.device)
            o = _rows_attention(q[b], k[b], v[b], rows, qt, kt, extra, allowed, b, 0, scale)
        else:
            num, den = ratio_fraction(spec["group_ratio"])
            G = max(1, n * num // den)
            split = H - num_shifted_heads(spec, H)
            parts = []
            for h0, h1, shifted in ((0, split, False), (split, H, True)):
                if h0 == h1:
                    continue
                off = G // 2 if shifted and G < n else 0
                g = G if G < n else max(n, 1)
                qt, kt, extra = _group_rows(n, g, off, sink_t, q.device)
                kh, vh = _kv_heads(k[b : b + 1], h0, h1, rep)[0], _kv_heads(v[b : b + 1], h0, h1, rep)[0]
                parts.append(_rows_attention(q[b, h0:h1], kh, vh, rows, qt, kt, extra, allowed, b, h0, scale))
            o = torch.cat(parts, dim=0)
        if n != L:
            o = q.new_zeros(H, L, D).index_copy(1, rows, o)
        outs.append(o)
    return torch.stack(outs)

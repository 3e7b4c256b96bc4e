"""Grouped SDPA, the fast CPU path: S2/SF-Attn groups and sink_window chunks become batch rows.

Forms, all checked against the dense reference (tests/test_backends.py):
- CPU, samples whose real tokens are one contiguous run of one document (``_cpu_plan``, run
  by backends/cpu_blocks.py): strided views of q/k/v, no copies, one autograd Function.
  S2/SF: each group is causal attention (``is_causal``, no mask); equal-length groups are rows
  of one kernel call (the shifted heads' short first and last groups share one call). SF's
  sinks: one explicit part per sample (q x m keys) merged by log-sum-exp for every query
  outside the first group (which already holds them). sink_window: queries [0, W) causal, then
  chunks of C (``default_chunk``) attending keys [s - W + 1, s + C) through a cached band mask,
  sinks beyond the window merged the same way.
- other devices, one-document samples, S2/SF (``_fast_groups``): equal-length groups are a
  reshape and one ``is_causal`` SDPA call; sinks are prepended to every later group as keys
  *and* queries (top-left causal alignment then shows each query all sinks plus its prefix).
- anything else (packed documents, tiny groups): gather a *superset* of the allowed keys per
  row (group or window range, plus the sample's sink tokens, a sink already in the row's range
  dropped so no key counts twice), evaluate the predicate of kernels/masks.py on it, one
  masked SDPA call.
Shifted heads start with a short group [0, G - S), so nothing wraps and nothing leaks.
Padding: G from each sample's own length; the plan addresses the real tokens where they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends import cpu_blocks
from kernels.masks import TRAINING_ONLY, MaskContext, mask_mod, num_shifted_heads, ratio_fraction


def supports(spec: dict, ctx: MaskContext) -> bool:
    if not ctx.self_attention:
        return False
    if spec["pattern"] in TRAINING_ONLY:
        return spec["wrap"] == "none"
    return spec["pattern"] == "sink_window"


def kv_heads(k: torch.Tensor, h0: int, h1: int, rep: int) -> torch.Tensor:
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


def _causal_rows(q, k, v, sink_q, sink_k, sink_v, scale):
    """SDPA is_causal over rows (R, H, L, D); with sinks, the m sink tokens are prepended as
    keys AND queries, so top-left causal alignment lets every row query see all sinks plus its
    own causal prefix without any mask (the sink queries' outputs are dropped)."""
    gqa = q.shape[1] != k.shape[1]
    if sink_q is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    R, m = q.shape[0], sink_q.shape[1]
    cat = lambda s, x: torch.cat([s.unsqueeze(0).expand(R, -1, -1, -1), x], dim=2)
    out = F.scaled_dot_product_attention(cat(sink_q, q), cat(sink_k, k), cat(sink_v, v), is_causal=True,
                                         scale=scale, enable_gqa=gqa)
    return out[:, :, m:]


def _fast_groups(qs, ks, vs, n, G, off, m, scale):
    """Mask-free grouped attention of one sample with one document (no padding inside).

    qs (Hs, n, D), ks/vs (Hkv_s, n, D) in sample order; groups are [0, G - off), then G-long
    runs, then the remainder. Sinks (first m tokens) belong to the first run and are
    prepended to every later run. Returns (Hs, n, D), or None when the first run is shorter
    than the sinks (tiny groups: the masked path handles it)."""
    segs = []  # (start, count, length): `count` consecutive runs of `length`
    pos = 0
    if off:  # (t + off) // G: the first group is [0, G - off) (= [0, S) for even G)
        pos = min(G - off, n)
        segs.append((0, 1, pos))
    full = (n - pos) // G
    if full:
        if pos == 0 and m:
            segs.append((0, 1, G))
            if full > 1:
                segs.append((G, full - 1, G))
        else:
            segs.append((pos, full, G))
        pos += full * G
    if pos < n:
        segs.append((pos, 1, n - pos))
    if m and segs[0][2] < m:
        return None
    sq, sk, sv = (qs[:, :m], ks[:, :m], vs[:, :m]) if m else (None, None, None)
    outs = []
    for start, count, length in segs:
        qv, kv, vv = (_runs(x, start, count, length) for x in (qs, ks, vs))
        with_sinks = m and start > 0
        o = _causal_rows(qv, kv, vv, *((sq, sk, sv) if with_sinks else (None, None, None)), scale)
        outs.append(o.transpose(0, 1).reshape(o.shape[1], count * length, -1))
    return torch.cat(outs, dim=1)


def _runs(x: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    """(H, n, D) -> (count, H, length, D): `count` consecutive runs of `length` from `start`."""
    return x[:, start:start + count * length].reshape(x.shape[0], count, length, -1).transpose(0, 1).contiguous()


def _single_document(ctx: MaskContext, b: int, rows: torch.Tensor) -> bool:
    if ctx.trivial:
        return True
    d, p, t = ctx.doc_q[b, rows], ctx.p_q[b, rows], ctx.t_q[b, rows]
    return bool((d == d[0]).all()) and bool((p == t).all())


def default_chunk(window: int) -> int:
    """Query chunk C for sink_window on CPU: min(256, W/2). A chunk costs C * (W + C - 1) for
    C * W useful pairs, and the CPU kernel runs queries in blocks of 64 rows from 192 queries
    (256 rows from 768): 256 measured best among 128..1024 at W = 1024 and 2048 (the band mask
    costs ~5%; docs/kernels.md)."""
    return max(1, min(256, window // 2))


def _contiguous_rows(rows: torch.Tensor) -> bool:
    return rows.numel() > 0 and int(rows[-1]) - int(rows[0]) + 1 == rows.numel()


def _cpu_plan(spec: dict, ctx: MaskContext, b: int, bb: int, rows: torch.Tensor, H: int, rep: int,
              chunk: int | None):
    """(blocks, sinks) of sample b addressed as sample bb, or None when the sample needs the
    masked path (packed documents, a row with gaps, a first group shorter than the sinks)."""
    if not _contiguous_rows(rows) or not _single_document(ctx, b, rows):
        return None
    r0, n = int(rows[0]), rows.numel()
    m = min(int(spec.get("num_sink_tokens", 0)), n)
    dev = rows.device
    t = torch.arange(n, device=dev).view(1, n, 1)
    if spec["pattern"] == "sink_window":
        W = int(spec["window"])
        blocks = cpu_blocks.window_blocks(bb, r0, n, W, chunk or default_chunk(W), H, rep)
        # sinks beyond the window: token t sees sink j there iff t - j >= W
        hidden = t - torch.arange(m, device=dev).view(1, 1, m) < W
        return blocks, [cpu_blocks.Sinks(bb, r0, n, m, hidden)] if m and n > W else []
    num, den = ratio_fraction(spec["group_ratio"])
    G = max(1, n * num // den)
    split = H - num_shifted_heads(spec, H)
    blocks, first = [], torch.full((H, 1, 1), n, device=dev)
    for h0, h1, shifted in ((0, split, False), (split, H, True)):
        if h0 == h1:
            continue
        off = G // 2 if shifted and G < n else 0
        g = min(G, n)
        first[h0:h1] = g - off  # the first group [0, g - off) holds the sinks
        if m and g - off < m:
            return None
        blocks += cpu_blocks.group_blocks(bb, r0, n, g, off, h0, h1, rep)
    # later groups see every sink through the sink part
    return blocks, [cpu_blocks.Sinks(bb, r0, n, m, t < first)] if m and int(first.min()) < n else []


def forward(q, k, v, spec: dict, ctx: MaskContext, scale: float, chunk: int | None = None) -> torch.Tensor:
    B, H, L, D = q.shape
    rep = H // k.shape[1]
    allowed = mask_mod(spec, ctx, H)
    pattern = spec["pattern"]
    sinks = int(spec.get("num_sink_tokens", 0))
    all_rows = [ctx.valid_q[b].nonzero().squeeze(1) if not ctx.trivial else torch.arange(L, device=q.device)
                for b in range(B)]
    cpu = q.device.type == "cpu"
    if cpu:
        # One plan for the whole batch when every sample has one (the usual case).
        plans = [_cpu_plan(spec, ctx, b, b, all_rows[b], H, rep, chunk) for b in range(B)]
        if all(p is not None for p in plans):
            covers = all(r.numel() == L for r in all_rows)
            return cpu_blocks.run(q, k, v, [x for p in plans for x in p[0]], [x for p in plans for x in p[1]],
                                  scale, covers)
    outs = []
    for b in range(B):
        rows = all_rows[b]
        n = rows.numel()
        if cpu and plans[b] is not None:
            blocks, sinks_ = _cpu_plan(spec, ctx, b, 0, rows, H, rep, chunk)
            outs.append(cpu_blocks.run(q[b:b + 1], k[b:b + 1], v[b:b + 1], blocks, sinks_, scale, n == L)[0])
            continue
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
            fast = n > 0 and _single_document(ctx, b, rows)
            qb, kb, vb = (x[b] if n == L else x[b][:, rows] for x in (q, k, v)) if fast else (None,) * 3
            for h0, h1, shifted in ((0, split, False), (split, H, True)):
                if h0 == h1:
                    continue
                off = G // 2 if shifted and G < n else 0
                g = G if G < n else max(n, 1)
                if fast:
                    kh, vh = kv_heads(kb[None], h0, h1, rep)[0], kv_heads(vb[None], h0, h1, rep)[0]
                    o = _fast_groups(qb[h0:h1], kh, vh, n, g, off, sink_t.numel(), scale)
                    if o is not None:
                        parts.append(o)
                        continue
                qt, kt, extra = _group_rows(n, g, off, sink_t, q.device)
                kh, vh = kv_heads(k[b : b + 1], h0, h1, rep)[0], kv_heads(v[b : b + 1], h0, h1, rep)[0]
                parts.append(_rows_attention(q[b, h0:h1], kh, vh, rows, qt, kt, extra, allowed, b, h0, scale))
            o = torch.cat(parts, dim=0)
        if n != L:
            o = q.new_zeros(H, L, D).index_copy(1, rows, o)
        outs.append(o)
    return torch.stack(outs)

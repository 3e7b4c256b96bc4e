"""Grouped SDPA, the fast CPU path: S2/SF-Attn groups and sink_window chunks become batch rows.

Three forms, all checked against the dense reference (tests/test_backends.py):
- one-document samples, S2/SF (``_fast_groups``): groups are contiguous runs of the sample's
  tokens, so equal-length groups are a reshape and one ``is_causal`` SDPA call, no mask; sinks
  are prepended to every later group as keys *and* queries (top-left causal alignment then
  shows each query all sinks plus its causal prefix). Shifted heads start with a short group
  [0, G - S), so nothing wraps and nothing leaks.
- one-document samples, sink_window on CPU (``_fast_window``): query chunks of W/2 attend their
  own chunk, the previous chunk and a reversed-causal block, merged by log-sum-exp with the
  sinks (backends/merge.py); no masks.
- anything else (packed documents, tiny groups): gather a *superset* of the allowed keys per
  row (group or window range, plus the sample's sink tokens, a sink already in the row's range
  dropped so no key counts twice), evaluate the predicate of kernels/masks.py on it, one
  masked SDPA call.
Padding: each sample's real tokens are gathered in order, G from its own length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backends.merge import Part, dense_part, merged_attention
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


def _cpu_flash_part(is_causal: bool, mask, scale: float, rep: int) -> Part:
    """A merge Part on PyTorch's CPU flash kernel, which returns the LSE and whose backward
    accepts the merged out/LSE (ring-attention identity). No GQA in that op: K/V are repeated
    for it (and their gradients summed back)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    op_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    expand = (lambda x: x) if rep == 1 else (lambda x: x.repeat_interleave(rep, dim=1))

    # The kernel reports lse 0 (not -inf) for a row with no visible key: fix it, or the merge
    # would give that empty part weight.
    empty = None if mask is None else ~torch.isfinite(mask).any(dim=-1)

    def fwd(q, k, v):
        out, lse = op(q, expand(k), expand(v), 0.0, is_causal, attn_mask=mask, scale=scale)
        if empty is not None and bool(empty.any()):
            lse = lse.masked_fill(empty, float("-inf"))
        return out, lse

    def bwd(dout, q, k, v, out, lse):
        dq, dk, dv = op_bwd(dout, q, expand(k), expand(v), out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
        if rep > 1:
            dk, dv = (d.unflatten(1, (k.shape[1], rep)).sum(2) for d in (dk, dv))
        return dq, dk, dv

    return Part(fwd, bwd)


def _fast_window(qs, ks, vs, n: int, W: int, C: int, m: int, scale: float) -> torch.Tensor:
    """Mask-light sink_window of one sample with one document, on CPU: (H, n, D).

    Queries in chunks of C. Each chunk attends (A) its own chunk causally, (B) the W-1 keys
    before it through a fixed band mask,
    and (C) the sinks that fell out of its window; A, B and C are merged by log-sum-exp.
    Cost n * (C/2 + W) instead of the dense n * n / 2."""
    H, D = qs.shape[0], qs.shape[-1]
    rep = H // ks.shape[0]
    if W >= n:  # every key is in the window: causal attention
        return F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scale,
                                              enable_gqa=rep > 1)[0]
    R = -(-n // C)
    pad = R * C - n
    rows = lambda x: (F.pad(x, (0, 0, 0, pad)) if pad else x).view(x.shape[0], R, C, D).transpose(0, 1)
    qr, kr, vr = rows(qs), rows(ks), rows(vs)
    out0 = F.scaled_dot_product_attention(qr[:1], kr[:1], vr[:1], is_causal=True, scale=scale, enable_gqa=rep > 1)
    if R == 1:
        return out0[0, :, :n]
    if W == 2 * C:
        return _aligned_window(qr, kr, vr, ks[:, :m], vs[:, :m], out0, n, C, scale, rep)
    # (B): the W-1 keys [c*C - W + 1, c*C) before chunk c >= 1 (a copy left-padded by W-1);
    # key k of that block is visible from query q iff k >= q (C <= W-1 keeps rows non-empty).
    # Rows whose block is all real keys split it into a C-wide masked triangle and an
    # unmasked rest (cheaper kernel); the first rows keep one masked block.
    Wb = W - 1
    dev = qs.device
    kb, vb = ((F.pad(x, (0, 0, Wb, 0)).unfold(1, Wb, C)[:, 1:R].permute(1, 0, 3, 2) if Wb else None) for x in (ks, vs))
    qi = torch.arange(C, device=dev).view(1, 1, C, 1)
    r0 = min(R, max(1, -(-Wb // C)))
    outs = [out0]
    for lo, hi in ((1, r0), (r0, R)):
        if lo >= hi:
            continue
        sl = slice(lo - 1, hi - 1)  # rows of kb/vb
        c = torch.arange(lo, hi, device=dev).view(-1, 1, 1, 1)
        parts = [(kr[lo:hi], vr[lo:hi], _cpu_flash_part(True, None, scale, rep))]
        if Wb and lo == 1:
            ki = torch.arange(Wb, device=dev).view(1, 1, 1, Wb)
            ok = (ki >= qi) & (ki >= Wb - c * C)
            parts.append((kb[sl], vb[sl], _cpu_flash_part(False, _additive(ok, qs.dtype), scale, rep)))
        elif Wb:
            ki = torch.arange(min(C, Wb), device=dev).view(1, 1, 1, -1)
            parts.append((kb[sl, :, :C], vb[sl, :, :C], _cpu_flash_part(False, _additive(ki >= qi, qs.dtype), scale, rep)))
            if Wb > C:
                parts.append((kb[sl, :, C:], vb[sl, :, C:], _cpu_flash_part(False, None, scale, rep)))
        if m:
            # (C): sinks outside the window: query i = c*C + q sees sink j iff i - j >= W
            sj = torch.arange(m, device=dev).view(1, 1, 1, m)
            ks_, vs_ = (x[:, :m].unsqueeze(0).expand(hi - lo, -1, -1, -1) for x in (ks, vs))
            parts.append((ks_, vs_, dense_part(c * C + qi - sj >= W, scale)))
        outs.append(merged_attention(qr[lo:hi].contiguous(), parts))
    out = torch.cat(outs, dim=0)
    return out.transpose(0, 1).reshape(H, R * C, D)[:, :n]


def _aligned_window(qr, kr, vr, sink_k, sink_v, out0, n, C, scale, rep):
    """W = 2C. Query i = cC + q of chunk c >= 2 sees: its own chunk causally (A); chunk c-1
    without its first key, unmasked (B); the C keys from (c-2)C + 1 to (c-1)C, of which key k
    is visible iff k >= q, which is plain causal attention once queries and keys are both
    reversed (C, reversed inside the Part); and the sinks beyond W. Every block is computed with
    no mask at all, and nothing is wasted but the reversed copies."""
    R, H, _, D = qr.shape
    m = sink_k.shape[1]
    dev = qr.device
    causal, full = _cpu_flash_part(True, None, scale, rep), _cpu_flash_part(False, None, scale, rep)
    outs = [out0, merged_attention(qr[1:2].contiguous(), [(kr[1:2], vr[1:2], causal), (kr[0:1], vr[0:1], full)])]
    if R > 2:
        shifted = lambda x: torch.cat([x[:-2, :, 1:], x[1:-1, :, :1]], dim=2)
        parts = [(kr[2:], vr[2:], causal), (shifted(kr), shifted(vr), _reversed_causal_part(scale, rep))]
        if C > 1:
            parts.append((kr[1:-1, :, 1:], vr[1:-1, :, 1:], full))
        if m:
            qi = torch.arange(C, device=dev).view(1, 1, C, 1)
            c = torch.arange(2, R, device=dev).view(-1, 1, 1, 1)
            sj = torch.arange(m, device=dev).view(1, 1, 1, m)
            ks_, vs_ = (x.unsqueeze(0).expand(R - 2, -1, -1, -1) for x in (sink_k, sink_v))
            parts.append((ks_, vs_, dense_part(c * C + qi - sj >= 2 * C, scale)))
        outs.append(merged_attention(qr[2:].contiguous(), parts))
    out = torch.cat(outs, dim=0)
    return out.transpose(0, 1).reshape(H, R * C, D)[:, :n]


def _reversed_causal_part(scale: float, rep: int) -> Part:
    """Key k visible from query q iff k >= q: causal attention on reversed queries and keys."""
    inner = _cpu_flash_part(True, None, scale, rep)
    rev = lambda x: x.flip(2)

    def fwd(q, k, v):
        out, lse = inner.fwd(rev(q), rev(k), rev(v))
        return rev(out), lse.flip(-1)

    def bwd(dout, q, k, v, out, lse):
        return tuple(rev(g) for g in inner.bwd(rev(dout), rev(q), rev(k), rev(v), rev(out), lse.flip(-1)))

    return Part(fwd, bwd)


def _additive(ok: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, float("-inf"))


def default_chunk(window: int) -> int:
    """Query chunk for sink_window on CPU: window/2, so each chunk sees the previous chunk
    whole and the one before through a fixed triangle (mask-free views, _aligned_window);
    measured best among W/8..W-1 at 16k (docs/benchmarks.md)."""
    return max(1, window // 2)


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
            if q.device.type == "cpu" and n > 0 and _single_document(ctx, b, rows):
                qb, kb, vb = (x[b] if n == L else x[b][:, rows] for x in (q, k, v))
                C = max(1, min(W - 1, chunk or default_chunk(W)))
                o = _fast_window(qb, kb, vb, n, W, C, sink_t.numel(), scale)
                if n != L:
                    o = q.new_zeros(H, L, D).index_copy(1, rows, o)
                outs.append(o)
                continue
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

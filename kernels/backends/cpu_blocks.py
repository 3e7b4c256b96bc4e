"""Block plans on PyTorch's CPU flash-attention kernel, with one hand-written backward.

The fast CPU paths of ``sdpa_groups`` (S2/SF-Attn groups, sink_window chunks) are lists of
*query blocks*: strided views of the queries, each attending one or more *key parts* (strided
views of the keys, disjoint per query) merged by log-sum-exp. Every view is an ``as_strided``
view of the caller's q/k/v (no gather, no concatenation), and one autograd Function runs the
whole plan: the forward writes each block's merged output straight into one output buffer,
the backward calls the kernel's backward per part with the *merged* output and LSE (the
ring-attention identity, as in backends/merge.py) and adds the gradients straight into
dq/dk/dv buffers. Autograd through slices, cats and flips of the previous version allocated a
zero-filled full-size gradient per slice: that, not the attention, was 40% of the time.

Key-part kinds (key index a, query index i, both local to the part's views):
- ``causal``: a <= i (top-left aligned: the kernel's ``is_causal`` fast path, no mask);
- ``full``: every key;
- ``rev``: a >= i, Lq == Lk: causal attention on reversed queries and keys (copies);
- ``sinks``: a few keys computed with explicit logits, an optional boolean mask.
PyTorch's CPU flash kernel has no GQA: a query block spans the query heads of one KV head and
its key views repeat that head with stride 0 (no copy).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

_OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_OP_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
#: How sink_window's triangle part runs: "rev" (reversed copies, causal kernel) or "upper" (masked).
TRIANGLE = "rev"
WINDOW = "band"
ROWS_PER_CALL = 2048


@dataclass(frozen=True)
class Ref:
    """Rows of a (B, H, L, D) tensor as a (count, heads, length, D) strided view: row r holds
    tokens [start + r * step, + length) of heads [h, h + heads) of sample b (``bcast``: head h
    repeated ``heads`` times, stride 0). Rows may overlap (step < length) or repeat (step 0)."""

    b: int
    h: int
    heads: int
    start: int
    count: int
    length: int
    step: int
    bcast: bool = False

    def view(self, x: torch.Tensor) -> torch.Tensor:
        sB, sH, sL, sD = x.stride()
        return x.as_strided(
            (self.count, self.heads, self.length, x.shape[-1]),
            (self.step * sL, 0 if self.bcast else sH, sL, sD),
            x.storage_offset() + self.b * sB + self.h * sH + self.start * sL,
        )

    def accumulate(self, buf: torch.Tensor, g: torch.Tensor) -> None:
        """buf[view] += g, summing over repeated heads/rows and splitting overlapping rows."""
        ref = self
        if ref.bcast:
            g = g.sum(1, keepdim=True)
            ref = replace(ref, heads=1, bcast=False)
        if g.shape[0] != ref.count or (ref.count > 1 and ref.step == 0):  # rows broadcast (sinks)
            g = g.sum(0, keepdim=True)
            ref = replace(ref, count=1)
        if ref.count > 1 and ref.step < ref.length:
            k = -(-ref.length // ref.step)
            for j in range(min(k, ref.count)):
                sub = replace(ref, start=ref.start + j * ref.step, count=len(range(j, ref.count, k)), step=ref.step * k)
                sub.view(buf).add_(g[j::k])
            return
        ref.view(buf).add_(g)


@dataclass
class KeyPart:
    kind: str  # causal | full | rev | sinks
    k: Ref
    mask: torch.Tensor | None = None  # sinks: bool, broadcastable to (count, heads, Lq, m)


@dataclass
class QueryBlock:
    q: Ref
    parts: list[KeyPart]


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(2)


def _part_forward(part: KeyPart, q, k, v, scale):
    if part.kind in ("causal", "full"):
        return _OP(q, k, v, 0.0, part.kind == "causal", scale=scale)
    if part.kind == "upper":
        return _OP(q, k, v, 0.0, False, attn_mask=_upper_mask(q.shape[2], q.dtype), scale=scale)
    if part.kind == "band":
        return _OP(q, k, v, 0.0, False, attn_mask=_band_mask(q.shape[2], k.shape[2], q.dtype), scale=scale)
    if part.kind == "rev":
        o, lse = _OP(_flip(q), _flip(k), _flip(v), 0.0, True, scale=scale)
        return _flip(o), lse.flip(-1)
    if part.kind == "sinks":
        s = _sink_logits(part, q, k, scale)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(lse).unsqueeze(-1))
        return _unflat(torch.bmm(p.to(v.dtype), _heads(v)), q.shape), _unflat(lse, q.shape[:3])
    raise ValueError(f"key part kind: unknown {part.kind!r}")


def _part_backward(part: KeyPart, dout, q, k, v, out, lse, delta, scale):
    if part.kind in ("causal", "full"):
        return _OP_BWD(dout, q, k, v, out, lse, 0.0, part.kind == "causal", scale=scale)
    if part.kind == "band":
        return _OP_BWD(dout, q, k, v, out, lse, 0.0, False, attn_mask=_band_mask(q.shape[2], k.shape[2], q.dtype),
                       scale=scale)
    if part.kind == "upper":
        return _OP_BWD(dout, q, k, v, out, lse, 0.0, False, attn_mask=_upper_mask(q.shape[2], q.dtype), scale=scale)
    if part.kind == "rev":
        g = _OP_BWD(_flip(dout), _flip(q), _flip(k), _flip(v), _flip(out), lse.flip(-1), 0.0, True, scale=scale)
        return tuple(_flip(x) for x in g)
    if part.kind == "sinks":
        # Flat per-head layout (heads, rows * Lq, .): skinny bmm calls on dense operands.
        s = _sink_logits(part, q, k, scale)
        p = torch.exp(s - _finite(_flat(lse)).unsqueeze(-1)).to(q.dtype)  # share of the merged softmax
        do, kh, vh = _flat(dout), _heads(k), _heads(v)
        ds = p * (torch.bmm(do, vh.transpose(1, 2)) - _flat(delta).unsqueeze(-1)) * scale
        dq = _unflat(torch.bmm(ds, kh), q.shape)
        dk = torch.bmm(ds.transpose(1, 2), _flat(q)).unsqueeze(0)
        dv = torch.bmm(p.transpose(1, 2), do).unsqueeze(0)
        return dq, dk, dv
    raise ValueError(f"key part kind: unknown {part.kind!r}")


_MASKS: dict = {}


def _upper_mask(n: int, dtype) -> torch.Tensor:
    """Additive (n, n) mask, key a visible from query i iff a >= i; cached per size and dtype."""
    key = (n, dtype)
    if key not in _MASKS:
        if len(_MASKS) > 16:
            _MASKS.clear()
        i = torch.arange(n)
        _MASKS[key] = torch.zeros(n, n, dtype=dtype).masked_fill(i[None, :] < i[:, None], float("-inf"))
    return _MASKS[key]


def _band_mask(c: int, lk: int, dtype) -> torch.Tensor:
    """Additive (c, lk) mask of a window band: keys [s - W + 1, s + c) for queries [s, s + c),
    W = lk - c + 1; key a visible from query i iff i <= a <= i + W - 1. Cached."""
    key = ("band", c, lk, dtype)
    if key not in _MASKS:
        if len(_MASKS) > 16:
            _MASKS.clear()
        i, a = torch.arange(c)[:, None], torch.arange(lk)[None, :]
        _MASKS[key] = torch.zeros(c, lk, dtype=dtype).masked_fill((a < i) | (a > i + lk - c), float("-inf"))
    return _MASKS[key]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(count, heads, Lq, ...) -> (heads, count * Lq, ...), dense (a view when rows are adjacent)."""
    x = x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])
    return x if 0 not in x.stride() else x.contiguous()


def _unflat(x: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of _flat: (heads, count * Lq, ...) -> (count, heads, Lq, ...)."""
    return x.view(shape[1], shape[0], *shape[2:]).transpose(0, 1)


def _heads(k: torch.Tensor) -> torch.Tensor:
    """Sink keys (1, heads, m, D) -> (heads, m, D), dense."""
    return k[0].contiguous()


def _sink_logits(part: KeyPart, q, k, scale):
    """(heads, count * Lq, m) logits of the sink keys, masked."""
    s = torch.bmm(_flat(q), _heads(k).transpose(1, 2)).mul_(scale)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if part.mask is not None:
        s = s.masked_fill(~_flat(part.mask.expand(-1, 1, -1, -1)), float("-inf"))
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


class _Plan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocks, scale, covers_all):
        B, H, L, D = q.shape
        # (B, L, H, D) storage: the caller's transpose(1, 2).contiguous() is then free.
        out = (torch.empty if covers_all else torch.zeros)(B, L, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
        lses = []
        for blk in blocks:
            qv, target = blk.q.view(q), blk.q.view(out)
            if len(blk.parts) == 1:
                part = blk.parts[0]
                o, lse = _part_forward(part, qv, part.k.view(k), part.k.view(v), scale)
                target.copy_(o)
                lses.append(lse)
                continue
            res = [_part_forward(p, qv, p.k.view(k), p.k.view(v), scale) for p in blk.parts]
            lse = torch.logsumexp(torch.stack([l.to(res[0][1].dtype) for _, l in res]), dim=0)
            safe = _finite(lse)
            for i, (o, l) in enumerate(res):
                w = torch.exp(l - safe).unsqueeze(-1).to(o.dtype)
                if i == 0:
                    torch.mul(o, w, out=target)
                else:
                    target.addcmul_(o, w)
            lses.append(lse)
        ctx.blocks, ctx.scale, ctx.lses, ctx.covers_all = blocks, scale, lses, covers_all
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        # Every covered query row belongs to one block: its first part writes dq, no zero fill.
        dq = (torch.empty_like if ctx.covers_all else torch.zeros_like)(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for blk, lse in zip(ctx.blocks, ctx.lses):
            qv, dov, ov = blk.q.view(q), blk.q.view(dout), blk.q.view(out)
            delta = None
            if any(p.kind == "sinks" for p in blk.parts):
                delta = (dov * ov).sum(-1, dtype=lse.dtype if lse.is_floating_point() else None).to(q.dtype)
            for i, part in enumerate(blk.parts):
                gq, gk, gv = _part_backward(part, dov, qv, part.k.view(k), part.k.view(v), ov, lse, delta, ctx.scale)
                if i == 0:
                    blk.q.view(dq).copy_(gq)
                else:
                    blk.q.accumulate(dq, gq)
                part.k.accumulate(dk, gk)
                part.k.accumulate(dv, gv)
        ctx.blocks = ctx.lses = None
        return dq, dk, dv, None, None, None


def run(q, k, v, blocks: list[QueryBlock], scale: float, covers_all: bool) -> torch.Tensor:
    """(B, H, L, D) attention over the plan; query rows no block covers output 0
    (``covers_all``: every row is covered, the output buffer is not zero-filled)."""
    return _Plan.apply(q, k, v, blocks, scale, covers_all)


# --------------------------------------------------------------------------- plans
def head_blocks(h0: int, h1: int, rep: int):
    """(query head, heads, kv head, bcast) runs of query heads [h0, h1) sharing K/V views."""
    if rep == 1:
        yield h0, h1 - h0, h0, False
        return
    h = h0
    while h < h1:
        g = h // rep
        e = min(h1, (g + 1) * rep)
        yield h, e - h, g, True
        h = e


def group_blocks(b: int, r0: int, n: int, G: int, off: int, m: int, h0: int, h1: int, rep: int):
    """S2/SF-Attn of sample b (one document, real tokens [r0, r0 + n)), query heads [h0, h1):
    groups [0, G - off), then G-long runs, then the remainder, each causal; groups after the
    first also see the m sink tokens (an explicit part merged by LSE). None when the first
    group is shorter than the sinks (the masked path handles it)."""
    segs = []
    pos = 0
    if off:
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
    blocks = []
    for qh, nh, kh, bcast in head_blocks(h0, h1, rep):
        for start, count, length in segs:
            qref = Ref(b, qh, nh, r0 + start, count, length, length)
            parts = [KeyPart("causal", replace(qref, h=kh, bcast=bcast))]
            if m and start > 0:
                parts.append(KeyPart("sinks", Ref(b, kh, nh, r0, 1, m, 0, bcast)))
            blocks.append(QueryBlock(qref, parts))
    return blocks


def window_blocks(b: int, r0: int, n: int, W: int, C: int, m: int, H: int, rep: int, device):
    """sink_window of sample b (one document, real tokens [r0, r0 + n)), all heads.

    Queries [0, W) see every earlier key: one causal block. Then chunks of c <= W - 1 queries
    starting at s >= W: query s + i sees its own chunk causally, keys [s - W + 1 + c, s) whole,
    keys a in [s - W + 1, s - W + 1 + c) iff a >= i (reversed causal), and the sinks j with
    s + i - j >= W. Full chunks of C are one block (strided views); the remainder is another."""
    blocks = []
    if WINDOW != "band":
        C = max(1, min(C, W - 1)) if W > 1 else 1
    rows_per_call = max(1, ROWS_PER_CALL // C)
    s0 = min(n, W)
    R = (n - s0) // C
    T = n - s0 - R * C
    for qh, nh, kh, bcast in head_blocks(0, H, rep):
        kv = lambda start, count, length, step: Ref(b, kh, nh, r0 + start, count, length, step, bcast)
        blocks.append(QueryBlock(Ref(b, qh, nh, r0, 1, s0, s0), [KeyPart("causal", kv(0, 1, s0, s0))]))
        spans = [(s0 + j * C, min(rows_per_call, R - j), C) for j in range(0, R, rows_per_call)]
        spans.append((s0 + R * C, 1, T))
        for s, count, c in spans:
            if not count or not c:
                continue
            qref = Ref(b, qh, nh, r0 + s, count, c, C)
            if WINDOW == "band":
                parts = [KeyPart("band", kv(s - W + 1, count, W - 1 + c, C))]
            else:
                parts = [KeyPart("causal", kv(s, count, c, C))]
                if W > 1:
                    parts.append(KeyPart(TRIANGLE, kv(s - W + 1, count, c, C)))
                    if W - 1 - c > 0:
                        parts.append(KeyPart("full", kv(s - W + 1 + c, count, W - 1 - c, C)))
            if m:
                i = s + C * torch.arange(count, device=device).view(-1, 1, 1, 1) + torch.arange(c, device=device).view(1, 1, -1, 1)
                ok = i - torch.arange(m, device=device).view(1, 1, 1, -1) >= W
                parts.append(KeyPart("sinks", kv(0, 1, m, 0), None if bool(ok.all()) else ok))
            blocks.append(QueryBlock(qref, parts))
    return blocks

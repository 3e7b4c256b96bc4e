"""Block plans on PyTorch's CPU flash-attention kernel, with one hand-written backward.

The fast CPU paths of ``sdpa_groups`` (S2/SF-Attn groups, sink_window chunks) are lists of
*blocks*: a strided view of the queries attending a strided view of the keys, in one call of
PyTorch's CPU flash kernel (``is_causal`` for groups, a cached band mask for window chunks).
Sink tokens are not part of any block: one explicit, per-sample part (q x m keys, a few bmm
calls) merged into the blocks' output by log-sum-exp. Every view is an ``as_strided`` view of
the caller's q/k/v (no gather, no concatenation), and one autograd Function runs the plan:

- forward: each block writes its output and LSE straight into one output buffer and one LSE
  buffer; the sink part then rescales the output in place and adds its own share;
- backward: each block calls the kernel's backward with the *merged* output and LSE (the
  ring-attention identity, as in backends/merge.py), the sink part is differentiated by hand,
  and every gradient is added straight into dq/dk/dv buffers.

Autograd through slices and cats (the previous version) allocated a zero-filled full-size
gradient per slice: that, not the attention, was about 40% of the time. On a busy machine
every parallel op also pays for thread wake-ups, so the plan keeps the op count small: few
blocks, one sink merge per sample.

Cost model of the CPU kernel (torch 2.x): queries in blocks of 256 rows (64 below 768, 32
below 192), keys in blocks of 512 columns; ``is_causal`` skips key blocks entirely above the
diagonal only, so causal attention over <= 512 keys costs as much as full attention. A mask
is applied, never used to skip work.
PyTorch's CPU flash kernel has no GQA: a block spans the query heads of one KV head and its
key views repeat that head with stride 0 (no copy).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

_OP = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_OP_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: sink_window: query rows per kernel call (summed over the chunks of one call); bounds the
#: per-call key-gradient buffers, which hold every chunk's (W + C - 1) keys.
ROWS_PER_CALL = 4096


@dataclass(frozen=True)
class Ref:
    """Rows of a (B, H, L, D) tensor as a (count, heads, length, D) strided view: row r holds
    tokens [start + r * step, + length) of heads [h, h + heads) of sample b (``bcast``: head h
    repeated ``heads`` times, stride 0). Rows may overlap (step < length)."""

    b: int
    h: int
    heads: int
    start: int
    count: int
    length: int
    step: int
    bcast: bool = False

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The view of x (B, H, L, D), or of an LSE buffer (B, H, L)."""
        st = x.stride()
        size = (self.count, self.heads, self.length) + tuple(x.shape[3:])
        stride = (self.step * st[2], 0 if self.bcast else st[1], st[2]) + tuple(st[3:])
        return x.as_strided(size, stride, x.storage_offset() + self.b * st[0] + self.h * st[1] + self.start * st[2])

    def accumulate(self, buf: torch.Tensor, g: torch.Tensor) -> None:
        """buf[view] += g, summing over repeated heads and splitting overlapping rows into
        non-overlapping sets (an in-place add cannot write overlapping memory)."""
        ref = self
        if ref.bcast:
            g = g.sum(1, keepdim=True)
            ref = replace(ref, heads=1, bcast=False)
        if ref.count > 1 and ref.step < ref.length:
            # k sets of disjoint rows, one add each (a padded, skewed single sum measured
            # slower: the padded copy's page faults cost more than the adds)
            k = -(-ref.length // ref.step)
            for j in range(min(k, ref.count)):
                sub = replace(ref, start=ref.start + j * ref.step, count=len(range(j, ref.count, k)), step=ref.step * k)
                sub.view(buf).add_(g[j::k])
            return
        ref.view(buf).add_(g)


@dataclass
class Block:
    """Queries ``q`` attend keys ``k`` in one kernel call: kind ``causal`` (key a <= query i,
    top-left), ``full`` or ``band`` (keys [s - W + 1, s + c) of queries [s, s + c): a visible
    from i iff i <= a <= i + W - 1, W = len(k) - len(q) + 1)."""

    q: Ref
    k: Ref
    kind: str


@dataclass
class Sinks:
    """The m sink tokens [r0, r0 + m) of sample b, attended by its tokens [r0, r0 + n) except
    where ``hidden`` (bool, broadcastable to (H, n, m)) says so: a pair a block already holds,
    or a sink in the future."""

    b: int
    r0: int
    n: int
    m: int
    hidden: torch.Tensor


_MASKS: dict = {}


def _band_mask(c: int, lk: int, dtype) -> torch.Tensor:
    """Additive (c, lk) band mask (see Block); cached per shape and dtype."""
    key = (c, lk, dtype)
    if key not in _MASKS:
        if len(_MASKS) > 16:
            _MASKS.clear()
        i, a = torch.arange(c)[:, None], torch.arange(lk)[None, :]
        _MASKS[key] = torch.zeros(c, lk, dtype=dtype).masked_fill((a < i) | (a > i + lk - c), float("-inf"))
    return _MASKS[key]


def _kernel_args(blk: Block, dtype):
    """(is_causal, attn_mask) of a block's kernel call."""
    if blk.kind == "band":
        return False, _band_mask(blk.q.length, blk.k.length, dtype)
    if blk.kind in ("causal", "full"):
        return blk.kind == "causal", None
    raise ValueError(f"block kind: unknown {blk.kind!r}")


def _sink_kv(x: torch.Tensor, sk: Sinks, rep: int) -> torch.Tensor:
    """(H, m, D) sink keys/values of sample b, one row per query head."""
    x = x[sk.b, :, sk.r0:sk.r0 + sk.m]
    return x.repeat_interleave(rep, dim=0) if rep > 1 else x.contiguous()


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x if 0 not in x.stride() else x.contiguous()


#: Run everything but the kernel calls on one thread: on a shared machine each parallel op
#: waits for both threads to be scheduled, which costs more than the small ops themselves.
SERIAL_SMALL_OPS = True


class _Threads:
    """Inside: one intra-op thread, except within ``kernel()`` (the caller's count)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if SERIAL_SMALL_OPS and self.n > 1:
            torch.set_num_threads(1)
        return self

    def kernel(self, op, *args, **kwargs):
        if not (SERIAL_SMALL_OPS and self.n > 1):
            return op(*args, **kwargs)
        torch.set_num_threads(self.n)
        try:
            return op(*args, **kwargs)
        finally:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


class _Plan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocks, sinks, scale, covers_all):
        with _Threads() as th:
            return _Plan._forward(ctx, th, q, k, v, blocks, sinks, scale, covers_all)

    @staticmethod
    def backward(ctx, dout):
        with _Threads() as th:
            return _Plan._backward(ctx, th, dout)

    @staticmethod
    def _forward(ctx, th, q, k, v, blocks, sinks, scale, covers_all):
        B, H, L, D = q.shape
        rep = H // k.shape[1]
        # (B, L, H, D) storage: the caller's transpose(1, 2).contiguous() is then free.
        out = (torch.empty if covers_all else torch.zeros)(B, L, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.zeros(B, H, L, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                          device=q.device)
        for blk in blocks:
            causal, mask = _kernel_args(blk, q.dtype)
            o, l = th.kernel(_OP, blk.q.view(q), blk.k.view(k), blk.k.view(v), 0.0, causal, attn_mask=mask, scale=scale)
            blk.q.view(out).copy_(o)
            blk.q.view(lse).copy_(l)
        probs = []
        for sk in sinks:
            # Merge the sinks into the blocks' result by log-sum-exp (every block row sees >= 1
            # key, so the blocks' LSE is finite).
            qf, of, lf = (x[sk.b, :, sk.r0:sk.r0 + sk.n] for x in (q, out, lse))
            s = torch.bmm(qf, _sink_kv(k, sk, rep).transpose(1, 2)).mul_(scale).to(lse.dtype)
            s.masked_fill_(sk.hidden, float("-inf"))
            merged = torch.logsumexp(torch.cat([lf.unsqueeze(-1), s], dim=-1), dim=-1)
            of.mul_(torch.exp(lf - merged).unsqueeze(-1).to(q.dtype))
            p = torch.exp(s.sub_(merged.unsqueeze(-1)))  # the sinks' share of the merged softmax
            of.add_(torch.bmm(p.to(q.dtype), _sink_kv(v, sk, rep)))
            lf.copy_(merged)
            probs.append(p)
        ctx.blocks, ctx.sinks, ctx.probs, ctx.scale, ctx.covers_all = blocks, sinks, probs, scale, covers_all
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def _backward(ctx, th, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, rep = ctx.scale, q.shape[1] // k.shape[1]
        # Every covered query row belongs to one block, which writes its dq: no zero fill.
        dq = (torch.empty_like if ctx.covers_all else torch.zeros_like)(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for blk in ctx.blocks:
            causal, mask = _kernel_args(blk, q.dtype)
            qv = blk.q.view(q)
            gq, gk, gv = th.kernel(_OP_BWD, blk.q.view(dout), qv, blk.k.view(k), blk.k.view(v), blk.q.view(out),
                                 blk.q.view(lse), 0.0, causal, attn_mask=mask, scale=scale)
            blk.q.view(dq).copy_(gq)
            blk.k.accumulate(dk, gk)
            blk.k.accumulate(dv, gv)
        for sk, p in zip(ctx.sinks, ctx.probs):
            qf, of, do = (x[sk.b, :, sk.r0:sk.r0 + sk.n] for x in (q, out, dout))
            do, p = _dense(do), p.to(q.dtype)
            ks, vs = _sink_kv(k, sk, rep), _sink_kv(v, sk, rep)
            delta = (do * of).sum(-1, keepdim=True)
            ds = p * (torch.bmm(do, vs.transpose(1, 2)) - delta) * scale
            dq[sk.b, :, sk.r0:sk.r0 + sk.n].add_(torch.bmm(ds, ks))
            for buf, g in ((dk, torch.bmm(ds.transpose(1, 2), qf)), (dv, torch.bmm(p.transpose(1, 2), do))):
                if rep > 1:
                    g = g.view(-1, rep, *g.shape[1:]).sum(1)
                buf[sk.b, :, sk.r0:sk.r0 + sk.m].add_(g)
        ctx.blocks = ctx.sinks = ctx.probs = None
        return dq, dk, dv, None, None, None, None


def run(q, k, v, blocks: list[Block], sinks: list[Sinks], scale: float, covers_all: bool) -> torch.Tensor:
    """(B, H, L, D) attention over the plan; query rows no block covers output 0
    (``covers_all``: every row is covered, the output buffer is not zero-filled)."""
    return _Plan.apply(q, k, v, blocks, sinks, scale, covers_all)


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


def group_segments(n: int, G: int, off: int) -> list[tuple[int, int, int, int]]:
    """S2 groups of n tokens as (start, count, length, step) runs: [0, G - off) when offset,
    then G-long groups, then the remainder; a first and last group of equal length share one
    run (step = distance between them)."""
    segs = []
    pos = 0
    if off:
        pos = min(G - off, n)
        segs.append((0, 1, pos, pos))
    full = (n - pos) // G
    if full:
        segs.append((pos, full, G, G))
        pos += full * G
    if pos < n:
        if off and len(segs) == 2 and segs[0][2] == n - pos:
            segs[0] = (0, 2, n - pos, pos)
        else:
            segs.append((pos, 1, n - pos, n - pos))
    return segs


def group_blocks(b: int, r0: int, n: int, G: int, off: int, h0: int, h1: int, rep: int) -> list[Block]:
    """S2/SF-Attn groups of sample b (one document, tokens [r0, r0 + n)), query heads [h0, h1):
    each group causal, groups of equal length batched as rows of one call."""
    blocks = []
    for qh, nh, kh, bcast in head_blocks(h0, h1, rep):
        for start, count, length, step in group_segments(n, G, off):
            qref = Ref(b, qh, nh, r0 + start, count, length, step)
            blocks.append(Block(qref, replace(qref, h=kh, bcast=bcast), "causal"))
    return blocks


def window_blocks(b: int, r0: int, n: int, W: int, C: int, H: int, rep: int) -> list[Block]:
    """sink_window (without its sinks) of sample b (one document, tokens [r0, r0 + n)).

    Queries [0, W) see every earlier key: one causal block. Then chunks of C queries from s = W
    on: chunk [s, s + c) attends keys [s - W + 1, s + c) through the band mask (cost c * (W + c - 1)
    for c * W useful pairs); chunks are rows of strided views, ROWS_PER_CALL queries per call."""
    C = max(1, C)
    per_call = max(1, ROWS_PER_CALL // C)
    s0 = min(n, W)
    R = (n - s0) // C
    T = n - s0 - R * C
    spans = [(s0 + j * C, min(per_call, R - j), C) for j in range(0, R, per_call)] + [(s0 + R * C, 1, T)]
    blocks = []
    for qh, nh, kh, bcast in head_blocks(0, H, rep):
        qref = Ref(b, qh, nh, r0, 1, s0, s0)
        blocks.append(Block(qref, replace(qref, h=kh, bcast=bcast), "causal"))
        for s, count, c in spans:
            if count and c:
                qref = Ref(b, qh, nh, r0 + s, count, c, C)
                kref = Ref(b, kh, nh, r0 + s - W + 1, count, W - 1 + c, C, bcast)
                blocks.append(Block(qref, kref, "band"))
    return blocks

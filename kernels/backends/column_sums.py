"""Causal self-attention that also returns, for every key, the attention it received: one pass.

H2O (finetune/caches/h2o.py) scores each key by the sum over queries of its softmax
probability. A fused kernel (PyTorch's CPU flash kernel) returns the output and each row's
log-sum-exp, but the column sums then need a second pass: the q.k matmul and the exp again
over every causal (query, key) pair, about 0.7-1.0x of the attention itself. Here one pass
does both, per block of query rows and per sample:

- S = q.k^T over only the keys the block can see (causal: keys up to the block's last row;
  left padding: from the sample's first real token), GQA folded so one matmul per KV head
  covers all of its query heads;
- P = softmax(S) in place, exact per row (the block holds all of its rows' keys);
- out = P.v, and the column sums of P added to the keys' scores.

One q.k matmul, one exp and one P.v per pair, as the flash kernel does; the extra cost is the
softmax pass over a materialised block (and its traffic through the memory: at 16k keys this
costs about 1.4x the flash kernel on one CPU thread, 1.2-1.3x at 4k). That block lives in one
preallocated workspace; query rows per block come from `BLOCK_ELEMENTS` (rows x visible keys x
heads; more rows while few keys are visible), between `MIN_ROWS` and `MAX_ROWS`. Memory: the
workspace plus a float32 copy of one sample's q, k, v.

Rows before a sample's first real token (left padding) see nothing: output 0, no score.
"""

from __future__ import annotations

import torch

#: float elements of the score block (8 MiB in float32) while few keys are visible, and the
#: query rows per block between MIN_ROWS and MAX_ROWS. Measured on one CPU thread (9 heads / 3
#: KV heads, head dim 64): 32-64 rows per block at 4k-16k keys cost 1.2-1.4x the flash kernel,
#: 16 rows 1.55-1.7x at 16k (each block re-reads the keys and values), 128+ rows more (the
#: block falls out of the caches); the workspace is H x MIN_ROWS x L elements at most beyond
#: the budget (16k keys: 18 MiB).
BLOCK_ELEMENTS = 1 << 21
MIN_ROWS = 32
MAX_ROWS = 256


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """Row softmax in place (no second block-sized buffer)."""
    return torch.ops.aten._softmax.out(s, -1, False, out=s)


def block_rows(heads: int, visible: int) -> int:
    """Query rows of a block whose `heads` x rows x `visible` scores fit BLOCK_ELEMENTS."""
    return max(MIN_ROWS, min(MAX_ROWS, BLOCK_ELEMENTS // max(1, heads * visible)))


def causal_attention_with_column_sums(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, starts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention of (B, H, L, D) queries over (B, Hkv, L, D) keys / (B, Hkv, L, Dv)
    values at positions 0..L-1, sample b's real tokens from `starts[b]` on (left padding; None:
    no padding). Returns (out (B, H, L, Dv) in q's dtype, sums (B, H, L)): sums[b, h, j] = sum
    over queries i >= j of softmax probability p_ij, float32 (float64 for float64 inputs)."""
    B, H, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if H % Hkv or k.shape[2] != L or v.shape[2] != L:
        raise ValueError(f"causal_attention_with_column_sums: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} are not (B, H, L, D) / (B, Hkv, L, D) with Hkv dividing H")  # fmt: skip
    rep = H // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    # (B, L, H, Dv) in memory, the layout attention functions return: the caller's transpose is
    # free. Not zero-filled: every real row is written below, padding rows are zeroed alone.
    out = q.new_empty(B, L, H, Dv).transpose(1, 2)
    sums = torch.zeros(B, H, L, dtype=work, device=q.device)
    if L == 0:
        return out, sums
    first = [0] * B if starts is None else [min(L, max(0, int(s))) for s in starts.tolist()]
    # a block holds H x c x (a + c) scores with c <= block_rows(H, min(n, a + MAX_ROWS)): at most
    # the budget, or H x MIN_ROWS x L where MIN_ROWS rows over all keys exceed it
    ws = torch.empty(max(BLOCK_ELEMENTS, H * MIN_ROWS * L), dtype=work, device=q.device)
    future = _future_mask(work, q.device)
    for b in range(B):
        s0 = first[b]
        n = L - s0
        if s0:
            out[b, :, :s0] = 0
        if n <= 0:
            continue
        qb = q[b, :, s0:]
        qb = (qb.to(work).mul_(scale) if qb.dtype != work else qb * scale).view(Hkv, rep, n, D)
        kt = k[b, :, s0:].to(work).transpose(1, 2)  # (Hkv, D, n)
        vb = v[b, :, s0:].to(work)  # (Hkv, n, Dv)
        a = 0
        while a < n:
            c = min(n - a, block_rows(H, min(n, a + MAX_ROWS)))
            e = a + c
            s = torch.bmm(qb[:, :, a:e].reshape(Hkv, rep * c, D), kt[:, :, :e],
                          out=ws[: H * c * e].view(Hkv, rep * c, e))  # fmt: skip
            s.view(H, c, e)[:, :, a:].add_(future[:c, :c])  # -inf above the diagonal
            _softmax_(s)
            out[b, :, s0 + a : s0 + e] = torch.bmm(s, vb[:, :e]).view(H, c, Dv)
            sums[b, :, s0 : s0 + e] += s.view(H, c, e).sum(1)
            a = e
    return out, sums


_FUTURE: dict = {}


def _future_mask(dtype, device) -> torch.Tensor:
    """(MAX_ROWS, MAX_ROWS) additive mask, -inf above the diagonal (an add is cheaper than a
    masked_fill with a broadcast boolean mask); cached per dtype and device."""
    key = (dtype, str(device), MAX_ROWS)
    if key not in _FUTURE:
        upper = torch.ones(MAX_ROWS, MAX_ROWS, dtype=torch.bool, device=device).triu(1)
        _FUTURE[key] = torch.zeros(MAX_ROWS, MAX_ROWS, dtype=dtype, device=device).masked_fill_(upper, float("-inf"))
    return _FUTURE[key]

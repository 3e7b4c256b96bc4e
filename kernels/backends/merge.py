"""Log-sum-exp merge of attention over disjoint key sets, with an exact backward.

flash-attn's window kernel cannot see the sink tokens, so backends/flash.py attends the window
with flash-attn and the sinks separately, then merges. flash-attn's LSE carries no gradient,
so the merge is an autograd Function whose backward calls each part's own backward with the
*merged* output and LSE (the ring-attention identity; see dense.attention_backward). The math
is CPU-testable: tests/test_backends.py merges two dense parts and compares with the dense
reference on the union mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.backends import dense


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Combine partial outputs (B, H, L, D) with their LSEs (B, H, L) into (out, lse)."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = sum(o * torch.exp(l - safe).unsqueeze(-1).to(o.dtype) for o, l in zip(outs, lses))
    return out, lse


@dataclass
class Part:
    """One key set: ``fwd(q, k, v) -> (out, lse)`` and ``bwd(dout, q, k, v, out, lse) -> (dq, dk, dv)``,
    out in (B, H, Lq, D) and lse (B, H, Lq) float, whatever layout the kernel uses inside."""

    fwd: Callable
    bwd: Callable


def dense_part(mask: torch.Tensor, scale: float) -> Part:
    """A part computed by the dense math (the sinks of the flash path; the CPU tests)."""

    def fwd(q, k, v):
        out, lse, _ = dense.attention_with_lse(q, k, v, mask, scale)
        return out, lse

    def bwd(dout, q, k, v, out, lse):
        return dense.attention_backward(dout, q, k, v, mask, scale, out, lse)

    return Part(fwd, bwd)


class _Merged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, parts, *kvs):
        outs, lses = [], []
        with torch.no_grad():
            for i, part in enumerate(parts):
                o, l = part.fwd(q, kvs[2 * i], kvs[2 * i + 1])
                outs.append(o.float() if o.dtype in (torch.float16, torch.bfloat16) else o)
                lses.append(l.to(outs[-1].dtype))
            out, lse = merge_partials(outs, lses)
        out = out.to(q.dtype)
        ctx.parts = parts
        ctx.save_for_backward(q, out, lse, *kvs)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, *kvs = ctx.saved_tensors
        dq, grads = None, []
        dout = dout.contiguous()
        for i, part in enumerate(ctx.parts):
            k, v = kvs[2 * i], kvs[2 * i + 1]
            gq, gk, gv = part.bwd(dout, q, k, v, out, lse)
            dq = gq if dq is None else dq + gq
            grads += [gk, gv]
        return (dq, None, *grads)


def merged_attention(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, Part]]) -> torch.Tensor:
    """Attention of q over the union of the parts' key sets (disjoint per query), differentiable."""
    kvs = [t for k, v, _ in parts for t in (k, v)]
    return _Merged.apply(q, [p for _, _, p in parts], *kvs)

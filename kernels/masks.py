"""Attention patterns as mask predicates, defined once.

Every pattern is a predicate ``allowed(b, h, q_idx, kv_idx) -> bool tensor`` built by
:func:`mask_mod` from a layer spec (one entry of ``config.longtune_attention["layers"]``) and a
:class:`MaskContext` (where each query/key sits in its sample). The same function serves
FlexAttention's ``create_block_mask`` (scalar tensor indices) and, through broadcasting, the
dense boolean mask of :func:`dense_mask`; the fast backends gather a superset of the allowed
keys and evaluate the same predicate on it, so there is one definition to get right.

Coordinates (see docs/kernels.md):
- ``t``: index of a token among its sample's real (unpadded) tokens; with a cache, the absolute
  position of the key. Causality, S2/SF groups and the sliding window use ``t``.
- ``p``: position inside the token's document (``position_ids`` in packed sequences; ``t``
  otherwise). Sink tokens (``p < num_sink_tokens``) and block indices use ``p``, so every packed
  document has its own sinks and block grid, as it would alone at inference.
- ``doc``: document id; keys of another document are never visible unless ``cross_document``.
Group size G = floor(n * group_ratio) (at least 1) with n the sample's own unpadded length.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

TRAINING_ONLY = ("s2_attn", "sf_attn")
PERSISTENT = ("sink_window", "block_sparse")
PATTERNS = ("causal",) + TRAINING_ONLY + PERSISTENT

#: Keys each pattern accepts, with defaults (the recipe schema holds the user-facing defaults;
#: these let a hand-written layout omit keys).
PATTERN_DEFAULTS: dict[str, dict] = {
    "causal": {},
    "s2_attn": {"group_ratio": 0.25, "shift_fraction": 0.5, "wrap": "none", "num_sink_tokens": 0},
    "sf_attn": {"group_ratio": 0.25, "shift_fraction": 0.5, "wrap": "none", "num_sink_tokens": 4},
    "sink_window": {"window": 2048, "num_sink_tokens": 4},
    "block_sparse": {"block_size": 64, "local_blocks": 4, "stride": 8, "head_step": None},
}
#: Keys any layer may carry besides its pattern's own.
COMMON_KEYS = ("pattern", "backend", "cross_document")


def resolve_spec(spec: dict, where: str = "layer") -> dict:
    """Spec with defaults filled in; errors name the offending key."""
    if not isinstance(spec, dict) or "pattern" not in spec:
        raise ValueError(f"{where}: a layer spec must be a dict with a 'pattern' key, got {spec!r}")
    pattern = spec["pattern"]
    if pattern not in PATTERN_DEFAULTS:
        raise ValueError(f"{where}.pattern: unknown pattern {pattern!r} (valid: {', '.join(PATTERNS)})")
    defaults = PATTERN_DEFAULTS[pattern]
    unknown = set(spec) - set(defaults) - set(COMMON_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: key(s) {sorted(unknown)} do not apply to pattern {pattern!r} "
            f"(valid: {', '.join(sorted(defaults)) or 'none'})"
        )
    out = {**defaults, **spec}
    if pattern in TRAINING_ONLY:
        if not 0 < float(out["group_ratio"]) <= 1:
            raise ValueError(f"{where}.group_ratio must be in (0, 1], got {out['group_ratio']}")
        if not 0 <= float(out["shift_fraction"]) <= 1:
            raise ValueError(f"{where}.shift_fraction must be in [0, 1], got {out['shift_fraction']}")
        if out["wrap"] not in ("none", "roll"):
            raise ValueError(f"{where}.wrap must be 'none' or 'roll', got {out['wrap']!r}")
        if pattern == "s2_attn" and out["num_sink_tokens"]:
            raise ValueError(f"{where}.num_sink_tokens: s2_attn has no sink tokens (use sf_attn)")
    for key in ("window", "block_size", "local_blocks", "stride"):
        if key in defaults and int(out[key]) <= 0:
            raise ValueError(f"{where}.{key} must be > 0, got {out[key]}")
    for key in ("num_sink_tokens",):
        if key in defaults and int(out[key]) < 0:
            raise ValueError(f"{where}.{key} must be >= 0, got {out[key]}")
    return out


def ratio_fraction(ratio: float) -> tuple[int, int]:
    """group_ratio as an integer fraction, so G = n * num // den is exact and tensor-friendly."""
    f = Fraction(float(ratio)).limit_denominator(1 << 16)
    return f.numerator, f.denominator


def num_shifted_heads(spec: dict, num_heads: int) -> int:
    """Heads whose groups are offset by S: the last round(H * shift_fraction) heads."""
    return round(num_heads * float(spec["shift_fraction"]))


def head_step(spec: dict, num_heads: int) -> int:
    step = spec.get("head_step")
    return max(1, int(spec["stride"]) // num_heads) if step is None else int(step)


def head_dependent(spec: dict, num_heads: int) -> bool:
    """Whether the mask differs between heads (else a (B, 1, Lq, Lk) mask serves all heads)."""
    if spec["pattern"] in TRAINING_ONLY:
        return 0 < num_shifted_heads(spec, num_heads) < num_heads
    if spec["pattern"] == "block_sparse":
        return head_step(spec, num_heads) != 0 and num_heads > 1
    return False


# --------------------------------------------------------------------------- context
@dataclass
class MaskContext:
    """Where every query and key sits; all tensors are (B, L) on the attention's device."""

    t_q: torch.Tensor
    t_k: torch.Tensor
    p_q: torch.Tensor
    p_k: torch.Tensor
    doc_q: torch.Tensor
    doc_k: torch.Tensor
    valid_q: torch.Tensor
    valid_k: torch.Tensor
    #: (B,) unpadded sample length n (for the group size).
    length: torch.Tensor
    #: True when there is no padding, one document per row and t = 0..L-1 for Lq == Lk:
    #: the mask then depends only on the shape (backends may cache or skip it).
    trivial: bool
    #: True when queries and keys are the same tokens (no cache): the grouped backends apply.
    self_attention: bool

    @property
    def batch(self) -> int:
        return self.t_q.shape[0]


def build_context(
    batch: int,
    q_len: int,
    k_len: int,
    device,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cross_document: bool = False,
) -> MaskContext:
    """Positions, documents and padding of a call, from what transformers passes.

    - ``attention_mask``: 2D (B, >= k_len) padding mask (1 = real token) or None.
    - ``position_ids``: (B or 1, q_len) positions of the queries; resets mark packed documents.
    - ``kv_positions``: (B, k_len) absolute positions of the keys a compact cache returned
      (``kwargs["longtune_kv_positions"]``); -1 marks an empty slot.
    - ``cu_seqlens``: (docs + 1,) cumulative document lengths of a packed batch-1 row.
    """
    ar_k = torch.arange(k_len, device=device)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"longtune attention expects a 2D padding mask or None, got shape {tuple(attention_mask.shape)}; "
            "pass attention_mask as (batch, seq_len) and let the layout build the pattern"
        )
    pad = None
    if attention_mask is not None:
        pad = attention_mask.to(device=device, dtype=torch.bool)
    if position_ids is not None:
        position_ids = position_ids.to(device).long().expand(batch, -1)

    self_attention = q_len == k_len and kv_positions is None
    if self_attention:
        if pad is not None:
            pad = pad[:, -k_len:]
            valid = pad.expand(batch, -1)
            t = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)
        else:
            valid = torch.ones(batch, k_len, dtype=torch.bool, device=device)
            t = ar_k.expand(batch, -1)
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError("cu_seqlens describes a packed row: batch size must be 1")
            doc = torch.bucketize(ar_k, cu_seqlens.to(device)[1:], right=True).unsqueeze(0)
            starts = cu_seqlens.to(device)[doc]
            p = t - starts
        elif position_ids is not None:
            # A document starts at the first real token and wherever position_ids do not go on
            # by +1; p counts from that start in real tokens, so a left-padded row with plain
            # arange position_ids still has its sinks on its first real tokens.
            start = valid & (t == 0)
            start[:, 1:] |= valid[:, 1:] & (position_ids[:, 1:] != position_ids[:, :-1] + 1)
            doc = torch.cumsum(start.long(), dim=1) - 1
            p = t - torch.cummax(torch.where(start, t, torch.zeros_like(t)), dim=1).values
        else:
            p = t
            doc = torch.zeros_like(t)
        if cross_document:
            doc = torch.zeros_like(t)
            p = t
        length = valid.sum(dim=1)
        trivial = bool(valid.all()) and (
            cross_document
            or (cu_seqlens is None and (position_ids is None or bool((position_ids == ar_k).all())))
        )
        return MaskContext(t, t, p, p, doc, doc, valid, valid, length, trivial, True)

    # With a cache: keys are the cached tokens, queries the last q_len positions.
    if kv_positions is not None:
        t_k = kv_positions.to(device).long().expand(batch, -1)
        valid_k = t_k >= 0
        t_k = t_k.clamp(min=0)
        if pad is not None and pad.shape[1] == k_len:
            valid_k = valid_k & pad
    elif pad is not None:
        pad = pad[:, -k_len:].expand(batch, -1)
        valid_k = pad
        t_k = (torch.cumsum(pad.long(), dim=1) - 1).clamp(min=0)
    else:
        valid_k = torch.ones(batch, k_len, dtype=torch.bool, device=device)
        t_k = ar_k.expand(batch, -1)
    if position_ids is not None:
        t_q = position_ids
    else:
        t_q = t_k[:, -q_len:]
    valid_q = torch.ones(batch, q_len, dtype=torch.bool, device=device)
    if pad is not None and kv_positions is None:
        valid_q = pad[:, -q_len:]
    zeros_q, zeros_k = torch.zeros_like(t_q), torch.zeros_like(t_k)
    length = t_q.max(dim=1).values + 1
    return MaskContext(t_q, t_k, t_q, t_k, zeros_q, zeros_k, valid_q, valid_k, length, False, False)


# --------------------------------------------------------------------------- predicates
def _pattern_allows(spec: dict, num_heads: int, h, ti, tj, pi, pj, n):
    """The pattern itself (causality included), on coordinates; tensor in, tensor out."""
    pattern = spec["pattern"]
    causal = tj <= ti
    if pattern == "causal":
        return causal
    if pattern in TRAINING_ONLY:
        num, den = ratio_fraction(spec["group_ratio"])
        G = torch.clamp(n * num // den, min=1)
        S = G // 2
        shifted = h >= (num_heads - num_shifted_heads(spec, num_heads))
        if spec["wrap"] == "roll":
            # LongLoRA's non-flash code: roll the shifted heads' sequence by -S, then group and
            # apply causality in rolled coordinates. Queries 0..S-1 see keys n-S..n-1: a LEAK,
            # kept only to reproduce LongLoRA numbers.
            ri = torch.where(shifted, torch.remainder(ti - S, n), ti)
            rj = torch.where(shifted, torch.remainder(tj - S, n), tj)
            allow = (ri // G == rj // G) & (rj <= ri)
        else:
            off = torch.where(shifted, S, torch.zeros_like(S))
            allow = ((ti + off) // G == (tj + off) // G) & causal
        allow = allow | (causal & (G >= n))  # N <= G: plain causal attention
        sinks = int(spec["num_sink_tokens"])
        if sinks:
            allow = allow | (causal & (pj < sinks))
        return allow
    if pattern == "sink_window":
        return causal & ((pj < int(spec["num_sink_tokens"])) | (ti - tj < int(spec["window"])))
    if pattern == "block_sparse":
        B = int(spec["block_size"])
        qb, kb = pi // B, pj // B
        step = head_step(spec, num_heads)
        strided = torch.remainder(kb + 1 + h * step, int(spec["stride"])) == 0
        return causal & ((qb - kb < int(spec["local_blocks"])) | strided)
    raise ValueError(f"pattern: unknown pattern {pattern!r} (valid: {', '.join(PATTERNS)})")


def mask_mod(spec: dict, ctx: MaskContext, num_heads: int):
    """The predicate ``(b, h, q_idx, kv_idx) -> bool`` of a layer, with padding and documents.

    Indices are into the query and key tensors of the call. Works with FlexAttention's scalar
    tensor indices and with broadcast index tensors (see :func:`dense_mask`).
    """
    spec = resolve_spec(spec)

    def allowed(b, h, q_idx, kv_idx):
        ti, tj = ctx.t_q[b, q_idx], ctx.t_k[b, kv_idx]
        pi, pj = ctx.p_q[b, q_idx], ctx.p_k[b, kv_idx]
        same_doc = ctx.doc_q[b, q_idx] == ctx.doc_k[b, kv_idx]
        valid = ctx.valid_k[b, kv_idx] & ctx.valid_q[b, q_idx]
        return valid & same_doc & _pattern_allows(spec, num_heads, h, ti, tj, pi, pj, ctx.length[b])

    return allowed


def dense_mask(spec: dict, ctx: MaskContext, num_heads: int) -> torch.Tensor:
    """Boolean mask (B, H or 1, Lq, Lk), the predicate evaluated on every pair."""
    spec = resolve_spec(spec)
    B, Lq, Lk = ctx.batch, ctx.t_q.shape[1], ctx.t_k.shape[1]
    dev = ctx.t_q.device
    heads = num_heads if head_dependent(spec, num_heads) else 1
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(heads, device=dev).view(1, heads, 1, 1)
    q = torch.arange(Lq, device=dev).view(1, 1, Lq, 1)
    k = torch.arange(Lk, device=dev).view(1, 1, 1, Lk)
    m = mask_mod(spec, ctx, num_heads)(b, h, q, k)
    return m.expand(B, heads, Lq, Lk)

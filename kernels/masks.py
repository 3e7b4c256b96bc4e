"""Attention patterns as mask predicates, defined once.

Every pattern is a predicate ``allowed(b, h, q_idx, kv_idx) -> bool tensor`` built by
:func:`mask_mod` from a layer spec (one entry of ``config.longtune_attention["layers"]``) and a
:class:`MaskContext` (where each query/key sits in its sample): small predicates (causal,
padding, same document, sinks, window, groups, local and strided blocks) combined with
:func:`and_masks` / :func:`or_masks`, as in transformers' masking_utils. The same function
serves FlexAttention's ``create_block_mask`` (scalar tensor indices) and, through broadcasting,
the dense boolean mask of :func:`dense_mask`; the fast backends gather a superset of the allowed
keys and evaluate the same predicate on it; the caches ask :func:`still_visible` which keys a
layer can still see and the sink statistics build their masks with :func:`dense_mask`. So there
is one definition to get right (docs/algorithms.md section 1). Pattern names, groups and
defaults: kernels/patterns.py.

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

from kernels.patterns import COMMON_KEYS, PATTERN_DEFAULTS, PATTERNS, TRAINING_ONLY, WRAPS


# --------------------------------------------------------------------------- specs
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
        if out["wrap"] not in WRAPS:
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
    """block_sparse's per-head shift of the strided column; null = max(1, stride // heads)."""
    step = spec.get("head_step")
    return max(1, int(spec["stride"]) // num_heads) if step is None else int(step)


def head_dependent(spec: dict, num_heads: int) -> bool:
    """Whether the mask differs between heads (else a (B, 1, Lq, Lk) mask serves all heads)."""
    if spec["pattern"] in TRAINING_ONLY:
        return 0 < num_shifted_heads(spec, num_heads) < num_heads
    if spec["pattern"] == "block_sparse":
        return head_step(spec, num_heads) != 0 and num_heads > 1
    return False


def inference_spec(spec: dict) -> dict:
    """The spec a layer runs with outside training: training-only patterns become causal."""
    return {"pattern": "causal"} if spec["pattern"] in TRAINING_ONLY else spec


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
# Each builder takes the call's MaskContext (and the pattern's parameters) and returns a
# predicate ``(b, h, q_idx, kv_idx) -> bool tensor``; patterns are these combined with
# and_masks / or_masks (the style of transformers.masking_utils). ``h`` is the head index the
# caller passes in: a caller holding a slice of the heads adds its offset to ``h`` and passes
# the global head count (docs/algorithms.md section 10).
def and_masks(*predicates):
    """Predicate true where every one of ``predicates`` is."""

    def allowed(b, h, q_idx, kv_idx):
        out = predicates[0](b, h, q_idx, kv_idx)
        for pred in predicates[1:]:
            out = out & pred(b, h, q_idx, kv_idx)
        return out

    return allowed


def or_masks(*predicates):
    """Predicate true where any one of ``predicates`` is."""

    def allowed(b, h, q_idx, kv_idx):
        out = predicates[0](b, h, q_idx, kv_idx)
        for pred in predicates[1:]:
            out = out | pred(b, h, q_idx, kv_idx)
        return out

    return allowed


def causal(ctx: MaskContext):
    """Key not after the query (``t_k <= t_q``)."""
    return lambda b, h, q_idx, kv_idx: ctx.t_k[b, kv_idx] <= ctx.t_q[b, q_idx]


def padding(ctx: MaskContext):
    """Query and key are real tokens (not padding, not an empty cache slot)."""
    return lambda b, h, q_idx, kv_idx: ctx.valid_q[b, q_idx] & ctx.valid_k[b, kv_idx]


def same_document(ctx: MaskContext):
    """Query and key belong to the same packed document."""
    return lambda b, h, q_idx, kv_idx: ctx.doc_q[b, q_idx] == ctx.doc_k[b, kv_idx]


def sinks(ctx: MaskContext, num_sink_tokens: int):
    """Key is one of the first ``num_sink_tokens`` tokens of its document."""
    return lambda b, h, q_idx, kv_idx: ctx.p_k[b, kv_idx] < num_sink_tokens


def window(ctx: MaskContext, size: int):
    """Key among the ``size`` most recent tokens up to the query (``t_q - t_k < size``)."""
    return lambda b, h, q_idx, kv_idx: ctx.t_q[b, q_idx] - ctx.t_k[b, kv_idx] < size


def _group_size(ctx: MaskContext, b, num: int, den: int):
    """G = floor(n * num / den), at least 1, for sample b (``num / den`` = group_ratio)."""
    return torch.clamp(ctx.length[b] * num // den, min=1)


def groups(ctx: MaskContext, group_ratio: float, first_shifted_head: int):
    """Query and key in the same group of G = n * group_ratio tokens; heads from
    ``first_shifted_head`` on use groups offset by S = G // 2 (nothing wraps around)."""
    num, den = ratio_fraction(group_ratio)

    def allowed(b, h, q_idx, kv_idx):
        G = _group_size(ctx, b, num, den)
        off = torch.where(h >= first_shifted_head, G // 2, torch.zeros_like(G))
        return (ctx.t_q[b, q_idx] + off) // G == (ctx.t_k[b, kv_idx] + off) // G

    return allowed


def rolled_groups(ctx: MaskContext, group_ratio: float, first_shifted_head: int):
    """LongLoRA's non-flash code: the shifted heads' sequence rolled by -S, then grouped, with
    causality in rolled coordinates. Queries 0..S-1 then see keys n-S..n-1: a LEAK, kept only
    to reproduce LongLoRA's numbers (``wrap: roll``)."""
    num, den = ratio_fraction(group_ratio)

    def allowed(b, h, q_idx, kv_idx):
        n = ctx.length[b]
        G = _group_size(ctx, b, num, den)
        S = G // 2
        ti, tj = ctx.t_q[b, q_idx], ctx.t_k[b, kv_idx]
        shifted = h >= first_shifted_head
        ri = torch.where(shifted, torch.remainder(ti - S, n), ti)
        rj = torch.where(shifted, torch.remainder(tj - S, n), tj)
        return (ri // G == rj // G) & (rj <= ri)

    return allowed


def one_group(ctx: MaskContext, group_ratio: float):
    """The sample fits in one group (n <= G): S2/SF-Attn is then plain causal attention."""
    num, den = ratio_fraction(group_ratio)
    return lambda b, h, q_idx, kv_idx: _group_size(ctx, b, num, den) >= ctx.length[b]


def local_blocks(ctx: MaskContext, block_size: int, count: int):
    """Key block within ``count`` blocks of the query's (``q//B - k//B < count``, on ``p``)."""
    def allowed(b, h, q_idx, kv_idx):
        return ctx.p_q[b, q_idx] // block_size - ctx.p_k[b, kv_idx] // block_size < count

    return allowed


def strided_blocks(ctx: MaskContext, block_size: int, stride: int, step: int):
    """Key block is head h's strided column: ``(k//B + 1 + h * step) % stride == 0``."""
    def allowed(b, h, q_idx, kv_idx):
        return torch.remainder(ctx.p_k[b, kv_idx] // block_size + 1 + h * step, stride) == 0

    return allowed


def pattern_mask_mod(spec: dict, ctx: MaskContext, num_heads: int):
    """The layer's pattern alone (causality included; padding and documents not), as a predicate.
    ``spec`` must be resolved (:func:`resolve_spec`)."""
    pattern = spec["pattern"]
    if pattern == "causal":
        return causal(ctx)
    if pattern in TRAINING_ONLY:
        ratio = spec["group_ratio"]
        first_shifted = num_heads - num_shifted_heads(spec, num_heads)
        extra = [one_group(ctx, ratio)]
        if int(spec["num_sink_tokens"]):
            extra.append(sinks(ctx, int(spec["num_sink_tokens"])))
        if spec["wrap"] == "roll":  # the rolled groups carry their own (leaking) causality
            return or_masks(rolled_groups(ctx, ratio, first_shifted), and_masks(causal(ctx), or_masks(*extra)))
        return and_masks(causal(ctx), or_masks(groups(ctx, ratio, first_shifted), *extra))
    if pattern == "sink_window":
        return and_masks(causal(ctx), or_masks(sinks(ctx, int(spec["num_sink_tokens"])),
                                               window(ctx, int(spec["window"]))))
    if pattern == "block_sparse":
        B, step = int(spec["block_size"]), head_step(spec, num_heads)
        return and_masks(causal(ctx), or_masks(local_blocks(ctx, B, int(spec["local_blocks"])),
                                               strided_blocks(ctx, B, int(spec["stride"]), step)))
    raise ValueError(f"pattern: unknown pattern {pattern!r} (valid: {', '.join(PATTERNS)})")


def mask_mod(spec: dict, ctx: MaskContext, num_heads: int):
    """The predicate ``(b, h, q_idx, kv_idx) -> bool`` of a layer, with padding and documents.

    Indices are into the query and key tensors of the call. Works with FlexAttention's scalar
    tensor indices and with broadcast index tensors (see :func:`dense_mask`).
    """
    spec = resolve_spec(spec)
    return and_masks(padding(ctx), same_document(ctx), pattern_mask_mod(spec, ctx, num_heads))


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


def head_positions_mask(spec: dict, batch: int, q_len: int, head_positions: torch.Tensor, num_heads: int,
                        **context) -> torch.Tensor:
    """Boolean mask (B, num_heads, Lq, Lk) for caches whose kept keys differ per KV head (H2O):
    ``head_positions`` (B, Hkv, Lk) holds each KV head's key positions; each query head uses
    its KV group's. ``context``: the other arguments of :func:`build_context`."""
    _, kv_heads, k_len = head_positions.shape
    rep = num_heads // kv_heads
    masks = []
    for g in range(kv_heads):
        ctx = build_context(batch, q_len, k_len, head_positions.device, kv_positions=head_positions[:, g],
                            **context)
        m = dense_mask(spec, ctx, num_heads)
        masks.append(m[:, g * rep:(g + 1) * rep] if m.shape[1] == num_heads
                     else m.expand(batch, rep, q_len, k_len))
    return torch.cat(masks, dim=1)


def still_visible(spec: dict, key_positions: torch.Tensor, num_heads: int,
                  next_position: torch.Tensor | int | None = None) -> torch.Tensor:
    """(B, n) bool: which cached keys (absolute positions, -1 = empty slot) the query at
    ``next_position`` (default: each row's last position + 1) sees in at least one head, at
    inference (training-only patterns are causal there).

    For every inference pattern a key that a query cannot see stays invisible to all later
    queries (sinks and strided columns stay, windows and local blocks only move forward;
    tests/test_masks.py checks it), so this is also "visible to some future query": exactly
    what a cache of this layer must keep."""
    spec = resolve_spec(inference_spec(spec))
    pos = key_positions.long()
    batch, n = pos.shape
    if next_position is None:
        next_position = pos.amax(dim=-1, keepdim=True) + 1
    q = torch.as_tensor(next_position, device=pos.device).long().reshape(-1, 1).expand(batch, 1)
    ctx = build_context(batch, 1, n, pos.device, position_ids=q, kv_positions=pos)
    return dense_mask(spec, ctx, num_heads).any(dim=1)[:, 0]

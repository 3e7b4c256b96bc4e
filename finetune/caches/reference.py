"""A plain reference attention function that honours the cache protocol (tests, bench fallback).

Not the production kernel (that is kernels/, registered as "longtune"): this one materialises
the whole (batch, heads, q, k) score matrix in float64/float32, builds the layer's mask from
positions, and reports probabilities to an H2O observer. It reads
- the layer's pattern from `module.config.longtune_attention["layers"][module.layer_idx]`
  (absent: causal; s2_attn/sf_attn run causal at inference);
- query positions from `kwargs["position_ids"]`;
- key positions from `kwargs["longtune_kv_head_positions"]` / `["longtune_kv_positions"]`,
  else 0..k_len-1 (a full DynamicCache).
Register it under a name of your choice with `register(name)`.
"""

from __future__ import annotations

import torch

from kernels.masks import build_context, dense_mask, head_positions_mask, inference_spec

from .base import HEAD_POSITIONS_KEY, OBSERVER_KEY, POSITIONS_KEY


def pattern_mask(entry: dict, qpos: torch.Tensor, kpos: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Boolean (b, H, q, k): what a query at ``qpos`` (b, q) sees of keys at ``kpos`` (b, k) or,
    per KV head, (b, Hkv, k) in this layer at inference; -1 marks an empty slot / left padding.
    The mask definition of kernels/masks.py (training-only patterns run causal)."""
    b, q = qpos.shape
    spec = inference_spec(entry)
    if kpos.dim() == 3:
        return head_positions_mask(spec, b, q, kpos, num_heads, position_ids=qpos)
    ctx = build_context(b, q, kpos.shape[-1], qpos.device, position_ids=qpos, kv_positions=kpos)
    return dense_mask(spec, ctx, num_heads).expand(b, num_heads, q, kpos.shape[-1])


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, H, q, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    groups = H // hkv
    scaling = d**-0.5 if scaling is None else scaling
    layout = getattr(module.config, "longtune_attention", None) or {}
    entries = layout.get("layers") or []
    entry = entries[module.layer_idx] if module.layer_idx < len(entries) else {"pattern": "causal"}

    pos_ids = kwargs.get("position_ids")
    if pos_ids is None:
        pos_ids = torch.arange(k - q, k, device=query.device).unsqueeze(0)
    qpos = pos_ids.to(query.device).expand(b, q)
    if kwargs.get(HEAD_POSITIONS_KEY) is not None:
        kpos = kwargs[HEAD_POSITIONS_KEY]  # (b, Hkv, k)
    elif kwargs.get(POSITIONS_KEY) is not None:
        kpos = kwargs[POSITIONS_KEY].expand(b, k)
    else:
        kpos = torch.arange(k, device=query.device).expand(b, k)
    allow = pattern_mask(entry, qpos, kpos.to(query.device), H)

    kf = key.repeat_interleave(groups, dim=1)
    vf = value.repeat_interleave(groups, dim=1)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = torch.matmul(query.to(work), kf.to(work).transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allow, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    observer = kwargs.get(OBSERVER_KEY)
    if observer is not None:
        chunk = getattr(observer, "prefill_chunk", q) or q
        for start in range(0, q, chunk):
            observer.observe_attention(module.layer_idx, probs[:, :, start : start + chunk])
    out = torch.matmul(probs, vf.to(work)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


def register(name: str = "longtune_reference") -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(name, reference_attention)
    return name

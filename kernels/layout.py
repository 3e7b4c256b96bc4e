"""Per-layer attention layout: built from a recipe, validated, installed into a model config.

The layout is plain data (saved in config.json as ``config.longtune_attention``; format in
docs/design.md) so an exported model reloads with the same kernels and nothing else to ship.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

from kernels.masks import head_step, inference_spec, num_shifted_heads, ratio_fraction, resolve_spec
from kernels.patterns import PERSISTENT, TRAINING_ONLY

LAYOUT_VERSION = 1
_LONGGEN = ("LongGen's ablation (Ge et al. 2024): about 1/3 full layers placed together in the middle "
            "beats top, bottom and interleaved placement; 1/5-1/3 full works, 1/16 collapses")


# --------------------------------------------------------------------------- building
def _attention_spec(att) -> dict:
    if att.pattern == "causal":
        return {"pattern": "causal"}
    return {
        "pattern": att.pattern,
        "group_ratio": float(att.group_ratio),
        "shift_fraction": float(att.shift_fraction),
        "wrap": att.wrap,
        "num_sink_tokens": 0 if att.pattern == "s2_attn" else int(att.num_sink_tokens),
    }


def _sparse_spec(sp, cross_document: bool) -> dict:
    if sp.pattern == "sink_window":
        spec = {"pattern": "sink_window", "window": int(sp.window), "num_sink_tokens": int(sp.num_sink_tokens)}
    else:
        spec = {"pattern": "block_sparse", "block_size": int(sp.block_size), "local_blocks": int(sp.local_blocks),
                "stride": int(sp.stride), "head_step": sp.head_step}
    spec["cross_document"] = bool(cross_document)
    return spec


def full_layer_indices(full_layers, num_layers: int) -> list[int]:
    """Indices of the full-attention layers of a hybrid (``hybrid.full_layers``).

    ``middle`` covers the middle ``fraction`` of the stack: [floor(L(1-f)/2), ceil(L(1+f)/2)),
    so 32 layers at 1/3 give 10..21 (12 full + 20 sparse, LongGen's Llama-2-7B split).
    ``top``/``bottom``/``interleave`` take ceil(L*f) layers at the end / start / evenly spaced.
    """
    if isinstance(full_layers, (list, tuple)):
        bad = [i for i in full_layers if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"hybrid.full_layers: indices {bad} out of range for {num_layers} layers "
                             f"(valid 0..{num_layers - 1})")
        return sorted({int(i) for i in full_layers})
    f, placement = float(full_layers.fraction), full_layers.placement
    if placement == "middle":
        return list(range(math.floor(num_layers * (1 - f) / 2), math.ceil(num_layers * (1 + f) / 2)))
    count = min(num_layers, max(1, math.ceil(num_layers * f)))
    if placement == "top":
        return list(range(num_layers - count, num_layers))
    if placement == "bottom":
        return list(range(count))
    if placement == "interleave":
        return sorted({int((i + 0.5) * num_layers / count) for i in range(count)})
    raise ValueError(f"hybrid.full_layers.placement: unknown {placement!r} (valid: middle, top, bottom, interleave)")


def build_layout(recipe, num_layers: int) -> dict:
    """Layout dict from ``recipe.attention`` and ``recipe.hybrid`` for a model of ``num_layers``.

    Without a hybrid every layer gets the attention pattern. In a hybrid, the full layers get the
    attention pattern (causal, or s2/sf_attn while training) and the others the sparse pattern.
    Warns (LongGen's ablation) for fewer than 1/5 full layers or interleaved placement.
    """
    att, hybrid = recipe.attention, getattr(recipe, "hybrid", None)
    full = _attention_spec(att)
    layers = [copy.deepcopy(full) for _ in range(num_layers)]
    if hybrid is not None:
        idx = set(full_layer_indices(hybrid.full_layers, num_layers))
        placement = getattr(hybrid.full_layers, "placement", None)
        if placement == "interleave":
            warnings.warn(f"hybrid.full_layers.placement: interleave; {_LONGGEN}", stacklevel=2)
        if len(idx) < num_layers / 5:
            warnings.warn(f"hybrid.full_layers: only {len(idx)}/{num_layers} full layers (< 1/5); {_LONGGEN}",
                          stacklevel=2)
        sparse = _sparse_spec(hybrid.sparse, hybrid.cross_document)
        layers = [copy.deepcopy(full) if i in idx else copy.deepcopy(sparse) for i in range(num_layers)]
    layout = {"version": LAYOUT_VERSION, "backend": att.backend, "cross_document": bool(att.cross_document),
              "layers": layers}
    validate_layout(layout, num_layers)
    return layout


# --------------------------------------------------------------------------- checking
def validate_layout(layout: dict, num_layers: int) -> dict:
    """Raise ValueError naming the key if the layout cannot run on ``num_layers`` layers."""
    from kernels.registry import BACKENDS

    if not isinstance(layout, dict):
        raise TypeError(f"longtune_attention must be a dict, got {type(layout).__name__}")
    if layout.get("version", LAYOUT_VERSION) != LAYOUT_VERSION:
        raise ValueError(f"longtune_attention.version: {layout.get('version')!r} unsupported (expected {LAYOUT_VERSION})")
    unknown = set(layout) - {"version", "backend", "cross_document", "layers"}
    if unknown:
        raise ValueError(f"longtune_attention: unknown key(s) {sorted(unknown)}")
    if layout.get("backend", "auto") not in BACKENDS:
        raise ValueError(f"longtune_attention.backend: {layout['backend']!r} (valid: {', '.join(BACKENDS)})")
    layers = layout.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        got = len(layers) if isinstance(layers, list) else type(layers).__name__
        raise ValueError(f"longtune_attention.layers: need one spec per decoder layer ({num_layers}), got {got}")
    for i, spec in enumerate(layers):
        r = resolve_spec(spec, f"longtune_attention.layers[{i}]")
        if r.get("backend", "auto") not in BACKENDS:
            raise ValueError(f"longtune_attention.layers[{i}].backend: {r['backend']!r} (valid: {', '.join(BACKENDS)})")
    return layout


def install_layout(config, layout: dict) -> None:
    """Validate, store as ``config.longtune_attention``, select ``_attn_implementation = "longtune"``."""
    from kernels.registry import register

    validate_layout(layout, config.num_hidden_layers)
    register()
    config.longtune_attention = copy.deepcopy(layout)
    config._attn_implementation = "longtune"


def inference_layout(layout: dict) -> dict:
    """Training-only patterns (s2_attn, sf_attn) replaced by causal; the hybrid stays."""
    out = copy.deepcopy(layout)
    out["layers"] = [inference_spec(s) for s in out["layers"]]
    return out


def sparse_layer_indices(layout: dict | None) -> list[int]:
    """Indices of the layers that stay sparse at inference (sink_window / block_sparse)."""
    layers = (layout or {}).get("layers") or []
    return [i for i, s in enumerate(layers) if s.get("pattern") in PERSISTENT]


def is_hybrid(layout: dict | None) -> bool:
    """True if some layer is sparse at inference (a LongGen hybrid); False without a layout."""
    return bool(sparse_layer_indices(layout))


# --------------------------------------------------------------------------- cost
def attended_fraction(layer_spec: dict, n: int, num_heads: int = 8) -> float:
    """Attended (query, key) pairs of one layer at length n over those of full causal attention,
    averaged over heads: the FLOP fraction an ideal kernel pays. Exact counts, O(n) memory.
    (``wrap: roll`` is counted like ``none``; its leak changes which keys, not how many.)"""
    spec = resolve_spec(layer_spec)
    t = torch.arange(n, dtype=torch.float64)
    total = n * (n + 1) / 2
    pattern = spec["pattern"]
    if pattern == "causal":
        return 1.0
    if pattern in TRAINING_ONLY:
        num, den = ratio_fraction(spec["group_ratio"])
        G, s = max(1, n * num // den), int(spec["num_sink_tokens"])
        if G >= n:
            return 1.0
        ns = num_shifted_heads(spec, num_heads)
        acc = 0.0
        for off, heads in ((0, num_heads - ns), (G // 2, ns)):
            if heads:
                gstart = torch.clamp(torch.div(t + off, G, rounding_mode="floor") * G - off, min=0)
                cnt = (t - gstart + 1) + torch.clamp(gstart, max=s)
                acc += heads * float(cnt.sum())
        return acc / num_heads / total
    if pattern == "sink_window":
        W, s = int(spec["window"]), int(spec["num_sink_tokens"])
        cnt = torch.clamp(t + 1, max=W) + torch.clamp(torch.clamp(t - W + 1, min=0), max=s)
        return float(cnt.sum()) / total
    B, local, stride = int(spec["block_size"]), int(spec["local_blocks"]), int(spec["stride"])
    step = head_step(spec, num_heads)
    nb = -(-n // B)
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    acc = 0.0
    for h in range(num_heads):
        allow = ((qb - kb < local) | ((kb + 1 + h * step) % stride == 0)) & (kb < qb)
        before = allow.sum(1).double() * B  # full blocks before the query's own block
        tb = torch.div(t, B, rounding_mode="floor").long()
        acc += float((before[tb] + t - tb * B + 1).sum())
    return acc / num_heads / total

"""Inference KV caches: full, StreamingLLM sink+window, H2O, LongGen hybrid.

    from finetune.caches import make_cache
    cache = make_cache(model, {"version": 1, "method": "hybrid"})
    out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    cache.nbytes()  # K/V bytes actually held

See docs/kv_caches.md.
"""

from __future__ import annotations

import difflib

from pydantic import ValidationError
from transformers import DynamicCache
from transformers.cache_utils import Cache

from finetune.recipe import KVCacheSection

from .base import FullLayer, PositionedCache
from .h2o import H2OCache, H2OLayer
from .h2o_attention import NAME as H2O_ATTENTION
from .h2o_attention import register as register_h2o_attention
from .hybrid import SPARSE_PATTERNS, BlockSparseLayer, HybridCache, is_hybrid_layout, layout_of
from .sink_window import SinkWindowCache, SinkWindowLayer

__all__ = [
    "KV_CONFIG_VERSION",
    "BlockSparseLayer",
    "FullLayer",
    "H2OCache",
    "H2OLayer",
    "HybridCache",
    "KVConfigError",
    "PositionedCache",
    "SinkWindowCache",
    "SinkWindowLayer",
    "cache_nbytes",
    "make_cache",
    "validate_kv_config",
]

KV_CONFIG_VERSION = 1
#: Informational keys export writes into kv_cache_config.json; passed through unchecked.
DERIVED_KEYS = ("attn_implementation", "full_layers", "num_layers")


class KVConfigError(ValueError):
    """A KV-cache config that cannot be used with this model; the message names the key."""


def _get(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def validate_kv_config(kv: dict | None, model_config=None) -> dict:
    """Check a KV-cache config (the `export.kv_cache` recipe section, `kv_cache_config.json`)
    and return it normalised: every field present, `"version": 1`, H2O budgets defaulted to the
    reference 0.1 + 0.1 of the prompt when none is given. `model_config` (PretrainedConfig or its
    dict) enables the checks against the model (layer indices, hybrid layout)."""
    kv = {} if kv is None else kv
    if isinstance(kv, KVCacheSection):
        kv = kv.model_dump()
    if not isinstance(kv, dict):
        raise KVConfigError(f"kv_cache: expected a mapping, got {type(kv).__name__}")
    kv = dict(kv)
    derived = {k: kv.pop(k) for k in DERIVED_KEYS if k in kv}
    version = kv.pop("version", KV_CONFIG_VERSION)
    if version != KV_CONFIG_VERSION:
        raise KVConfigError(
            f"kv_cache.version: unsupported version {version!r} (this longtune reads {KV_CONFIG_VERSION})"
        )
    try:
        section = KVCacheSection.model_validate(kv)
    except ValidationError as e:
        valid = list(KVCacheSection.model_fields) + ["version", *DERIVED_KEYS]
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "literal[")))
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                hint = f"; did you mean 'kv_cache.{close[0]}'?" if close else ""
                lines.append(f"kv_cache.{key}: unknown key{hint} (valid: {', '.join(valid)})")
            else:
                lines.append(f"kv_cache.{key}: {err['msg']} (got {err.get('input')!r})")
        raise KVConfigError("invalid KV-cache config:\n  " + "\n  ".join(dict.fromkeys(lines))) from None
    out = section.model_dump()

    m = out["method"]
    if m == "sink" and out["window"] is None:
        raise KVConfigError("kv_cache.window: required for method 'sink' (tokens kept after the sinks)")
    if m == "h2o":
        for tok, ratio in (("heavy", "heavy_ratio"), ("recent", "recent_ratio")):
            if out[tok] is not None and out[ratio] is not None:
                raise KVConfigError(f"kv_cache.{tok} / kv_cache.{ratio}: set one of them, not both")
            if out[tok] is None and out[ratio] is None:
                out[ratio] = 0.1  # H2O reference default
    layers = out["layers"]

    if model_config is not None:
        n = _get(model_config, "num_hidden_layers")
        layout = layout_of(model_config)
        if m == "hybrid" and not is_hybrid_layout(layout):
            raise KVConfigError(
                "kv_cache.method: 'hybrid' needs a model with a LongGen hybrid layout "
                "(config.longtune_attention with sink_window/block_sparse layers); this model has none. "
                "Use method 'full', 'sink' or 'h2o', or train with a `hybrid` recipe section."
            )
        if isinstance(layers, list):
            bad = [i for i in layers if not 0 <= i < n]
            if bad:
                raise KVConfigError(f"kv_cache.layers: indices {bad} out of range for a {n}-layer model")
        elif layers == "sparse" and m in ("sink", "h2o") and not is_hybrid_layout(layout):
            raise KVConfigError(
                "kv_cache.layers: 'sparse' selects the LongGen sparse layers, but this model has no hybrid layout"
            )
        if m == "h2o":
            heads, kv_heads = (
                _get(model_config, "num_attention_heads"),
                _get(model_config, "num_key_value_heads"),
            )
            if kv_heads and heads % kv_heads:
                raise KVConfigError(
                    f"kv_cache.method: h2o needs heads ({heads}) divisible by KV heads ({kv_heads})"
                )
    return {"version": KV_CONFIG_VERSION, **out, **derived}


def chosen_layers(kv: dict, model_config) -> list[int]:
    n = _get(model_config, "num_hidden_layers")
    if kv["layers"] == "all":
        return list(range(n))
    if kv["layers"] == "sparse":
        return [
            i for i, e in enumerate(layout_of(model_config)["layers"]) if e.get("pattern") in SPARSE_PATTERNS
        ]
    return sorted(set(kv["layers"]))


def _ensure_longtune_attention(model, need_layout: bool) -> None:
    """h2o/sink/hybrid need the "longtune" attention function (it reads the key positions and,
    for H2O, reports the probabilities). Install the model's own layout (inference form) or,
    without one, an all-causal layout."""
    config = model.config
    if _get(config, "_attn_implementation") in ("longtune", H2O_ATTENTION) and layout_of(config) is not None:
        return
    try:
        from kernels.layout import inference_layout, install_layout
    except ImportError as e:  # pragma: no cover - kernels is part of longtune
        raise RuntimeError(
            f"this KV cache needs the 'longtune' attention function from kernels/ ({e}); "
            "kernels.layout could not be imported"
        ) from e
    layout = layout_of(config)
    if layout is None:
        if need_layout:
            raise KVConfigError("kv_cache.method: 'hybrid' needs config.longtune_attention")
        layout = {
            "version": 1,
            "backend": "auto",
            "cross_document": False,
            "layers": [{"pattern": "causal"} for _ in range(config.num_hidden_layers)],
        }
    install_layout(config, inference_layout(layout))


def make_cache(model, kv_config: dict | KVCacheSection | None = None) -> Cache:
    """The cache named by a KV-cache config, for `model.generate(cache=cache)`.

    method full -> transformers DynamicCache; sink -> SinkWindowCache; h2o -> H2OCache;
    hybrid -> HybridCache (needs the model's LongGen layout). For sink/h2o/hybrid, and for any
    model with a hybrid layout, the model is switched to the "longtune" attention function if
    it is not using it yet."""
    config = model.config
    kv = validate_kv_config(kv_config, config)
    m = kv["method"]
    if m == "full":
        if is_hybrid_layout(layout_of(config)):  # the sparse layers are the architecture
            _ensure_longtune_attention(model, need_layout=True)
        return DynamicCache(config=config)
    _ensure_longtune_attention(model, need_layout=(m == "hybrid"))
    if m == "hybrid":
        return HybridCache(config)
    n = config.num_hidden_layers
    layers = chosen_layers(kv, config)
    if m == "sink":
        return SinkWindowCache(n, kv["window"], kv["num_sink_tokens"], layers=layers)
    # H2O's scores come from the attention pass itself ("longtune_h2o": kernels' "longtune" with
    # the column sums of the fused prefill), see h2o_attention.py
    config._attn_implementation = register_h2o_attention()
    groups = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)
    return H2OCache(
        n,
        groups,
        layers=layers,
        heavy=kv["heavy"],
        recent=kv["recent"],
        heavy_ratio=kv["heavy_ratio"],
        recent_ratio=kv["recent_ratio"],
        num_sink_tokens=kv["num_sink_tokens"],
        score_normalization=kv["score_normalization"],
        gqa_reduction=kv["gqa_reduction"],
        prefill_chunk=kv["prefill_chunk"],
    )


def cache_nbytes(cache: Cache) -> int:
    """K/V bytes held by any cache (longtune caches or transformers' own)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total

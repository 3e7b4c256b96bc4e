"""Inference KV caches: full, StreamingLLM sink+window, H2O, LongGen hybrid.

    from finetune.caches import make_cache
    cache = make_cache(model, {"version": 1, "method": "hybrid"})
    out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    cache.nbytes()  # K/V bytes actually held

See docs/kv_caches.md.
"""

from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import Cache

from finetune.recipe import KVCacheSection
from kernels.layout import inference_layout, install_layout, is_hybrid, sparse_layer_indices

from .base import FullLayer, PositionedCache
from .config import VERSION, KVConfigError, config_value, validate
from .h2o import H2OCache, H2OLayer
from .h2o_attention import NAME as H2O_ATTENTION
from .h2o_attention import register as register_h2o_attention
from .hybrid import BlockSparseLayer, HybridCache, layout_of
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

KV_CONFIG_VERSION = VERSION
validate_kv_config = validate


def chosen_layers(kv: dict, model_config) -> list[int]:
    n = config_value(model_config, "num_hidden_layers")
    if kv["layers"] == "all":
        return list(range(n))
    if kv["layers"] == "sparse":
        return sparse_layer_indices(layout_of(model_config))
    return sorted(set(kv["layers"]))


def _ensure_longtune_attention(model, need_layout: bool) -> None:
    """h2o/sink/hybrid need the "longtune" attention function (it reads the key positions and,
    for H2O, reports the probabilities). Install the model's own layout (inference form) or,
    without one, an all-causal layout."""
    config = model.config
    if config_value(config, "_attn_implementation") in ("longtune", H2O_ATTENTION) and layout_of(config) is not None:
        return
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
    hybrid -> HybridCache (needs the model's LongGen layout). For sink/hybrid, and for any
    model with a hybrid layout, the model is switched to the "longtune" attention function if
    it is not using it yet; for h2o to "longtune_h2o" (h2o_attention.py). A model whose config
    has `use_cache=False` (as built for training) gets it turned on, in its config and its
    generation config: without it generate re-feeds the whole sequence at every step."""
    config = model.config
    kv = validate_kv_config(kv_config, config)
    # A model built for training has use_cache off (build_base_model): generate would then feed
    # the whole sequence at every step and the cache would append it again (silently wrong).
    # A cache is asked for, so caching is what the caller wants: turn it on.
    config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    m = kv["method"]
    if m == "full":
        if is_hybrid(layout_of(config)):  # the sparse layers are the architecture
            _ensure_longtune_attention(model, need_layout=True)
        return DynamicCache(config=config)
    _ensure_longtune_attention(model, need_layout=(m == "hybrid"))
    if m == "hybrid":
        return HybridCache(config)
    n = config.num_hidden_layers
    layers = chosen_layers(kv, config)
    if m == "sink":
        rope = None
        if kv["positions"] == "cache":
            rope = getattr(model.get_decoder(), "rotary_emb", None)
            if rope is None:
                raise KVConfigError(
                    f"kv_cache.positions: 'cache' re-rotates keys with the model's RoPE, but "
                    f"{type(model).__name__} has no rotary_emb; use positions 'absolute'"
                )
        return SinkWindowCache(n, kv["window"], kv["num_sink_tokens"], layers=layers, rope=rope)
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

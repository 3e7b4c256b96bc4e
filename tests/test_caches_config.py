"""validate_kv_config / make_cache: errors name the key; the right cache for each method."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from finetune.caches import H2OCache, HybridCache, SinkWindowCache, make_cache, validate_kv_config
from finetune.recipe import KVCacheSection

SW = {"pattern": "sink_window", "window": 8, "num_sink_tokens": 2}
FULL = {"pattern": "causal"}


def test_validate_defaults_and_version(tiny_config):
    out = validate_kv_config({"method": "h2o"}, LlamaConfig(**tiny_config(num_hidden_layers=3)))
    assert out["version"] == 2 and out["positions"] == "absolute"
    assert out["heavy_ratio"] == out["recent_ratio"] == 0.1  # H2O reference default
    assert validate_kv_config(None)["method"] == "full"
    assert validate_kv_config(KVCacheSection(method="sink", window=16))["window"] == 16
    # export's informational keys pass through
    out = validate_kv_config(
        {"method": "full", "num_layers": 3, "full_layers": None, "attn_implementation": None}
    )
    assert out["num_layers"] == 3


@pytest.mark.parametrize(
    "kv, model_cfg, key",
    [
        ({"version": 3}, None, "kv_cache.version"),
        ({"methd": "sink"}, None, "did you mean 'kv_cache.method'"),
        ({"method": "lru"}, None, "kv_cache.method"),
        ({"method": "sink"}, None, "kv_cache.window"),
        ({"method": "h2o", "heavy": 4, "heavy_ratio": 0.1}, None, "kv_cache.heavy"),
        ({"method": "h2o", "recent_ratio": 1.5}, None, "kv_cache.recent_ratio"),
        ({"method": "hybrid"}, "tiny", "kv_cache.method: 'hybrid' needs"),
        ({"method": "sink", "window": 4, "layers": [0, 7]}, "tiny", "kv_cache.layers"),
        ({"method": "h2o", "layers": "sparse"}, "tiny", "kv_cache.layers"),
    ],
)
def test_validate_errors_name_the_key(kv, model_cfg, key, tiny_config):
    model_cfg = LlamaConfig(**tiny_config(num_hidden_layers=3)) if model_cfg == "tiny" else model_cfg
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace("'", "'")):
        validate_kv_config(kv, model_cfg)


def test_make_cache_builds_each_method(tiny_llama):
    kernels_layout = pytest.importorskip("kernels.layout")
    model = tiny_llama(layout=[SW, FULL, SW])
    model.config._attn_implementation = "sdpa"
    assert isinstance(make_cache(model, None), DynamicCache)
    assert model.config._attn_implementation == "longtune"  # a hybrid model needs its sparse masks
    assert isinstance(make_cache(model, {"method": "hybrid"}), HybridCache)
    assert model.config._attn_implementation == "longtune"
    c = make_cache(model, {"method": "sink", "window": 4, "layers": "sparse"})
    assert isinstance(c, SinkWindowCache)
    assert [type(layer).__name__ for layer in c.layers] == ["SinkWindowLayer", "FullLayer", "SinkWindowLayer"]
    c = make_cache(model, KVCacheSection(method="h2o", heavy=3, recent=3, layers=[1]))
    assert isinstance(c, H2OCache) and [type(layer).__name__ for layer in c.layers][1] == "H2OLayer"
    assert kernels_layout is not None


def test_make_cache_installs_longtune_attention_and_generates(tiny_llama):
    pytest.importorskip("kernels.layout")
    model = tiny_llama(3, dtype=torch.float64)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 97, (2, 20))
    kw = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 8,
        "min_new_tokens": 8,
        "do_sample": False,
    }
    with torch.no_grad():
        kw["pad_token_id"] = 0
        want = model.generate(ids, cache=DynamicCache(), **kw)
        cache = make_cache(model, {"method": "h2o", "heavy": 100, "recent": 100})
        assert model.config._attn_implementation == "longtune_h2o"  # kernels' "longtune" + scores from the fused pass
        assert torch.equal(model.generate(ids, cache=cache, **kw), want)
        cache = make_cache(model, {"method": "h2o", "heavy": 3, "recent": 2, "num_sink_tokens": 1})
        model.generate(ids, cache=cache, **kw)
        assert cache.kept_tokens() == [6, 6, 6]
        cache = make_cache(model, {"method": "sink", "window": 5, "num_sink_tokens": 2})
        model.generate(ids, cache=cache, **kw)
        assert cache.kept_tokens() == [7, 7, 7]


@pytest.mark.parametrize("kv", [{"method": "h2o", "heavy": 3, "recent": 3}, {"method": "sink", "window": 5}])
def test_make_cache_turns_use_cache_on(kv, tiny_llama):
    """A model built for training (config.use_cache=False, as build_base_model returns it): with
    a cache from make_cache, generate must still feed one token per step and give the tokens of
    the same model with use_cache on."""
    trained = tiny_llama(layers=3, dtype=torch.float64)
    trained.config.use_cache = False
    trained.generation_config.use_cache = False
    plain = tiny_llama(layers=3, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 12))
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "min_new_tokens": 8,
          "do_sample": False, "pad_token_id": 0}  # fmt: skip
    with torch.no_grad():
        cache = make_cache(trained, kv)
        got = trained.generate(ids, cache=cache, **kw)
        want = plain.generate(ids, cache=make_cache(plain, kv), **kw)
    assert cache.get_seq_length() == 12 + 8 - 1  # one token per step, not the whole sequence again
    assert torch.equal(got, want)
    assert trained.config.use_cache and trained.generation_config.use_cache

"""Sink + window cache: exact against a full cache with the same mask; memory bound."""

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria

from finetune.caches.sink_window import SinkWindowCache, SinkWindowLayer


def test_sink_cache_is_the_sink_window_mask_without_rerotation(reference_llama, greedy):
    """Keys stay at their absolute positions: decoding with a sink cache on a causal model gives
    exactly what a full cache gives under the mask `j < s or i - j < W + 1` (the cache holds the
    sinks and the last W tokens; the new token makes W + 1). The prompt is shorter than the
    window because `method: sink` prefills with plain causal attention over the whole prompt."""
    W, s = 6, 2
    masked = reference_llama({"pattern": "sink_window", "window": W + 1, "num_sink_tokens": s})
    ids = torch.randint(0, 97, (2, 4))
    want = greedy(masked, ids, DynamicCache(), 30)
    plain = reference_llama()  # same weights (same seed), causal attention
    cache = SinkWindowCache(2, window=W, num_sink_tokens=s)
    assert torch.equal(greedy(plain, ids, cache, 30), want)
    assert cache.kept_tokens() == [W + s, W + s]
    assert not torch.equal(greedy(plain, ids, DynamicCache(), 30), want)  # eviction mattered


def test_sink_memory_stays_within_budget(reference_llama, greedy):
    W, s = 5, 3
    m = reference_llama()
    cache = SinkWindowCache(2, window=W, num_sink_tokens=s, layers=[0])
    sizes = []

    class Record(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            sizes.append((cache.get_seq_length(), cache.kept_tokens(), cache.nbytes()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    greedy(m, torch.randint(0, 97, (1, 4)), cache, 40, [Record()])
    per_token = 2 * 2 * 8 * 8  # K+V, 2 kv heads, head_dim 8, float64
    for seen, kept, nbytes in sizes:
        assert kept == [min(seen, W + s), seen]
        assert nbytes == per_token * (min(seen, W + s) + seen)
    assert sizes[-1][0] == 43
    layer = cache.layers[0]
    assert layer.ring and layer.keys.shape[-2] == W + s  # fixed-size ring storage
    assert layer.ordered()[2][0].tolist() == [0, 1, 2] + list(range(43 - W, 43))


def test_crop_and_reorder():
    layer = SinkWindowLayer(3, 1)
    k = torch.arange(2 * 6, dtype=torch.float).view(2, 1, 6, 1)
    layer.update(k, k, torch.arange(6).expand(2, 6))
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.ordered()[0][0], k[1][:, [0, 3, 4, 5]])
    try:
        layer.crop(-1)
    except RuntimeError as e:
        assert "cannot be cropped" in str(e)
    else:
        raise AssertionError("crop of an evicting layer must fail")


def test_streaming_positions_past_max_position_embeddings(tiny_llama):
    """`positions: cache` (StreamingLLM): keys re-rotated to contiguous positions inside the
    cache. With one layer a key depends only on its token and its position, so every decode
    step must equal a fresh forward of the kept tokens (the sinks, the last W tokens and the
    query) at positions 0..n-1, even far past max_position_embeddings (32 here)."""
    from finetune.caches import make_cache

    W, s, prompt, new = 6, 2, 5, 43  # 48 tokens: 1.5x the model's positions
    m = tiny_llama(layers=1, seed=3, dtype=torch.float64, max_position_embeddings=32)
    ids = torch.randint(0, 97, (1, prompt))
    kv = {"method": "sink", "window": W, "num_sink_tokens": s, "positions": "cache"}
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0,
          "return_dict_in_generate": True, "output_logits": True}  # fmt: skip
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), cache=make_cache(m, kv), **kw)
        seq = out.sequences[0]
        assert seq.shape[0] == prompt + new > m.config.max_position_embeddings
        for i, logits in enumerate(out.logits):
            t = prompt - 1 + i  # position of the query that produced these logits
            kept = list(range(t + 1)) if t <= s + W else list(range(s)) + list(range(t - W, t + 1))
            ref = m(input_ids=seq[kept].unsqueeze(0)).logits[0, -1]  # positions 0..len(kept)-1
            torch.testing.assert_close(logits[0].double(), ref, rtol=1e-6, atol=1e-6)  # generate keeps fp32 logits
        # absolute positions (the default) see the true distances: different logits once evicting
        absolute = m.generate(ids, attention_mask=torch.ones_like(ids),
                              cache=make_cache(m, {**kv, "positions": "absolute"}), **kw)  # fmt: skip
    assert not torch.allclose(absolute.logits[-1], out.logits[-1])


def test_streaming_positions_left_padded_row_equals_row_alone(tiny_llama):
    """In-cache positions count a row's real tokens only: a left-padded row decodes as alone."""
    from finetune.caches import make_cache

    m = tiny_llama(layers=1, seed=3, dtype=torch.float64, max_position_embeddings=32)
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    kv = {"method": "sink", "window": 4, "num_sink_tokens": 1, "positions": "cache"}
    kw = {"max_new_tokens": 30, "min_new_tokens": 30, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        got = m.generate(ids, attention_mask=mask, cache=make_cache(m, kv), **kw)
        want = m.generate(ids[1:, 4:], attention_mask=mask[1:, 4:], cache=make_cache(m, kv), **kw)
    assert torch.equal(got[1, 9:], want[0, 5:])


def test_streaming_positions_config_checks():
    from finetune.caches import KVConfigError, validate_kv_config

    with pytest.raises(KVConfigError, match=r"kv_cache\.positions: 'cache' .* applies to method 'sink'"):
        validate_kv_config({"method": "h2o", "positions": "cache"})
    with pytest.raises(KVConfigError, match=r"kv_cache\.positions"):
        validate_kv_config({"method": "sink", "window": 4, "positions": "rotated"})
    layout = {"longtune_attention": {"version": 1, "layers": [{"pattern": "sink_window", "window": 8}]},
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    with pytest.raises(KVConfigError, match=r"kv_cache\.positions: 'cache' needs layers with full"):
        validate_kv_config({"method": "sink", "window": 4, "positions": "cache"}, layout)

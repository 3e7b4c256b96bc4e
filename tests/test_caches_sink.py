"""Sink + window cache: exact against a full cache with the same mask; memory bound."""

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

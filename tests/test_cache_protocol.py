"""The cache protocol (docs/design.md): transformers hands `cache.update` the *same* kwargs dict
that the attention module then unpacks into the attention function. longtune's caches rely on
it to pass key positions and the H2O observer; if a transformers release changes it, this fails."""

import torch
from transformers import AttentionInterface, DynamicCache

from finetune.caches.base import OBSERVER_KEY, POSITIONS_KEY
from finetune.caches.sink_window import SinkWindowCache

SPY = "longtune_protocol_spy"
SEEN: list[dict] = []


def _spy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    SEEN.append({"layer": module.layer_idx, "keys": set(kwargs), "kwargs": kwargs, "k_len": key.shape[-2]})
    b, h, q, d = query.shape
    return torch.zeros(b, q, h, d, dtype=query.dtype), None


class _MarkingCache(DynamicCache):
    """A cache that writes a sentinel into the kwargs dict it receives."""

    def update(self, key_states, value_states, layer_idx, *args, kwargs=None, **extra):
        assert kwargs is not None, "transformers no longer passes kwargs= to Cache.update"
        kwargs["longtune_protocol_sentinel"] = ("layer", layer_idx)
        return super().update(key_states, value_states, layer_idx)


AttentionInterface.register(SPY, _spy_attention)


def test_update_kwargs_reach_the_attention_function(tiny_llama):
    m = tiny_llama(attn=SPY)
    SEEN.clear()
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        m(input_ids=ids, cache=_MarkingCache(), use_cache=True)
    assert [s["layer"] for s in SEEN] == [0, 1]
    for s in SEEN:
        assert s["kwargs"].get("longtune_protocol_sentinel") == ("layer", s["layer"]), (
            "the kwargs dict given to cache.update is no longer the one passed to the attention "
            "function: longtune caches cannot annotate key positions / the H2O observer"
        )
        assert "position_ids" in s["keys"], "position_ids no longer reach the attention function"


def test_positioned_cache_annotates_positions(tiny_llama):
    m = tiny_llama(attn=SPY)
    SEEN.clear()
    cache = SinkWindowCache(2, window=3, num_sink_tokens=1)
    with torch.no_grad():
        m(input_ids=torch.randint(0, 64, (2, 6)), cache=cache, use_cache=True)
        m(input_ids=torch.randint(0, 64, (2, 1)), cache=cache, use_cache=True)
    last = SEEN[-1]["kwargs"]
    # sink, window of 3 (held in ring order: the mask comes from the positions), new token last
    assert last[POSITIONS_KEY].sort(dim=-1).values.tolist() == [[0, 3, 4, 5, 6]] * 2
    assert last[POSITIONS_KEY][:, -1].tolist() == [6, 6]
    assert SEEN[-1]["k_len"] == 5
    assert OBSERVER_KEY not in last
    assert cache.get_seq_length() == 7  # tokens seen, not kept

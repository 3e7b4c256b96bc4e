"""LongGen hybrid cache: compact generation == full cache + the same sparse masks; bytes == formula."""

from fractions import Fraction

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria

from finetune.caches import make_cache
from finetune.caches.hybrid import BlockSparseLayer, HybridCache
from finetune.caches.sink_window import SinkWindowLayer

SW = {"pattern": "sink_window", "window": 8, "num_sink_tokens": 2}
FULL = {"pattern": "causal"}


@pytest.mark.parametrize(
    "layouts",
    [
        [SW, FULL, SW],
        [
            {"pattern": "block_sparse", "block_size": 4, "local_blocks": 2, "stride": 4, "head_step": 0},
            FULL,
            {"pattern": "sink_window", "window": 5, "num_sink_tokens": 0},
            {"pattern": "block_sparse", "block_size": 3, "local_blocks": 2, "stride": 8, "head_step": None},
        ],
    ],
    ids=["sink_window", "mixed"],
)
def test_hybrid_generate_equals_full_cache_with_masks(layouts, reference_llama, greedy):
    m = reference_llama(layouts)
    ids = torch.randint(0, 97, (2, 40))  # prompt longer than every window
    full = greedy(m, ids, DynamicCache(), 24)
    cache = HybridCache(m.config)
    compact = greedy(m, ids, cache, 24)
    assert torch.equal(full, compact)
    seen = 40 + 24 - 1
    assert cache.get_seq_length() == seen
    kept = cache.kept_tokens()
    for entry, k in zip(layouts, kept):
        if entry["pattern"] == "causal":
            assert k == seen
        else:
            assert k < seen  # the layer really evicted
    # the sparse masks matter: the same model with plain causal attention generates differently
    m.config.longtune_attention = {**m.config.longtune_attention, "layers": [FULL] * len(layouts)}
    with torch.no_grad():
        a = m(ids).logits
        m.config.longtune_attention = {**m.config.longtune_attention, "layers": layouts}
        b = m(ids).logits
    assert not torch.allclose(a, b)


def test_hybrid_bytes_equal_formula(reference_llama):
    L, F, W, s = 6, 2, 8, 2
    sw = {"pattern": "sink_window", "window": W, "num_sink_tokens": s}
    layouts = [sw, sw, FULL, FULL, sw, sw]
    m = reference_llama(layouts, dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 30))
    steps = []

    class Record(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            steps.append((cache.get_seq_length(), cache.nbytes(), cache.kept_tokens()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    cache = HybridCache(m.config)
    with torch.no_grad():
        m.generate(ids, cache=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                   stopping_criteria=[Record()])  # fmt: skip
    kv_heads, head_dim = 2, 32 // 4
    per_token_layer = 2 * kv_heads * head_dim * 4  # K and V, fp32, batch 1
    for T, nbytes, kept in steps:
        assert kept == [min(T, W + s)] * 2 + [T] * 2 + [min(T, W + s)] * 2
        assert nbytes == per_token_layer * (F * T + (L - F) * min(T, W + s))
        full_bytes = per_token_layer * L * T
        assert Fraction(nbytes, full_bytes) == Fraction(F, L) + Fraction(L - F, L) * Fraction(W + s, T)


def test_ring_buffer_matches_brute_force():
    torch.manual_seed(1)
    for s, w in [(2, 5), (0, 3), (4, 1)]:
        layer = SinkWindowLayer(w, s)
        allk = []
        n = 0
        for q in [7, 1, 1, 2, 1, 9, 1, 1, 1, 4, 1]:
            k = torch.randn(2, 2, q, 3)
            pos = torch.arange(n, n + q).expand(2, q)
            before = layer.ordered()[0] if layer.is_initialized else k[..., :0, :]
            ret, _, rpos = layer.update(k, k.clone(), pos)
            # held slots may come in ring order (decode); by position they are `before` + k
            order = rpos[0].argsort()
            assert torch.equal(ret[..., order, :], torch.cat([before, k], dim=-2))
            assert rpos[:, -q:].tolist() == pos.tolist()  # the new tokens last
            allk.append(k)
            n += q
            every = torch.cat(allk, dim=-2)
            keep = (
                list(range(min(s, n))) + list(range(max(min(s, n), n - w), n))
                if n > s + w
                else list(range(n))
            )
            ok, _, op = layer.ordered()
            assert torch.equal(ok, every[..., keep, :])
            assert op[0].tolist() == keep
            assert layer.kept() == len(keep) <= s + w


def test_block_sparse_keeps_what_the_pattern_can_reach():
    from finetune.caches.reference import pattern_mask

    entry = {"pattern": "block_sparse", "block_size": 3, "local_blocks": 2, "stride": 5, "head_step": 1}
    layer = BlockSparseLayer(3, 2, 5, num_heads=2, head_step=1)
    n = 0
    for q in [10, 1, 1, 1, 5, 1, 1, 1, 1, 1, 1, 1, 1, 7, 1]:
        layer.update(torch.randn(1, 1, q, 2), torch.randn(1, 1, q, 2), torch.arange(n, n + q).unsqueeze(0))
        n += q
        # brute force: a key is needed iff some future query (any head) can see it
        qpos = torch.arange(n, n + 40).view(1, -1)
        kpos = torch.arange(n).view(1, -1)
        needed = pattern_mask(entry, qpos, kpos, 2).any(dim=(0, 1, 2)).nonzero().squeeze(-1).tolist()
        assert layer.positions[0].tolist() == needed


def test_hybrid_with_kernels_longtune_function(reference_llama, greedy):
    registry = pytest.importorskip("kernels.registry")
    layout_mod = pytest.importorskip("kernels.layout")
    layouts = [SW, FULL, SW]
    m = reference_llama(layouts)
    layout_mod.install_layout(
        m.config, {"version": 1, "backend": "auto", "cross_document": False, "layers": layouts}
    )
    assert m.config._attn_implementation == "longtune"
    ids = torch.randint(0, 97, (2, 40))
    full = greedy(m, ids, DynamicCache(), 16)
    cache = make_cache(m, {"version": 1, "method": "hybrid"})
    assert isinstance(cache, HybridCache)
    assert torch.equal(full, greedy(m, ids, cache, 16))
    assert registry is not None


def test_hybrid_left_padding_with_kernels(reference_llama):
    """Left-padded batch, prompt longer than the window: pads are marked -1, a padded row's
    sinks are its first real tokens, and the block-sparse layer keeps the union of the rows'
    needs, so the compact cache stays exact."""
    layout_mod = pytest.importorskip("kernels.layout")
    layouts = [
        {"pattern": "sink_window", "window": 8, "num_sink_tokens": 2},
        FULL,
        {"pattern": "block_sparse", "block_size": 4, "local_blocks": 2, "stride": 4, "head_step": 0},
    ]
    m = reference_llama(layouts)
    layout_mod.install_layout(
        m.config, {"version": 1, "backend": "auto", "cross_document": False, "layers": layouts}
    )
    ids = torch.randint(1, 97, (2, 30))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    kw = {
        "attention_mask": mask,
        "max_new_tokens": 12,
        "min_new_tokens": 12,
        "do_sample": False,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        want = m.generate(ids, cache=DynamicCache(), **kw)
        got = m.generate(ids, cache=HybridCache(m.config), **kw)
        alone = m.generate(ids[1:, 7:], cache=HybridCache(m.config), **{**kw, "attention_mask": mask[1:, 7:]})
    assert torch.equal(want, got)
    assert torch.equal(got[1, 30:], alone[0, 23:])


def test_hybrid_beam_search_and_num_return_sequences(reference_llama):
    """reorder_cache (beams) and batch_repeat_interleave (expansion) keep the cache exact."""
    m = reference_llama([SW, FULL, SW])
    ids = torch.randint(0, 97, (2, 30))
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "min_new_tokens": 8, "pad_token_id": 0}
    with torch.no_grad():
        for extra in ({"num_beams": 3, "do_sample": False}, {"num_return_sequences": 2, "do_sample": True}):
            torch.manual_seed(1)
            want = m.generate(ids, cache=DynamicCache(), **kw, **extra)
            torch.manual_seed(1)
            assert torch.equal(m.generate(ids, cache=HybridCache(m.config), **kw, **extra), want)


def test_bad_layer_spec_error_names_the_layer(reference_llama):
    m = reference_llama([SW, {"pattern": "sink_window", "windw": 4}])
    with pytest.raises(ValueError, match=r"config\.longtune_attention\.layers\[1\].*windw"):
        HybridCache(m.config)

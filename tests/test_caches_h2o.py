"""H2O cache: eviction against a direct computation; full budget == full cache; memory bound."""

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria

from finetune.caches.h2o import H2OCache


def causal_probs(b, h, q, k, offset, gen):
    """Random attention rows (b, h, q, k) for queries at offset..offset+q-1 (causal, rows sum to 1)."""
    p = torch.rand(b, h, q, k, generator=gen, dtype=torch.float64) ** 3
    qpos = torch.arange(offset, offset + q).view(q, 1)
    p = p * (torch.arange(k).view(1, k) <= qpos)  # k == offset + q here (nothing evicted yet)
    return p / p.sum(-1, keepdim=True)


def brute_force(steps, b, hkv, groups, sinks, heavy, recent, norm, red):
    """Direct simulation with python dicts: kept positions per (row, kv head) after every step."""
    kept = {(r, g): [] for r in range(b) for g in range(hkv)}
    score = {(r, g): {} for r in range(b) for g in range(hkv)}
    count = {(r, g): {} for r in range(b) for g in range(hkv)}
    history = []
    for new_pos, probs_for in steps:
        for key in kept:
            kept[key] += new_pos
            for p in new_pos:
                score[key][p], count[key][p] = 0.0, 0
        for (r, g), held in kept.items():
            probs = probs_for(held, r)  # (H, q, len(held)) aligned with `held`
            for qi, qpos in enumerate(new_pos):
                for j, p in enumerate(held):
                    heads = [float(probs[g * groups + t, qi, j]) for t in range(groups)]
                    score[(r, g)][p] += sum(heads) if red == "sum" else sum(heads) / groups
                    if p <= qpos:
                        count[(r, g)][p] += 1
        for (r, g), held in kept.items():
            if len(held) <= sinks + heavy + recent:
                continue
            middle = held[sinks : len(held) - recent]
            sc, cn = score[(r, g)], count[(r, g)]
            top = sorted(middle, key=lambda p: (-(sc[p] / cn[p] if norm == "mean" else sc[p]), p))[:heavy]
            kept[(r, g)] = held[:sinks] + sorted(top) + held[len(held) - recent :]
        history.append({k: list(v) for k, v in kept.items()})
    return history


@pytest.mark.parametrize("norm", ["none", "mean"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_h2o_eviction_matches_direct_computation(norm, red):
    b, hq, hkv, d, sinks, heavy, recent = 2, 4, 2, 3, 1, 3, 2
    groups = hq // hkv
    gen = torch.Generator().manual_seed(7)
    cache = H2OCache(1, groups, heavy=heavy, recent=recent, num_sink_tokens=sinks,
                     score_normalization=norm, gqa_reduction=red)  # fmt: skip
    layer = cache.layers[0]
    # prefill 10 tokens, then 8 decode steps; probabilities drawn per step over the *held* keys
    plan = [list(range(10))] + [[10 + i] for i in range(8)]
    drawn = []  # (held positions per (row, head) -> probs) recorded while driving the cache
    key_of = {}  # (row, kv head, position) -> its key: evictions must move keys with their positions
    n = 0
    for new in plan:
        q = len(new)
        k = torch.randn(b, hkv, q, d, generator=gen)
        key_of.update({(r, g, p): k[r, g, i] for r in range(b) for g in range(hkv) for i, p in enumerate(new)})
        keys, _ = cache.update(k, k.clone(), 0, kwargs={"position_ids": torch.tensor([new])})
        held = layer.positions.clone()  # (b, hkv, k_len) before eviction
        klen = keys.shape[-2]
        if n == 0:
            probs = causal_probs(b, hq, q, klen, 0, gen)
        else:
            probs = torch.rand(b, hq, q, klen, generator=gen, dtype=torch.float64)
            probs = probs / probs.sum(-1, keepdim=True)
        cache.observe_attention(0, probs[:, :, :3])  # chunked, like a prefill in query chunks
        if q > 3:
            cache.observe_attention(0, probs[:, :, 3:])
        drawn.append((new, held, probs))
        n += q
        # sinks always kept, budget respected
        assert (layer.positions[..., :sinks] == torch.arange(sinks)).all()
        assert layer.kept() == min(n, sinks + heavy + recent)
        for r in range(b):
            for g in range(hkv):
                for i, p in enumerate(layer.positions[r, g].tolist()):
                    assert torch.equal(layer.keys[r, g, i], key_of[(r, g, p)])
                    assert torch.equal(layer.values[r, g, i], key_of[(r, g, p)])

    # replay the same probabilities in the brute force; column j of probs[r] is the j-th held
    # key of (row r, kv head g), and the held lists are checked to line up below
    def replay(probs):
        return lambda held_list, r: probs[r]

    steps = [(new, replay(probs)) for new, held, probs in drawn]
    history = brute_force(steps, b, hkv, groups, sinks, heavy, recent, norm, red)
    # check alignment: before each step's eviction the cache's held keys == brute force's previous kept + new
    prev = {(r, g): [] for r in range(b) for g in range(hkv)}
    for (new, held, _), after in zip(drawn, history):
        for (r, g), lst in prev.items():
            assert held[r, g].tolist() == lst + new
        prev = after
    final = {(r, g): layer.positions[r, g].tolist() for r in range(b) for g in range(hkv)}
    assert final == history[-1]
    # rows and KV heads really chose differently (the case is not degenerate)
    assert any(final[(0, g)] != final[(1, g)] for g in range(hkv))
    assert any(final[(r, 0)] != final[(r, 1)] for r in range(b))




def test_h2o_full_budget_equals_full_cache(reference_llama, greedy):
    m = reference_llama()
    ids = torch.randint(0, 97, (2, 30))
    full = greedy(m, ids, DynamicCache(), 20)
    cache = H2OCache(2, 2, heavy=60, recent=60, num_sink_tokens=4, prefill_chunk=7)
    assert torch.equal(full, greedy(m, ids, cache, 20))
    assert cache.kept_tokens() == [49, 49]


@pytest.mark.parametrize("norm", ["none", "mean"])
def test_h2o_memory_stays_within_budget(norm, reference_llama, greedy):
    m = reference_llama()
    ids = torch.randint(0, 97, (2, 20))
    cache = H2OCache(2, 2, heavy_ratio=0.25, recent_ratio=0.2, num_sink_tokens=2, score_normalization=norm,
                     layers=[1], prefill_chunk=8)  # fmt: skip
    per_token = 2 * 2 * 2 * 8 * 8  # K+V, batch 2, 2 kv heads, head_dim 8, float64
    sizes = []

    class Record(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            sizes.append((cache.get_seq_length(), cache.kept_tokens(), cache.nbytes()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    greedy(m, ids, cache, 40, [Record()])
    budget = 2 + 5 + 4  # sinks + int(0.25*20) + int(0.2*20)
    assert cache.layers[1].budget == budget
    for seen, kept, nbytes in sizes:
        assert kept == [seen, min(seen, budget)]  # layer 0 not chosen: keeps everything
        assert nbytes == per_token * (seen + min(seen, budget))
    assert sizes[-1][0] == 59


def test_h2o_needs_the_observing_attention_function(reference_llama, greedy):
    m = reference_llama()
    m.config._attn_implementation = "sdpa"
    cache = H2OCache(2, 2, heavy=2, recent=2)
    ids = torch.randint(0, 97, (1, 10))
    with pytest.raises(RuntimeError, match="observe_attention"):
        greedy(m, ids, cache, 3)


def test_h2o_left_padding_row_equals_row_alone(reference_llama):
    """A left-padded row keeps and scores exactly what it would alone: pads (position -1) are
    evicted first, add no score as queries, and its sinks are its first real tokens."""
    pytest.importorskip("kernels.layout")
    from finetune.caches import make_cache

    m = reference_llama()
    ids = torch.randint(1, 97, (2, 30))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    kv = {"method": "h2o", "heavy": 4, "recent": 4, "num_sink_tokens": 0, "score_normalization": "mean"}
    kw = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        batch = make_cache(m, kv)
        got = m.generate(ids, cache=batch, attention_mask=mask, **kw)
        alone = make_cache(m, kv)
        want = m.generate(ids[1:, 7:], cache=alone, attention_mask=mask[1:, 7:], **kw)
    assert torch.equal(got[1, 30:], want[0, 23:])
    for lb, la in zip(batch.layers, alone.layers):
        assert torch.equal(lb.positions[1], la.positions[0])
        torch.testing.assert_close(lb.scores[1], la.scores[0])


@pytest.mark.parametrize("norm", ["none", "mean"])
def test_h2o_fused_prefill_keeps_what_the_reference_keeps(norm, monkeypatch, reference_llama, greedy):
    """make_cache's H2O (scores from the fused attention pass) keeps the same keys, with the
    same scores, and generates the same tokens as H2O on the plain reference attention
    (explicit probabilities), prefill and decode."""
    from finetune.caches import h2o_attention, make_cache
    from kernels.backends import column_sums

    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 64)  # several row blocks per prefill
    monkeypatch.setattr(column_sums, "MIN_ROWS", 16)
    ids = torch.randint(0, 97, (2, 40))
    kv = {"method": "h2o", "heavy": 5, "recent": 4, "num_sink_tokens": 2, "score_normalization": norm}
    ref_model = reference_llama()
    ref = H2OCache(2, 2, heavy=5, recent=4, num_sink_tokens=2, score_normalization=norm)
    want = greedy(ref_model, ids, ref, 12)
    model = reference_llama()
    fused = make_cache(model, kv)
    assert model.config._attn_implementation == h2o_attention.NAME
    calls = []
    observe = fused.observe_attention_sums
    fused.observe_attention_sums = lambda *a: (calls.append(a[0]), observe(*a))
    assert torch.equal(greedy(model, ids, fused, 12), want)
    assert calls == [0, 1]  # one fused report per layer: the prefill
    for a, b in zip(fused.layers, ref.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-7)


def test_h2o_fused_prefill_of_left_padded_rows_keeps_what_the_reference_keeps(monkeypatch, reference_llama):
    """Left-padded rows take the one-pass prefill too (generate's padding): same tokens, kept
    keys and scores as H2O on the plain reference attention with the same padded batch."""
    from finetune.caches import make_cache
    from kernels.backends import column_sums

    monkeypatch.setattr(column_sums, "MIN_ROWS", 8)
    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 64)
    ids = torch.randint(1, 97, (3, 36))
    mask = torch.ones_like(ids)
    ids[1, :11], mask[1, :11] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    kv = {"method": "h2o", "heavy": 5, "recent": 4, "num_sink_tokens": 2}
    with torch.no_grad():
        ref = H2OCache(2, 2, heavy=5, recent=4, num_sink_tokens=2)
        want = reference_llama().generate(ids, cache=ref, attention_mask=mask, **kw)
        model = reference_llama()
        fused = make_cache(model, kv)
        sums = []
        observe = fused.observe_attention_sums
        fused.observe_attention_sums = lambda *a: (sums.append(a[0]), observe(*a))
        got = model.generate(ids, cache=fused, attention_mask=mask, **kw)
    assert sums == [0, 1]  # the padded prefill went through the one-pass kernel
    assert torch.equal(got, want)
    for a, b in zip(fused.layers, ref.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("attn", ["fused", "reference"])
def test_h2o_ratio_budgets_per_row_from_its_real_prompt(attn, reference_llama):
    """Ratio budgets come from each row's real prompt length, not the padded width: a
    left-padded row generates the same tokens and keeps the same keys (same scores) as the
    same prompt alone; its extra slots are empty (position -1)."""
    from finetune.caches import make_cache

    m = reference_llama()
    ids = torch.randint(1, 97, (2, 40))
    mask = torch.ones_like(ids)
    ids[1, :15], mask[1, :15] = 0, 0
    kv = {"method": "h2o", "heavy_ratio": 0.2, "recent_ratio": 0.15, "num_sink_tokens": 1}
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}

    def cache():
        if attn == "fused":
            return make_cache(m, kv)
        return H2OCache(2, 2, heavy_ratio=0.2, recent_ratio=0.15, num_sink_tokens=1)

    with torch.no_grad():
        batch = cache()
        got = m.generate(ids, cache=batch, attention_mask=mask, **kw)
        alone = cache()
        want = m.generate(ids[1:, 15:], cache=alone, attention_mask=mask[1:, 15:], **kw)
    assert torch.equal(got[1, 40:], want[0, 25:])
    for lb, la in zip(batch.layers, alone.layers):
        assert la.budget == 1 + 5 + 3 and lb.budget == 1 + 8 + 6  # int(0.2 * 25), int(0.15 * 25); row 0: 40
        real = lb.positions[1] >= 0
        assert (real.sum(-1) == la.budget).all()
        assert torch.equal(lb.positions[1][real].view(2, -1), la.positions[0])
        torch.testing.assert_close(lb.scores[1][real].view(2, -1), la.scores[0])

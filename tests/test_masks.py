"""Mask predicates: the hand-checkable cases of docs/algorithms.md, causality, composition."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kernels.layout import attended_fraction
from kernels.masks import build_context, dense_mask, mask_mod, resolve_spec

SF = {"pattern": "sf_attn", "group_ratio": 0.25, "shift_fraction": 0.5, "wrap": "none", "num_sink_tokens": 4}


def visible(spec, n=16, heads=4, ctx=None):
    ctx = ctx or build_context(1, n, n, "cpu")
    m = dense_mask(resolve_spec(spec), ctx, heads).expand(-1, heads, -1, -1)
    return lambda h, i, b=0: m[b, h, i].nonzero().flatten().tolist()


# ---------------------------------------------------------------- docs/algorithms.md section 3, exactly
@pytest.mark.parametrize(
    "head,query,keys",
    [
        (3, 1, [0, 1]),                       # shifted head
        (3, 5, [0, 1, 2, 3, 4, 5]),           # shifted: group {2..5} plus sinks
        (0, 5, [0, 1, 2, 3, 4, 5]),           # unshifted: group {4,5} plus sinks
        (0, 9, [0, 1, 2, 3, 8, 9]),
        (3, 13, [0, 1, 2, 3, 10, 11, 12, 13]),
    ],
)
def test_sf_attn_hand_cases(head, query, keys):
    assert visible(SF)(head, query) == keys


def test_s2_attn_table():
    """docs/algorithms.md section 2: h < H/2 in fixed groups, h >= H/2 in groups offset by S; no sinks."""
    see = visible({"pattern": "s2_attn", "group_ratio": 0.25})
    for i in range(16):
        assert see(0, i) == [j for j in range(i + 1) if i // 4 == j // 4]
        assert see(2, i) == [j for j in range(i + 1) if (i + 2) // 4 == (j + 2) // 4]


def test_sink_window_and_block_sparse_definitions():
    see = visible({"pattern": "sink_window", "window": 3, "num_sink_tokens": 2})
    assert see(0, 9) == [0, 1, 7, 8, 9]
    assert see(0, 2) == [0, 1, 2]
    spec = {"pattern": "block_sparse", "block_size": 2, "local_blocks": 1, "stride": 4, "head_step": None}
    see = visible(spec, heads=4)  # head_step = max(1, 4 // 4) = 1
    for h in range(4):
        for i in range(16):
            want = [j for j in range(i + 1) if i // 2 - j // 2 < 1 or (j // 2 + 1 + h) % 4 == 0]
            assert see(h, i) == want


def test_head_step_zero_is_same_in_every_head():
    spec = resolve_spec({"pattern": "block_sparse", "block_size": 2, "local_blocks": 1, "stride": 3, "head_step": 0})
    m = dense_mask(spec, build_context(1, 12, 12, "cpu"), 4)
    assert m.shape[1] == 1


def test_n_le_g_is_plain_causal():
    for spec in ({**SF, "group_ratio": 1.0}, {"pattern": "s2_attn", "group_ratio": 1.0}):
        m = dense_mask(resolve_spec(spec), build_context(1, 10, 10, "cpu"), 4)
        assert torch.equal(m[0, 0], torch.ones(10, 10, dtype=torch.bool).tril())
        assert torch.equal(m[0, -1], torch.ones(10, 10, dtype=torch.bool).tril())


def test_group_size_from_each_samples_own_length():
    """Row 1 has 8 real tokens of 16: G = 2 there, G = 4 in row 0 (LongLoRA #148/#199)."""
    am = torch.ones(2, 16, dtype=torch.bool)
    am[1, 8:] = False
    ctx = build_context(2, 16, 16, "cpu", attention_mask=am)
    see = visible({"pattern": "s2_attn", "group_ratio": 0.25}, ctx=ctx)
    assert see(0, 5, b=0) == [4, 5]
    assert see(0, 5, b=1) == [4, 5] and see(0, 3, b=1) == [2, 3]
    assert see(0, 5, b=1) == [4, 5] and see(0, 7, b=1) == [6, 7]
    assert see(0, 12, b=1) == []  # padded query sees nothing


def test_left_padding_counts_from_first_real_token():
    am = torch.ones(1, 12, dtype=torch.bool)
    am[0, :4] = False
    ctx = build_context(1, 12, 12, "cpu", attention_mask=am)
    see = visible({"pattern": "sink_window", "window": 2, "num_sink_tokens": 1}, n=12, ctx=ctx)
    assert see(0, 11) == [4, 10, 11]  # sink = first real token (row 4)


def _packed(lengths):
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


@pytest.mark.parametrize("spec", [SF, {"pattern": "sink_window", "window": 4, "num_sink_tokens": 2},
                                  {"pattern": "block_sparse", "block_size": 2, "local_blocks": 1, "stride": 2},
                                  {"pattern": "causal"}])
def test_packed_documents_never_cross(spec):
    pos = _packed([5, 7, 4])
    ctx = build_context(1, 16, 16, "cpu", position_ids=pos)
    m = dense_mask(resolve_spec(spec), ctx, 4).expand(1, 4, 16, 16)
    doc = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    cross = doc[:, None] != doc[None, :]
    assert not m[:, :, cross].any()
    # sinks and blocks restart per document: doc 1's first tokens are its sinks
    if spec["pattern"] == "sink_window":
        assert m[0, 0, 11, 5] and m[0, 0, 11, 6] and not m[0, 0, 11, 7]


def test_cu_seqlens_equals_position_id_resets():
    spec = resolve_spec(SF)
    a = dense_mask(spec, build_context(1, 16, 16, "cpu", position_ids=_packed([5, 7, 4])), 4)
    b = dense_mask(spec, build_context(1, 16, 16, "cpu", cu_seqlens=torch.tensor([0, 5, 12, 16])), 4)
    assert torch.equal(a, b)


def test_cross_document_ignores_resets():
    spec = resolve_spec({"pattern": "causal"})
    m = dense_mask(spec, build_context(1, 8, 8, "cpu", position_ids=_packed([4, 4]), cross_document=True), 1)
    assert torch.equal(m[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())


# ---------------------------------------------------------------- causality property
def _random_specs(rng, count):
    for _ in range(count):
        kind = rng.choice(["s2_attn", "sf_attn", "sink_window", "block_sparse", "causal"])
        if kind in ("s2_attn", "sf_attn"):
            yield {"pattern": kind, "group_ratio": rng.choice([0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0]),
                   "shift_fraction": rng.choice([0, 0.25, 0.5, 1]),
                   "num_sink_tokens": 0 if kind == "s2_attn" else rng.randint(0, 5)}
        elif kind == "sink_window":
            yield {"pattern": kind, "window": rng.randint(1, 9), "num_sink_tokens": rng.randint(0, 4)}
        elif kind == "block_sparse":
            yield {"pattern": kind, "block_size": rng.randint(1, 5), "local_blocks": rng.randint(1, 3),
                   "stride": rng.randint(1, 5), "head_step": rng.choice([None, 0, 1, 2])}
        else:
            yield {"pattern": kind}


def test_default_mode_never_sees_the_future():
    rng = random.Random(0)
    for spec in _random_specs(rng, 150):
        n, B, H = rng.randint(1, 29), rng.randint(1, 3), rng.choice([1, 2, 4, 8])
        am = torch.ones(B, n, dtype=torch.bool)
        for b in range(B):
            cut = rng.randint(0, n - 1)
            if rng.random() < 0.5:
                am[b, n - cut:] = False
            else:
                am[b, :cut] = False
        ctx = build_context(B, n, n, "cpu", attention_mask=am)
        m = dense_mask(resolve_spec(spec), ctx, H)
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        assert not m[..., future].any(), spec
        assert not (m & ~am[:, None, None, :]).any(), spec  # padded keys never visible
        # every real query sees itself
        diag = m.diagonal(dim1=-2, dim2=-1)
        assert diag[am[:, None, :].expand_as(diag)].all(), spec


def test_roll_reproduction_mode_leaks():
    """wrap: roll = LongLoRA's non-flash code: queries 0..S-1 see keys N-S..N-1 (issues #15/#90)."""
    spec = resolve_spec({"pattern": "s2_attn", "group_ratio": 0.25, "wrap": "roll"})
    m = dense_mask(spec, build_context(1, 16, 16, "cpu"), 4)
    assert m[0, 3, 0].nonzero().flatten().tolist() == [0, 14, 15]  # shifted head, query 0
    assert m[0, 3].triu(1).any()
    assert not m[0, 0].triu(1).any()  # unshifted heads unaffected


def test_roll_mode_keeps_the_sinks():
    """SF-Attn with wrap: roll = rolled groups (with their leak) OR causal sinks."""
    see = visible({**SF, "wrap": "roll"})
    assert see(0, 9) == [0, 1, 2, 3, 8, 9]  # unshifted: group {8, 9} plus sinks
    assert see(3, 0) == [0, 14, 15]  # shifted query 0: the leak, and itself as a sink
    assert see(3, 5) == [0, 1, 2, 3, 4, 5]


def test_predicate_works_with_scalar_indices():
    """FlexAttention calls the predicate with 0-d tensors."""
    spec = resolve_spec(SF)
    ctx = build_context(1, 16, 16, "cpu")
    f = mask_mod(spec, ctx, 4)
    t = lambda x: torch.tensor(x)
    assert bool(f(t(0), t(3), t(13), t(10))) and not bool(f(t(0), t(3), t(13), t(9)))


def test_kv_positions_from_compact_cache():
    """Keys of a ring buffer: sinks 0,1 and positions 7..9 (-1 = empty slot); query at 10."""
    spec = resolve_spec({"pattern": "sink_window", "window": 3, "num_sink_tokens": 2})
    kv = torch.tensor([[0, 1, 8, 9, 10, -1]])
    ctx = build_context(1, 1, 6, "cpu", position_ids=torch.tensor([[10]]), kv_positions=kv)
    m = dense_mask(spec, ctx, 1)
    assert m[0, 0, 0].tolist() == [True, True, True, True, True, False]


@pytest.mark.parametrize("spec,n", list(itertools.product(
    [SF, {"pattern": "s2_attn", "shift_fraction": 0.25, "group_ratio": 1 / 3},
     {"pattern": "sink_window", "window": 5, "num_sink_tokens": 3},
     {"pattern": "block_sparse", "block_size": 3, "local_blocks": 2, "stride": 3}], [7, 16, 37])))
def test_attended_fraction_counts_the_mask(spec, n):
    H = 8
    m = dense_mask(resolve_spec(spec), build_context(1, n, n, "cpu"), H).expand(1, H, n, n)
    assert attended_fraction(spec, n, H) == pytest.approx(m.sum().item() / H / (n * (n + 1) / 2), abs=1e-12)


def test_spec_errors_name_the_key():
    with pytest.raises(ValueError, match=r"layers\[2\]\.pattern"):
        resolve_spec({"pattern": "nope"}, "layers[2]")
    with pytest.raises(ValueError, match="window"):
        resolve_spec({"pattern": "sf_attn", "window": 3})
    with pytest.raises(ValueError, match="wrap"):
        resolve_spec({"pattern": "sf_attn", "wrap": "cyclic"})
    with pytest.raises(ValueError, match="num_sink_tokens"):
        resolve_spec({"pattern": "s2_attn", "num_sink_tokens": 4})


def test_left_padding_with_plain_arange_position_ids():
    """HF training passes arange position_ids even for left-padded rows: same mask as padding-aware ids."""
    am = torch.ones(2, 12, dtype=torch.bool)
    am[1, :5] = False
    aware = (torch.cumsum(am.long(), 1) - 1).clamp(min=0)
    for spec in (SF, {"pattern": "sink_window", "window": 3, "num_sink_tokens": 2},
                 {"pattern": "block_sparse", "block_size": 2, "local_blocks": 1, "stride": 3}):
        spec = resolve_spec(spec)
        plain = dense_mask(spec, build_context(2, 12, 12, "cpu", attention_mask=am,
                                               position_ids=torch.arange(12).unsqueeze(0)), 4)
        want = dense_mask(spec, build_context(2, 12, 12, "cpu", attention_mask=am, position_ids=aware), 4)
        assert torch.equal(plain, want)


# ---------------------------------------------------------------- what a cache must keep
def test_still_visible_is_what_any_future_query_sees():
    """Brute force over the next 40 queries and every head: a key invisible to the next query is
    invisible to all later ones (what lets the caches evict), for every inference pattern."""
    from kernels.masks import still_visible

    rng = random.Random(1)
    for spec in _random_specs(rng, 120):
        n, H = rng.randint(1, 30), rng.choice([1, 2, 4, 8])
        keys = torch.arange(n).unsqueeze(0).clone()
        keys[0, : rng.randint(0, min(2, n - 1))] = -1  # empty slots / left padding
        future = torch.arange(n, n + 40).unsqueeze(0)
        ctx = build_context(1, 40, n, "cpu", position_ids=future, kv_positions=keys)
        spec_inf = {"pattern": "causal"} if spec["pattern"] in ("s2_attn", "sf_attn") else spec
        any_future = dense_mask(resolve_spec(spec_inf), ctx, H).any(dim=(1, 2))
        assert torch.equal(still_visible(spec, keys, H), any_future), spec


def test_block_sparse_strided_columns_kept_for_every_head():
    from kernels.masks import still_visible

    spec = {"pattern": "block_sparse", "block_size": 2, "local_blocks": 1, "stride": 4, "head_step": 1}
    keys = torch.arange(16).unsqueeze(0)
    # query 16 (block 8): local block 8 only; strided kb with (kb + 1 + h) % 4 == 0 for h in 0..1
    want = [j for j in range(16) if any((j // 2 + 1 + h) % 4 == 0 for h in range(2))]
    assert still_visible(spec, keys, 2)[0].nonzero().flatten().tolist() == want
    assert still_visible(spec, keys, 4)[0].all()  # four heads cover every residue mod 4


def test_head_index_is_an_input_global_offsets_work():
    """A caller holding heads 2..3 of 4 passes h + 2 and the global head count: same rows as the
    full mask's heads 2..3 (what sequence parallelism needs for head-dependent patterns)."""
    for spec in (SF, {"pattern": "block_sparse", "block_size": 2, "local_blocks": 1, "stride": 4}):
        ctx = build_context(1, 16, 16, "cpu")
        full = dense_mask(resolve_spec(spec), ctx, 4)
        f = mask_mod(spec, ctx, 4)
        h = torch.arange(2).view(1, 2, 1, 1) + 2
        part = f(torch.zeros(1, 1, 1, 1, dtype=torch.long), h, torch.arange(16).view(1, 1, 16, 1),
                 torch.arange(16).view(1, 1, 1, 16))
        assert torch.equal(part, full[:, 2:4])


def test_and_or_masks_compose_predicates():
    from kernels.masks import and_masks, causal, or_masks, sinks, window

    ctx = build_context(1, 10, 10, "cpu")
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q, k = torch.arange(10).view(1, 1, 10, 1), torch.arange(10).view(1, 1, 1, 10)
    m = and_masks(causal(ctx), or_masks(sinks(ctx, 2), window(ctx, 3)))(b, h, q, k)[0, 0]
    want = torch.tensor([[j <= i and (j < 2 or i - j < 3) for j in range(10)] for i in range(10)])
    assert torch.equal(m, want)

"""The "longtune" attention implementation inside a real (tiny) Llama, and the layout helpers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig

from finetune.recipe import validate
from kernels.layout import (
    attended_fraction,
    build_layout,
    full_layer_indices,
    inference_layout,
    install_layout,
    is_hybrid,
    validate_layout,
)
from kernels.registry import kernel_calls, longtune_attention_forward, register, reset_kernel_calls

H, HKV = 4, 2


# ---------------------------------------------------------------- hand-built reference
def hand_mask(spec, n_real, L, heads):
    """Loops over the tables of docs/algorithms.md sections 2-4; right padding: sample b has
    n_real[b] tokens."""
    m = torch.zeros(len(n_real), heads, L, L, dtype=torch.bool)
    for b, n in enumerate(n_real):
        for h in range(heads):
            for i in range(n):
                for j in range(i + 1):
                    p = spec["pattern"]
                    if p == "causal":
                        ok = True
                    elif p == "sf_attn":
                        G = max(1, int(n * spec["group_ratio"]))
                        S = G // 2
                        shifted = h >= heads - round(heads * spec["shift_fraction"])
                        off = S if shifted else 0
                        ok = G >= n or (i + off) // G == (j + off) // G or j < spec["num_sink_tokens"]
                    elif p == "sink_window":
                        ok = j < spec["num_sink_tokens"] or i - j < spec["window"]
                    elif p == "block_sparse":
                        B, step = spec["block_size"], max(1, spec["stride"] // heads)
                        ok = i // B - j // B < spec["local_blocks"] or (j // B + 1 + h * step) % spec["stride"] == 0
                    m[b, h, i, j] = ok
    return m


REF_MASKS: dict[int, torch.Tensor] = {}


def reference_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    mask = REF_MASKS[module.layer_idx]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return (p @ v).to(q.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("lt_test_ref", reference_attention)


def _compare(tiny_llama, layout, train, n_real, L=24, layers=3):
    model = tiny_llama(layers)
    ref = copy.deepcopy(model)
    install_layout(model.config, layout)
    ref.config._attn_implementation = "lt_test_ref"
    model.train(train)
    ref.train(train)
    ids = torch.randint(0, 61, (len(n_real), L), generator=torch.Generator().manual_seed(3))
    am = torch.zeros(len(n_real), L, dtype=torch.long)
    for b, n in enumerate(n_real):
        am[b, :n] = 1
    run_layout = layout if train else inference_layout(layout)
    for i, spec in enumerate(run_layout["layers"]):
        REF_MASKS[i] = hand_mask(spec, n_real, L, H)
    reset_kernel_calls()
    got = model(ids, attention_mask=am).logits
    want = ref(ids, attention_mask=am).logits
    for b, n in enumerate(n_real):
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-4, atol=1e-5)
    return kernel_calls()


SF = {"pattern": "sf_attn", "group_ratio": 0.25, "shift_fraction": 0.5, "wrap": "none", "num_sink_tokens": 4}
HYBRID = {"version": 1, "backend": "auto", "cross_document": False, "layers": [
    {"pattern": "sink_window", "window": 6, "num_sink_tokens": 2},
    {"pattern": "causal"},
    {"pattern": "block_sparse", "block_size": 4, "local_blocks": 2, "stride": 4, "head_step": None},
]}


def test_sf_attn_training_equals_hand_built_reference(tiny_llama):
    layout = {"version": 1, "backend": "auto", "cross_document": False, "layers": [copy.deepcopy(SF)] * 3}
    calls = _compare(tiny_llama, layout, train=True, n_real=[24, 17])
    assert calls == {("sf_attn", "sdpa_groups"): 3}


def test_training_only_pattern_is_causal_in_eval(tiny_llama):
    layout = {"version": 1, "backend": "auto", "cross_document": False, "layers": [copy.deepcopy(SF)] * 3}
    calls = _compare(tiny_llama, layout, train=False, n_real=[24, 17])
    assert calls == {("causal", "sdpa"): 3}


@pytest.mark.parametrize("train", [True, False])
def test_hybrid_equals_hand_built_reference(train, tiny_llama):
    calls = _compare(tiny_llama, HYBRID, train=train, n_real=[24, 19])
    assert calls == {("sink_window", "sdpa_groups"): 1, ("causal", "sdpa"): 1, ("block_sparse", "sdpa"): 1}


def test_requested_backend_runs_and_is_counted(tiny_llama):
    layout = {"version": 1, "backend": "dense", "cross_document": False, "layers": [copy.deepcopy(SF)] * 3}
    assert _compare(tiny_llama, layout, train=True, n_real=[24]) == {("sf_attn", "dense"): 3}


@pytest.mark.parametrize("layout", [HYBRID, {"version": 1, "layers": [copy.deepcopy(SF)] * 3}])
def test_decode_steps_match_full_forward(layout, tiny_llama):
    """Prefill + q_len=1 steps through a DynamicCache give the full forward's logits (eval)."""
    model = tiny_llama(3)
    install_layout(model.config, layout)
    model.eval()
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :9], cache=cache, use_cache=True).logits
        torch.testing.assert_close(out, full[:, :9], rtol=1e-4, atol=1e-5)
        for i in range(9, 20):
            step = model(ids[:, i : i + 1], cache=cache, use_cache=True).logits
            torch.testing.assert_close(step[:, -1], full[:, i], rtol=1e-4, atol=1e-5)


def test_packed_position_ids_reach_the_kernel(tiny_llama):
    """Two packed documents through the model == each document alone (hybrid layout, eval)."""
    model = tiny_llama(3)
    install_layout(model.config, HYBRID)
    model.eval()
    a, b = torch.randint(0, 61, (1, 11)), torch.randint(0, 61, (1, 9))
    pos = torch.cat([torch.arange(11), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=pos).logits
        torch.testing.assert_close(packed[:, :11], model(a).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed[:, 11:], model(b).logits, rtol=1e-4, atol=1e-5)


class _FakeModule(torch.nn.Module):
    def __init__(self, layout, idx=0):
        super().__init__()
        self.config = type("C", (), {"longtune_attention": layout})()
        self.layer_idx = idx


def test_compact_keys_with_kv_positions():
    """A ring-buffer cache returns only sinks + window with their absolute positions."""
    spec = {"pattern": "sink_window", "window": 4, "num_sink_tokens": 2}
    mod = _FakeModule({"layers": [spec]}).eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, 8, generator=g)
    k, v = torch.randn(1, HKV, 12, 8, generator=g), torch.randn(1, HKV, 12, 8, generator=g)
    full, _ = longtune_attention_forward(mod, q, k, v, None, scaling=0.3, position_ids=torch.tensor([[11]]))
    keep = torch.tensor([0, 1, 8, 9, 10, 11])
    compact, _ = longtune_attention_forward(mod, q, k[:, :, keep], v[:, :, keep], None, scaling=0.3,
                                            position_ids=torch.tensor([[11]]),
                                            longtune_kv_positions=keep.unsqueeze(0))
    torch.testing.assert_close(compact, full)


def test_register_is_idempotent_and_patches_nothing():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = dict(ALL_ATTENTION_FUNCTIONS.items())
    register()
    register()
    after = dict(ALL_ATTENTION_FUNCTIONS.items())
    assert after["longtune"] is longtune_attention_forward
    assert {k: v for k, v in after.items() if k != "longtune"} == {k: v for k, v in before.items() if k != "longtune"}
    assert "longtune" in ALL_MASK_ATTENTION_FUNCTIONS
    assert after["sdpa"].__module__ == "transformers.integrations.sdpa_attention"


def test_missing_layout_error_names_the_key():
    mod = _FakeModule(None)
    q = torch.randn(1, H, 3, 8)
    with pytest.raises(KeyError, match="longtune_attention"):
        longtune_attention_forward(mod, q, q[:, :HKV], q[:, :HKV], None)


# ---------------------------------------------------------------- layout helpers
def _recipe(**sections):
    return validate({"model": {"config": {"num_hidden_layers": 32}}, **sections})


def test_default_hybrid_is_middle_third():
    layout = build_layout(_recipe(attention={"pattern": "sf_attn"}, hybrid={}), 32)
    full = [i for i, s in enumerate(layout["layers"]) if s["pattern"] != "sink_window"]
    assert full == list(range(10, 22))
    assert layout["layers"][10]["pattern"] == "sf_attn" and layout["layers"][0]["window"] == 2048
    assert is_hybrid(layout)
    inf = inference_layout(layout)
    assert inf["layers"][10] == {"pattern": "causal"} and inf["layers"][0]["pattern"] == "sink_window"
    assert not is_hybrid(inference_layout(build_layout(_recipe(attention={"pattern": "sf_attn"}), 32)))


def test_s2_attn_has_no_sinks_and_backend_carries():
    layout = build_layout(_recipe(attention={"pattern": "s2_attn", "backend": "sdpa_groups"}), 4)
    assert layout["backend"] == "sdpa_groups"
    assert all(s["num_sink_tokens"] == 0 for s in layout["layers"])


def test_placements_and_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_layout(_recipe(hybrid={"full_layers": {"placement": "top"}}), 32)
    with pytest.warns(UserWarning, match="LongGen"):
        build_layout(_recipe(hybrid={"full_layers": {"placement": "interleave"}}), 32)
    with pytest.warns(UserWarning, match="LongGen"):
        build_layout(_recipe(hybrid={"full_layers": [3, 4]}), 32)
    from finetune.recipe import FullLayersPlacement

    assert full_layer_indices(FullLayersPlacement(placement="bottom", fraction=0.25), 8) == [0, 1]
    assert full_layer_indices(FullLayersPlacement(placement="top", fraction=0.25), 8) == [6, 7]
    assert full_layer_indices(FullLayersPlacement(placement="interleave", fraction=0.25), 8) == [2, 6]
    with pytest.raises(ValueError, match="hybrid.full_layers"):
        build_layout(_recipe(hybrid={"full_layers": [1, 40]}), 32)


def test_block_sparse_hybrid_and_validation_errors():
    layout = build_layout(_recipe(hybrid={"sparse": {"pattern": "block_sparse"}, "cross_document": True}), 6)
    assert layout["layers"][0]["pattern"] == "block_sparse" and layout["layers"][0]["cross_document"] is True
    with pytest.raises(ValueError, match="one spec per decoder layer"):
        validate_layout(layout, 7)
    bad = copy.deepcopy(layout)
    bad["layers"][2]["window"] = 4
    with pytest.raises(ValueError, match=r"layers\[2\]"):
        validate_layout(bad, 6)
    with pytest.raises(ValueError, match="backend"):
        validate_layout({**layout, "backend": "triton"}, 6)


def test_install_layout_and_config_roundtrip(tmp_path, tiny_llama):
    model = tiny_llama(3)
    install_layout(model.config, HYBRID)
    assert model.config._attn_implementation == "longtune"
    model.config.save_pretrained(tmp_path)
    loaded = LlamaConfig.from_pretrained(tmp_path)
    assert loaded.longtune_attention == HYBRID


def test_attended_fraction_reads_like_the_papers():
    assert attended_fraction({"pattern": "s2_attn", "group_ratio": 0.25}, 8192) == pytest.approx(0.25, abs=0.02)
    assert attended_fraction({"pattern": "sink_window", "window": 2048}, 16384) == pytest.approx(0.234, abs=0.01)
    assert attended_fraction({"pattern": "causal"}, 100) == 1.0


class _Observer:
    prefill_chunk = 3

    def __init__(self):
        self.seen = []

    def observe_attention(self, layer_idx, probs):
        self.seen.append((layer_idx, probs))


def test_observer_gets_probabilities_in_query_chunks():
    spec = {"pattern": "sink_window", "window": 3, "num_sink_tokens": 1}
    mod = _FakeModule({"layers": [spec, spec]}, idx=1).eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, H, 7, 8, generator=g)
    k, v = torch.randn(2, HKV, 7, 8, generator=g), torch.randn(2, HKV, 7, 8, generator=g)
    reset_kernel_calls()
    plain, _ = longtune_attention_forward(mod, q, k, v, None, scaling=0.3)
    obs = _Observer()
    seen, _ = longtune_attention_forward(mod, q, k, v, None, scaling=0.3, longtune_attention_observer=obs)
    torch.testing.assert_close(seen, plain)
    assert [(i, tuple(p.shape)) for i, p in obs.seen] == [(1, (2, H, 3, 7)), (1, (2, H, 3, 7)), (1, (2, H, 1, 7))]
    probs = torch.cat([p for _, p in obs.seen], dim=2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, H, 7))
    assert probs[0, 0, 6].nonzero().flatten().tolist() == [0, 4, 5, 6]
    assert kernel_calls() == {("sink_window", "sdpa_groups"): 1, ("sink_window", "dense"): 1}


def test_per_kv_head_positions():
    """H2O keeps different keys per KV head: (B, Hkv, k_len) positions, -1 = empty slot."""
    spec = {"pattern": "sink_window", "window": 3, "num_sink_tokens": 1}
    mod = _FakeModule({"layers": [spec]}).eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, 8, generator=g)
    k, v = torch.randn(1, HKV, 4, 8, generator=g), torch.randn(1, HKV, 4, 8, generator=g)
    head_pos = torch.tensor([[[0, 8, 9, 10], [0, 3, 9, 10]]])  # head 1's slot 1 is outside the window
    out, _ = longtune_attention_forward(mod, q, k, v, None, scaling=0.3, position_ids=torch.tensor([[10]]),
                                        longtune_kv_positions=head_pos.amax(1), longtune_kv_head_positions=head_pos)
    for gi in range(HKV):
        pos = head_pos[:, gi]
        want, _ = longtune_attention_forward(mod, q[:, gi * 2:(gi + 1) * 2], k[:, gi:gi + 1], v[:, gi:gi + 1], None,
                                             scaling=0.3, position_ids=torch.tensor([[10]]),
                                             longtune_kv_positions=pos)
        torch.testing.assert_close(out[:, :, gi * 2:(gi + 1) * 2], want)


def test_left_padded_batch_generation_matches_single_rows(tiny_llama):
    """generate() with a left-padded batch: each row decodes as it would alone (hybrid, eval)."""
    model = tiny_llama(3)
    install_layout(model.config, HYBRID)
    model.eval()
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 61, (1, 12), generator=g), torch.randint(0, 61, (1, 8), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :4] = 0
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        both = model.generate(ids, attention_mask=am, **kw)
        alone_a = model.generate(a, **kw)
        alone_b = model.generate(b, **kw)
    assert torch.equal(both[0, 12:], alone_a[0, 12:])
    assert torch.equal(both[1, 12:], alone_b[0, 8:])


def test_requested_backend_falls_back_when_it_cannot_serve_the_call(monkeypatch, tiny_llama):
    """flex has no CPU backward, grouped backends no decode/roll: sdpa runs and the counter says so."""
    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "0")  # eager flex: compiling takes ~20 s on CPU
    sf = copy.deepcopy(SF)
    win = {"pattern": "sink_window", "window": 6, "num_sink_tokens": 2}
    roll = {**copy.deepcopy(SF), "wrap": "roll"}
    for spec, backend, train, want in [
        (sf, "flex", True, ("sf_attn", "sdpa")),
        (roll, "sdpa_groups", True, ("sf_attn", "sdpa")),
        (roll, "auto", True, ("sf_attn", "sdpa")),
        (win, "flex", False, ("sink_window", "flex")),  # no grad needed: flex runs on CPU
    ]:
        model = tiny_llama(layers=1)
        install_layout(model.config, {"version": 1, "backend": backend, "layers": [spec]})
        model.train(train)
        reset_kernel_calls()
        with torch.set_grad_enabled(train):
            model(torch.randint(0, 61, (1, 16)))
        assert kernel_calls() == {want: 1}, (spec, backend)

"""Attention-sink statistics against a hand-built attention pattern, and the model probe."""

import pytest
import torch

from finetune.eval import sinks


def _rows(first):
    """(Q=4, K=4) causal attention whose row i puts first[i] on key 0, the rest evenly on keys 1..i."""
    a = torch.zeros(4, 4)
    for i, p in enumerate(first):
        a[i, 0] = p
        if i:
            a[i, 1 : i + 1] = (1 - p) / i
    return a


def hand_attention():
    # layer 0: head 0 gives 0.5 to token 0 from every query > 0; head 1 is uniform causal.
    # layer 1: head 0 never attends token 0 (except query 0); head 1 gives it 0.2.
    l0 = torch.stack([_rows([1, 0.5, 0.5, 0.5]), _rows([1, 1 / 2, 1 / 3, 1 / 4])])
    l1 = torch.stack([_rows([1, 0, 0, 0]), _rows([1, 0.2, 0.2, 0.2])])
    return [l0[None], l1[None]]  # (batch, heads, q, k)


def test_hand_pattern_all_queries():
    st = sinks.sink_stats_from_attentions(hand_attention(), threshold=0.3)
    expected = [[(1 + 1.5) / 4, (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4], [1 / 4, (1 + 0.6) / 4]]
    for got, exp in zip(st["per_head"], expected):
        assert got == pytest.approx(exp)
    # 0.625, 0.521, 0.25, 0.4 -> three heads above 0.3
    assert st["share_above"] == pytest.approx(3 / 4)
    assert st["per_layer_share_above"] == [1.0, 0.5]
    assert st["mean"] == pytest.approx(sum(sum(r) for r in expected) / 4)
    assert (st["sink_heads"], st["heads"]) == (3, 4)


def test_hand_pattern_excluding_query0():
    st = sinks.sink_stats_from_attentions(hand_attention(), threshold=0.3, exclude_first_query=True)
    expected = [[0.5, (1 / 2 + 1 / 3 + 1 / 4) / 3], [0.0, 0.2]]
    for got, exp in zip(st["per_head"], expected):
        assert got == pytest.approx(exp)
    assert st["share_above"] == pytest.approx(2 / 4)
    assert st["per_layer_share_above"] == [1.0, 0.0]


def test_masks_of_hybrid_layers():
    q = k = torch.arange(6)
    sw = sinks.allowed_mask({"pattern": "sink_window", "window": 2, "num_sink_tokens": 1}, q, k, 2)[0]
    assert sw[5].tolist() == [True, False, False, False, True, True]  # sink 0 + keys 4, 5
    assert sw[1].tolist() == [True, True, False, False, False, False]
    bs = sinks.allowed_mask(
        {"pattern": "block_sparse", "block_size": 2, "local_blocks": 1, "stride": 2, "head_step": 1}, q, k, 2
    )
    # query 5 (block 2): own block {4,5}; head 0 strided blocks kb with (kb+1)%2==0 -> block 1 {2,3}
    assert bs[0, 5].tolist() == [False, False, True, True, True, True]
    # head 1: (kb+2)%2==0 -> block 0 {0,1}
    assert bs[1, 5].tolist() == [True, True, False, False, True, True]


def test_probe_matches_eager_attentions(tiny_llama_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_config)).eval()
    ids = torch.randint(0, 256, (2, 20))
    probe = sinks.model_sink_stats(model, [ids[0], ids[1]], threshold=0.1, progress=False)
    impl = model.config._attn_implementation
    assert impl != sinks.PROBE_NAME  # restored
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    ref = sinks.sink_stats_from_attentions(att, threshold=0.1)
    for a, b in zip(probe["per_head"], ref["per_head"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert probe["share_above"] == ref["share_above"]
    assert (probe["length"], probe["sequences"]) == (20, 2)


def test_probe_on_a_hybrid_longtune_model(tiny_llama_config):
    """Under the longtune attention a sink_window layer without sinks gives token 0 nothing once
    it leaves the window, and the probe leaves the model's output unchanged."""
    pytest.importorskip("kernels.layout")
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernels.layout import install_layout

    cfg = LlamaConfig(**tiny_llama_config)
    install_layout(
        cfg,
        {
            "version": 1,
            "backend": "auto",
            "cross_document": False,
            "layers": [{"pattern": "causal"}, {"pattern": "sink_window", "window": 4, "num_sink_tokens": 0}],
        },
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with sinks._probed(model) as records:
            out = model(input_ids=ids).logits
    assert torch.equal(ref, out)
    p0 = records[1][0]  # layer 1, (heads, queries)
    assert (p0[:, 4:] == 0).all() and (p0[:, 0] == 1).all()
    assert model.config._attn_implementation == "longtune"


def test_windows_start_with_bos():
    ids = torch.arange(20)
    assert [x.tolist() for x in sinks.windows(ids, 5, 3)] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [10, 11, 12, 13, 14],
    ]
    assert [x.tolist() for x in sinks.windows(ids, 5, 2)] == [[0, 1, 2, 3, 4], [15, 16, 17, 18, 19]]
    stream = torch.cat([torch.tensor([99]), ids])  # BOS only at the start of the stream
    assert [x.tolist() for x in sinks.windows(stream, 5, 2, bos_id=99)] == [
        [99, 0, 1, 2, 3],
        [99, 16, 17, 18, 19],
    ]

"""KV-cache suite: bytes held against a hand computation, budgets, and what is not applicable."""

import pytest
import torch

from finetune.eval import kv_cache
from finetune.recipe import EvalSection


def _model(tiny_llama_config, layout=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**tiny_llama_config)
    if layout is not None:
        from kernels.layout import install_layout

        install_layout(cfg, layout)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_full_cache_bytes_by_hand(tiny_llama_config):
    pytest.importorskip("finetune.caches")
    model = _model(tiny_llama_config)
    r = kv_cache.measure(
        model, torch.randint(0, 256, (40,)), kv_cache.default_kv_config("full", 40), decode_tokens=3
    )
    # 40 prompt tokens + 4 decoded (1 warm-up + 3 timed); 2 layers x 2 KV heads x head_dim 8 x (K+V) x fp32
    per_token = 2 * 2 * 8 * 2 * 4
    assert r["nbytes_after_prefill"] == 40 * per_token
    assert r["nbytes"] == 44 * per_token
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["decode_tokens"] == 3


def test_methods_and_budgets(tiny_llama_config):
    pytest.importorskip("finetune.caches")
    pytest.importorskip("kernels.layout")
    layout = {
        "version": 1,
        "backend": "auto",
        "cross_document": False,
        "layers": [{"pattern": "causal"}, {"pattern": "sink_window", "window": 8, "num_sink_tokens": 2}],
    }
    assert kv_cache.applicable_methods(_model(tiny_llama_config))["hybrid"] is not None
    model = _model(tiny_llama_config, layout)
    assert kv_cache.applicable_methods(model) == dict.fromkeys(kv_cache.METHODS)
    res = kv_cache.run(
        model,
        torch.randint(0, 256, (100,)),
        EvalSection(lengths=[40, 200], kv_decode_tokens=2),
        progress=False,
    )
    m = res["methods"]
    assert set(m) == set(kv_cache.METHODS) and not res["skipped"]
    assert "100 tokens < 200" in m["full"]["200"]["error"]  # too short: said, not measured
    per_token_layer = 2 * 8 * 2 * 4
    # hybrid: layer 0 keeps everything (40 + 3), layer 1 its 2 sinks + window 8
    assert m["hybrid"]["40"]["nbytes"] == (43 + 10) * per_token_layer
    assert m["hybrid"]["40"]["fraction_of_full"] == pytest.approx(53 / 86)
    assert m["sink"]["40"]["kv_config"]["window"] == 8  # 20% of the prompt
    assert m["h2o"]["40"]["kv_config"]["heavy_ratio"] == 0.1
    assert m["h2o"]["40"]["nbytes"] < m["full"]["40"]["nbytes"]


def test_ratios_to_full_time_and_memory(tiny_llama_config):
    """Each method reports what it buys next to full at the same length: KV bytes, peak prefill
    memory and tokens/s as ratios (full's own are 1), and the summary table shows them."""
    from finetune.eval.report import kv_md

    model = _model(tiny_llama_config)
    res = kv_cache.run(model, torch.randint(0, 256, (64,)), EvalSection(lengths=[48], kv_decode_tokens=2),
                       progress=False)  # fmt: skip
    m = res["methods"]
    full, h2o = m["full"]["48"], m["h2o"]["48"]
    assert full["prefill_x"] == full["decode_x"] == 1.0
    assert h2o["prefill_x"] == pytest.approx(h2o["prefill_tokens_per_s"] / full["prefill_tokens_per_s"])
    assert h2o["decode_x"] == pytest.approx(h2o["decode_tokens_per_s"] / full["decode_tokens_per_s"])
    if full["peak_prefill_bytes"]:  # Linux: peak RSS growth; elsewhere not measured
        assert h2o["memory_x"] == pytest.approx(h2o["peak_prefill_bytes"] / full["peak_prefill_bytes"])
    text = kv_md({**res, "model": "tiny"})
    assert "peak x full" in text and "prefill x full" in text and "decode x full" in text

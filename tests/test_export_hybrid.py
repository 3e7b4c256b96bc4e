"""LongGen hybrid exports stay hybrid, and plain transformers cannot silently load them as Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from finetune.export import export_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hybrid_export(hybrid_run, tmp_path_factory):
    return export_run(hybrid_run, tmp_path_factory.mktemp("hy-out") / "export", dtype="float32")


def test_hybrid_export_config(hybrid_export):
    cfg = json.loads((hybrid_export / "config.json").read_text())
    assert cfg["model_type"] == "longtune_llama"
    assert cfg["architectures"] == ["LongtuneLlamaForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "longtune_hybrid.LongtuneLlamaForCausalLM"
    assert (hybrid_export / "longtune_hybrid.py").is_file()
    pats = [l["pattern"] for l in cfg["longtune_attention"]["layers"]]
    assert pats == ["sink_window", "causal", "causal", "sink_window"]  # the hybrid stays
    assert cfg["rope_parameters"]["factor"] == 2.0
    kv = json.loads((hybrid_export / "kv_cache_config.json").read_text())
    assert kv["method"] == "hybrid" and kv["full_layers"] == [1, 2] and kv["window"] == 16


def test_load_model_restores_hybrid_attention(hybrid_run, hybrid_export, prompt_ids):
    """load_model == the unmerged peft model under the same hybrid layout; != full attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import finetune
    from finetune.export.merge import load_peft
    from kernels.layout import inference_layout, install_layout

    model = finetune.load_model(hybrid_export, dtype="float32")
    assert model.config._attn_implementation == "longtune"
    assert next(l["pattern"] for l in model.config.longtune_attention["layers"]) == "sink_window"
    with torch.no_grad():
        got = model(input_ids=prompt_ids).logits

    peft = load_peft(hybrid_run)
    cfg = peft.get_base_model().config
    install_layout(cfg, inference_layout(cfg.longtune_attention))
    with torch.no_grad():
        ref = peft(input_ids=prompt_ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)

    # The same weights under plain full attention (what a silent Llama load would do) differ:
    # prompt_ids (20 tokens) is longer than window 16 + 2 sinks.
    cj = json.loads((hybrid_export / "config.json").read_text())
    for k in ("auto_map", "architectures", "model_type", "longtune_attention"):
        cj.pop(k)
    plain = LlamaForCausalLM(LlamaConfig(**cj))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain.eval()(input_ids=prompt_ids).logits - got).abs().max() > 1e-4


PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    path = sys.argv[1]
    try:
        AutoModelForCausalLM.from_pretrained(path)
    except Exception as e:
        print("REFUSED:", type(e).__name__, str(e).replace(chr(10), " "))
    else:
        print("LOADED-PLAIN")
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    print("REMOTE:", type(m).__name__, m.config._attn_implementation,
          json.dumps([l["pattern"] for l in m.config.longtune_attention["layers"]]))
    # custom_generate/generate.py: generate uses kv_cache_config.json (the hybrid cache)
    out = m.generate(torch.tensor([[256, 72, 105]]), max_new_tokens=2, do_sample=False,
                     return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    print("GEN:", type(m.generate).__name__, type(cache).__name__, tuple(out.sequences.shape))
    """
)


def test_plain_transformers_refuses_or_gets_hybrid(hybrid_export, tmp_path):
    """A fresh process with plain transformers: no silent full-attention Llama."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(hybrid_export)], capture_output=True, text=True,
                       env=env, timeout=120, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "LOADED-PLAIN" not in out
    refused = next(l for l in out.splitlines() if "REFUSED:" in l)
    assert "custom code" in refused and "trust_remote_code=True" in refused
    remote = next(l for l in out.splitlines() if l.startswith("REMOTE"))
    assert "LongtuneLlamaForCausalLM longtune" in remote and '"sink_window"' in remote
    gen = next(l for l in out.splitlines() if l.startswith("GEN"))
    assert gen == "GEN: partial HybridCache (1, 5)", gen


def test_remote_code_file_explains_how_to_load(hybrid_export):
    text = (hybrid_export / "longtune_hybrid.py").read_text()
    assert "finetune.load_model(path)" in text and "trust_remote_code=True" in text
    card = (hybrid_export / "README.md").read_text()
    assert "trust_remote_code=True" in card and "custom_code" in card

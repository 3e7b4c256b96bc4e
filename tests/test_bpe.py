"""`bpe-<N>` tokenizers (data_prep/bpe.py): built offline from the bundled texts, once, the same every time."""

from __future__ import annotations

import json

import pytest

from data_prep import DataError, bpe
from data_prep.assets import cache_dir, load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """bpe-400 built twice into two empty caches."""
    mp = pytest.MonkeyPatch()
    dirs = []
    for i in range(2):
        mp.setenv("LONGTUNE_CACHE", str(tmp_path_factory.mktemp(f"cache{i}")))
        load_tokenizer("bpe-400")  # builds it into this cache
        dirs.append(bpe.bpe_tokenizer_dir("bpe-400", cache_dir(), lambda: pytest.fail("rebuilt although cached")))
    mp.undo()
    return dirs


def test_build_is_deterministic_and_cached(built, monkeypatch):
    a, b = built
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert json.loads((a / "longtune_bpe.json").read_text())["vocab_size"] == 400
    monkeypatch.setenv("LONGTUNE_CACHE", str(a.parent.parent))
    monkeypatch.setattr(bpe, "train_bpe", lambda *_: pytest.fail("rebuilt although cached"))
    tok = load_tokenizer("bpe-400")
    assert len(tok) == 400 and tok.name_or_path == "bpe-400"


def test_digits_are_single_tokens_and_specials_come_first(built, monkeypatch):
    monkeypatch.setenv("LONGTUNE_CACHE", str(built[0].parent.parent))
    tok = load_tokenizer("bpe-400")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    pieces = tok.tokenize("The pass key is 71432.")
    assert pieces[-6:] == ["7", "1", "4", "3", "2", "."]
    assert tok.decode(tok("The pass key is 71432.")["input_ids"]) == "The pass key is 71432."
    assert len(tok("The grass is green. The sky is blue.")["input_ids"]) < len("The grass is green. The sky is blue.") / 2


def test_an_interrupted_build_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTUNE_CACHE", str(tmp_path))
    plays = lambda: ["abc 123 abcabc the the the"] * 50
    half = tmp_path / "tokenizers" / f"bpe-300-v{bpe.BUILD}"
    half.mkdir(parents=True)
    (half / "tokenizer.json").write_text("{")  # no marker: a build stopped half-way
    out = bpe.bpe_tokenizer_dir("bpe-300", tmp_path, plays)
    assert out == half and (out / "longtune_bpe.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"


@pytest.mark.parametrize("name", ["bpe-12", "bpe-999999"])
def test_bad_vocab_size_names_the_tokenizer(name):
    with pytest.raises(DataError, match=name):
        load_tokenizer(name)


def test_the_demo_base_agrees_with_bpe_1024(tmp_path, monkeypatch):
    """The demo's config-built base and its `bpe-1024` tokenizer: same vocabulary and special ids,
    and the eval prompts' key as one token per digit."""
    from finetune.model import check_tokenizer, load_base_config
    from finetune.recipe import RECIPES_DIR, load_recipe

    monkeypatch.setenv("LONGTUNE_CACHE", str(tmp_path))
    r = load_recipe(RECIPES_DIR / "demo" / "pretrain.yaml")
    tok = load_tokenizer(r.model.tokenizer)
    cfg = load_base_config(r)
    check_tokenizer(r, cfg, tok)
    assert len(tok) == cfg.vocab_size == 1024
    assert len(tok(" 48213", add_special_tokens=False)["input_ids"]) == 6  # the space, then 5 digits
    for name in ("extend-sfattn.yaml", "extend-hybrid.yaml"):
        assert load_recipe(RECIPES_DIR / "demo" / name).model.tokenizer == r.model.tokenizer

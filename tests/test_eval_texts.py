"""Which text perplexity is measured on, and whether the summary can call it held out."""

import json

from data_prep.assets import byte_tokenizer
from finetune.eval.texts import eval_text, token_stream
from finetune.recipe import validate

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 259,
}


def _recipe(tmp_path, **eval_):
    (tmp_path / "train.txt").write_text("Training text. " * 20)
    return validate(
        {
            "model": {"config": TINY, "tokenizer": "byte"},
            "run_dir": str(tmp_path),
            "data": {"sources": [{"type": "text", "path": str(tmp_path / "train.txt")}], "seq_length": 16},
            "eval": eval_,
        }
    )


def test_training_source_is_flagged(tmp_path):
    t = eval_text(tmp_path, _recipe(tmp_path))
    assert t.held_out is False and "may have been seen in training" in t.note
    assert t.documents[0].startswith("Training text.")


def test_eval_split_is_held_out(tmp_path):
    import datasets

    tok = byte_tokenizer()
    rows = [[256] + list(b"held out doc one"[:15]), list(b"x.") + [256] + list(b"second doc here")[:13]]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_ids": [list(b"Training text. X")]}),
            "eval": datasets.Dataset.from_dict({"input_ids": rows}),
        }
    )
    dd.save_to_disk(str(tmp_path / "data"))
    (tmp_path / "data" / "manifest.json").write_text(
        json.dumps({"tokenizer": {"name": "byte"}, "counts": {"train": 1, "eval": 2}, "seq_length": 16})
    )
    t = eval_text(tmp_path, _recipe(tmp_path))
    assert t.held_out is True and "eval split" in t.description
    assert t.documents == ["held out doc onx.\n\nsecond doc he"]
    ids = token_stream(tok, t.documents)
    assert ids[0].item() == tok.bos_token_id and ids.numel() == 1 + len(t.documents[0])


def test_explicit_source_wins(tmp_path):
    (tmp_path / "other.txt").write_text("Other text.")
    r = _recipe(tmp_path, perplexity_source={"type": "text", "path": str(tmp_path / "other.txt")})
    t = eval_text(tmp_path, r)
    assert t.documents == ["Other text."] and t.held_out is True
    r = _recipe(tmp_path, perplexity_source={"type": "text", "path": str(tmp_path / "missing.txt")})
    t = eval_text(tmp_path, r)
    assert t.documents == [] and "could not read" in t.note

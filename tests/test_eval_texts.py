"""Which text perplexity is measured on, and whether the summary can call it held out."""

import json

from data_prep.assets import byte_tokenizer
from finetune.eval.texts import eval_text, token_stream
from finetune.recipe import validate


def _recipe(tmp_path, tiny, **eval_):
    (tmp_path / "train.txt").write_text("Training text. " * 20)
    return validate(
        {
            "model": {"config": tiny, "tokenizer": "byte"},
            "run_dir": str(tmp_path),
            "data": {"sources": [{"type": "text", "path": str(tmp_path / "train.txt")}], "seq_length": 16},
            "eval": eval_,
        }
    )


def test_training_source_is_flagged(tmp_path, tiny_llama_config):
    t = eval_text(tmp_path, _recipe(tmp_path, tiny_llama_config))
    assert t.held_out is False and "may have been seen in training" in t.note
    assert t.documents[0].startswith("Training text.")


def test_eval_split_is_held_out(tmp_path, tiny_llama_config):
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
    t = eval_text(tmp_path, _recipe(tmp_path, tiny_llama_config))
    assert t.held_out is True and "eval split" in t.description
    assert t.documents == ["held out doc onx.\n\nsecond doc he"]
    ids = token_stream(tok, t.documents)
    assert ids[0].item() == tok.bos_token_id and ids.numel() == 1 + len(t.documents[0])


def test_explicit_source_wins(tmp_path, tiny_llama_config):
    (tmp_path / "other.txt").write_text("Other text.")
    other = {"type": "text", "path": str(tmp_path / "other.txt")}
    r = _recipe(tmp_path, tiny_llama_config, perplexity_source=other)
    t = eval_text(tmp_path, r)
    assert t.documents == ["Other text."] and t.held_out is True
    missing = {"type": "text", "path": str(tmp_path / "missing.txt")}
    r = _recipe(tmp_path, tiny_llama_config, perplexity_source=missing)
    t = eval_text(tmp_path, r)
    assert t.documents == [] and "could not read" in t.note


def _prepared(tmp_path, tiny, weights):
    """Really prepare two sources with the given mixture weights; eval_fraction 0.2."""
    import re

    import datasets

    from data_prep.prepare import prepare

    srcs = []
    for name, count in (("a", 6), ("b", 40)):
        f = tmp_path / f"{name}.jsonl"
        f.write_text(
            "".join(json.dumps({"text": f"doc-{name}{i:03d} " + name * 30}) + "\n" for i in range(count))
        )
        srcs.append({"type": "jsonl", "path": str(f), "weight": weights[name]})
    r = validate(
        {
            "model": {"config": tiny, "tokenizer": "byte"},
            "run_dir": str(tmp_path),
            "data": {"sources": srcs, "seq_length": 48, "eval_fraction": 0.2},
        }
    )
    out = prepare(r)
    dd = datasets.load_from_disk(str(out))

    def docs(split):  # independent of the manifest: the document names the rows hold
        text = bytes(t for row in dd[split]["input_ids"] for t in row if t < 256).decode()
        return set(re.findall(r"doc-[ab]\d{3}", text))

    return r, docs("train"), docs("eval")


def test_eval_split_with_repeated_documents_is_not_called_held_out(tmp_path, tiny_llama_config):
    # source a drawn several times over
    r, train, ev = _prepared(tmp_path, tiny_llama_config, {"a": 5.0, "b": 1.0})
    assert ev & train  # documents really sit on both sides
    t = eval_text(tmp_path, r)
    assert t.held_out is False and "more than once" in t.note and "a.jsonl" in t.note


def test_eval_split_without_repeats_stays_held_out(tmp_path, tiny_llama_config):
    # weights = size shares: each doc once
    r, train, ev = _prepared(tmp_path, tiny_llama_config, {"a": 6.0, "b": 40.0})
    man = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert all(s["drawn"]["passes"] <= 1 for s in man["sources"])
    assert len(ev & train) <= 1  # at most the document cut by the train/eval row boundary
    t = eval_text(tmp_path, r)
    assert t.held_out is True and "eval split" in t.description

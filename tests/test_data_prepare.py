"""data_prep: packing, mixture, SFT masking, bad input, atomic writes. Tiny data, byte tokenizer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from data_prep import DataError
from data_prep.assets import byte_tokenizer
from data_prep.collate import DataCollator
from data_prep.prepare import is_prepared, main, prepare
from data_prep.pretrain import pack, pack_whole
from data_prep.sft import PROMPT_INPUT, PROMPT_NO_INPUT
from finetune.recipe import validate

BOS, EOS, PAD = 256, 257, 258


def recipe(tmp_path, sources, **data):
    data.setdefault("seq_length", 16)
    return validate(
        {
            "run_dir": str(tmp_path / "run"),
            "seed": data.pop("seed", 0),
            "model": {"config": {"hidden_size": 8}, "tokenizer": "byte"},
            "data": {"sources": sources, **data},
        }
    )


def write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, records: list) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def load(out: Path):
    return datasets.load_from_disk(str(out)), json.loads((out / "manifest.json").read_text())


def stream(dd) -> list[int]:
    """All rows in order (train rows come first, eval rows last, so this is the packed stream)."""
    rows = list(dd["train"]["input_ids"]) + (list(dd["eval"]["input_ids"]) if "eval" in dd else [])
    return [t for r in rows for t in r]


# --------------------------------------------------------------------------- packing
def ref_pack(docs, seq_length, sep, sep_after):
    """Plain Python reference: join segments, cut rows, positions restart per document and per row."""
    toks, starts = [], []
    for d in docs:
        seg = list(d)
        if sep is not None:
            seg = seg + [sep] if sep_after else [sep] + seg
        toks += seg
        starts += [True] + [False] * (len(seg) - 1)
    rows = len(toks) // seq_length
    ids, pos = [], []
    p = 0
    for i in range(rows * seq_length):
        p = 0 if (starts[i] or i % seq_length == 0) else p + 1
        pos.append(p)
    for r in range(rows):
        ids.append(toks[r * seq_length : (r + 1) * seq_length])
    return (
        ids,
        [pos[r * seq_length : (r + 1) * seq_length] for r in range(rows)],
        len(toks) - rows * seq_length,
    )


@pytest.mark.parametrize("sep,sep_after", [(BOS, False), (EOS, True), (None, False)])
@pytest.mark.parametrize("seq_length", [1, 5, 16])
def test_pack_matches_reference(sep, sep_after, seq_length):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 250, size=int(n)).tolist() for n in rng.integers(1, 23, size=17)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    values = np.array([t for d in docs for t in d], dtype=np.int32)
    order = rng.permutation(len(docs))
    order = np.concatenate([order, order[:3]])  # repeated documents (mixture passes)
    ids, pos, seg, tail = pack(values, offsets, order, seq_length, sep, sep_after)
    rids, rpos, rtail = ref_pack([docs[j] for j in order], seq_length, sep, sep_after)
    assert ids.tolist() == rids and pos.tolist() == rpos and tail == rtail
    assert int(seg.sum()) == ids.size + tail


def _segments(docs, sep, sep_after):
    out = []
    for d in docs:
        seg = list(d)
        if sep is not None:
            seg = seg + [sep] if sep_after else [sep] + seg
        out.append(seg)
    return out


@pytest.mark.parametrize("sep,sep_after", [(BOS, False), (EOS, True), (None, False)])
@pytest.mark.parametrize("seq_length", [5, 16])
def test_pack_whole_never_cuts_a_document_that_fits_a_row(sep, sep_after, seq_length):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 250, size=int(n)).tolist() for n in rng.integers(1, 40, size=40)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    values = np.array([t for d in docs for t in d], dtype=np.int32)
    order = np.concatenate([rng.permutation(len(docs)), [3, 5]])
    ids, pos, owner, tail = pack_whole(values, offsets, order, seq_length, sep, sep_after, pad=PAD)
    segs = _segments([docs[j] for j in order], sep, sep_after)
    short = [k for k, g in enumerate(segs) if len(g) <= seq_length]
    long_stream = [t for k, g in enumerate(segs) if len(g) > seq_length for t in g]
    seen_short, long_got = [], []
    for r in range(len(ids)):
        row, own, p = ids[r].tolist(), owner[r].tolist(), pos[r].tolist()
        i = 0
        while i < seq_length:  # walk the row's runs of one owner
            j = i
            while j < seq_length and own[j] == own[i] and (j == i or p[j] == p[j - 1] + 1):
                j += 1
            k = own[i]
            assert p[i] == 0, "positions restart at every document, piece and pad run"
            if k < 0:
                assert row[i:j] == [PAD] * (j - i)
            elif len(segs[k]) <= seq_length:
                assert row[i:j] == segs[k], "a document that fits a row is whole, in one row"
                seen_short.append(k)
            else:
                long_got += row[i:j]
            i = j
    # short documents in order, each once (the rest of the stream: the dropped tail); the long
    # stream in order, cut anywhere; pads only where a short document did not fit the room left
    assert seen_short == short[: len(seen_short)]
    assert long_got == long_stream[: len(long_got)]
    real = int((owner >= 0).sum())
    assert real + tail == sum(len(g) for g in segs)
    if tail == 0:
        assert len(seen_short) == len(short) and len(long_got) == len(long_stream)


@pytest.mark.parametrize("sep,sep_after", [(BOS, False), (EOS, True)])
def test_pack_whole_equals_pack_when_every_document_is_longer_than_a_row(sep, sep_after):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 250, size=int(n)).tolist() for n in rng.integers(20, 60, size=9)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    values = np.array([t for d in docs for t in d], dtype=np.int32)
    order = rng.permutation(len(docs))
    a = pack(values, offsets, order, 16, sep, sep_after)
    b = pack_whole(values, offsets, order, 16, sep, sep_after, pad=PAD)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist() and a[3] == b[3]
    assert (b[2] >= 0).all()


def test_prepare_whole_packing_pads_with_ignored_labels(tmp_path):
    texts = [f"doc{i:02d} " + "xyz" * (i % 5) + "." for i in range(30)] + ["long " + "abcdefg" * 4]
    src = jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    r = recipe(tmp_path, [{"type": "jsonl", "path": src}], seq_length=24, packing="whole")
    dd, m = load(prepare(r))
    found = []
    for ids, labels, pos in zip(dd["train"]["input_ids"], dd["train"]["labels"], dd["train"]["position_ids"]):
        for t, lab in zip(ids, labels):
            assert lab == (-100 if t == PAD else t)
        cuts = [i for i, q in enumerate(pos) if q == 0] + [len(ids)]  # documents, pieces, pad runs
        for a, b in itertools.pairwise(cuts):
            piece = bytes(t for t in ids[a:b] if t < 256).decode()
            if piece.startswith("doc"):
                found.append(piece)
    assert all(f in texts for f in found), "every short document whole in a row"
    assert len(found) == len(set(found)) and len(found) >= 25
    assert m["tokens"]["train_pad_tokens"] == sum(lab == -100 for row in dd["train"]["labels"] for lab in row)
    split = recipe(tmp_path / "s", [{"type": "jsonl", "path": src}], seq_length=24)
    ds, _ = load(prepare(split))
    rows = ["".join(chr(t) if t < 256 else "|" for t in ids) for ids in ds["train"]["input_ids"]]
    assert any(not row.endswith((".", "|")) and "doc" in row.rsplit("|", 1)[-1] for row in rows), (
        "the split packing does cut short documents (the case whole packing exists for)"
    )


def test_prepare_pretrain_keeps_every_document_and_boundary(tmp_path):
    texts = [f"doc{i:02d} " + "xyz" * (i % 7) + "." for i in range(30)]
    src = jsonl(tmp_path / "d.jsonl", [{"body": t} for t in texts])
    r = recipe(
        tmp_path, [{"type": "jsonl", "path": src, "text_field": "body"}], seq_length=24, eval_fraction=0.1
    )
    dd, m = load(prepare(r))
    assert set(dd) == {"train", "eval"} and m["counts"] == {
        "train": len(dd["train"]),
        "eval": len(dd["eval"]),
    }
    total = 0
    for split in ("train", "eval"):  # each split is packed on its own
        toks = [t for r in dd[split]["input_ids"] for t in r]
        pieces = bytes(t if t != BOS else 0 for t in toks).split(b"\0")
        assert pieces[0] == b"" and toks[0] == BOS
        found = [p.decode() for p in pieces[1:]]
        # every document but the one cut by the dropped tail appears whole, exactly once
        assert sorted(found[:-1]) == sorted(set(found[:-1])) and all(f in texts for f in found[:-1])
        assert any(t.startswith(found[-1]) for t in texts)
        total += len(toks)
    assert total + m["tokens"]["tail_tokens_dropped"] == sum(len(t) + 1 for t in texts)
    for split in ("train", "eval"):
        for ids, labels, pos in zip(dd[split]["input_ids"], dd[split]["labels"], dd[split]["position_ids"]):
            assert labels == ids and len(ids) == 24
            for i in range(24):
                expected = 0 if (i == 0 or ids[i] == BOS) else pos[i - 1] + 1
                assert pos[i] == expected
    assert m["tokenizer"]["name"] == "byte" and m["tokenizer"]["vocab_size"] == 259
    assert m["seq_length"] == 24 and m["sources"][0]["kept"]["docs"] == 30
    assert sum(b["count"] for b in m["length_histogram"]) == 30


@pytest.mark.parametrize("separator", ["eos", "none"])
def test_separator_options(tmp_path, separator):
    src = write(tmp_path / "a.txt", "abcdefghij" * 5)
    dd, m = load(
        prepare(recipe(tmp_path, [{"type": "text", "path": src}], separator=separator, seq_length=8))
    )
    toks = stream(dd)
    if separator == "eos":
        assert toks[:10] == list(b"abcdefghij") and toks.count(EOS) <= 1 and BOS not in toks
    else:
        assert toks == list(b"abcdefghij" * 5)[: len(toks)] and m["tokens"]["separator_tokens"] == 0


def test_mixture_weights_and_manifest_counts(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": "a" * n} for n in range(5, 25)])  # 290 tokens
    b = jsonl(tmp_path / "b.jsonl", [{"text": "b" * n} for n in range(5, 15)])  # 95 tokens
    sources = [{"type": "jsonl", "path": a, "weight": 1}, {"type": "jsonl", "path": b, "weight": 3}]
    dd, m = load(prepare(recipe(tmp_path, sources, separator="none", seq_length=10, eval_fraction=0.2)))
    sa, sb = m["sources"]
    assert sa["kept"]["tokens"] == 290 and sb["kept"]["tokens"] == 95
    # the eval documents are held out first (about 20% of each source), the mixture draws the rest
    assert 0.2 * 290 <= sa["eval"]["tokens"] < 0.2 * 290 + 24 and 0.2 * 95 <= sb["eval"]["tokens"] < 0.2 * 95 + 14
    total = 290 + 95 - sa["eval"]["tokens"] - sb["eval"]["tokens"]
    # each source reaches its share of the tokens, overshooting by less than one of its documents
    assert total / 4 <= sa["drawn"]["tokens"] < total / 4 + 24
    assert 3 * total / 4 <= sb["drawn"]["tokens"] < 3 * total / 4 + 14
    assert sb["drawn"]["passes"] > 3  # the small source is repeated
    for split in ("train", "eval"):
        toks = [t for r in dd[split]["input_ids"] for t in r]
        assert toks.count(ord("a")) == sa[f"tokens_{split}"] and toks.count(ord("b")) == sb[f"tokens_{split}"]
        assert m["tokens"][f"{split}_tokens"] == len(toks)
    kept_out = m["tokens"]["train_tokens"] + m["tokens"]["eval_tokens"] + m["tokens"]["tail_tokens_dropped"]
    assert kept_out == sa["drawn"]["tokens"] + sb["drawn"]["tokens"] + sa["eval"]["tokens"] + sb["eval"]["tokens"]


def test_eval_split_holds_whole_documents_never_trained_on(tmp_path):
    """Regression (issue 12): the eval split was the last packed rows, so the document cut at the
    boundary -- and, with a repeated source, copies of eval documents -- were in both splits."""
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"<a{i:03d}>" + "a" * (i % 9)} for i in range(60)])
    b = jsonl(tmp_path / "b.jsonl", [{"text": f"<b{i:03d}>" + "b" * (i % 5)} for i in range(12)])
    sources = [{"type": "jsonl", "path": a}, {"type": "jsonl", "path": b, "weight": 4}]  # b repeated
    for separator in ("bos", "none"):
        dd, m = load(prepare(recipe(tmp_path / separator, sources, separator=separator, seq_length=16,
                                    eval_fraction=0.25)))  # fmt: skip
        assert m["sources"][1]["drawn"]["passes"] > 1 and m["eval_split"]["by"] == "document"
        text = {split: bytes(t for r in dd[split]["input_ids"] for t in r if t < 256).decode() for split in dd}
        import re

        ids = {split: set(re.findall(r"<[ab]\d{3}", t)) for split, t in text.items()}  # a cut document counts too
        assert ids["train"] and ids["eval"] and not ids["train"] & ids["eval"]
        assert m["eval_split"]["documents"] == m["sources"][0]["eval"]["docs"] + m["sources"][1]["eval"]["docs"]
        assert len(ids["eval"]) <= m["eval_split"]["documents"]


def test_eval_split_needs_two_documents(tmp_path):
    src = write(tmp_path / "one.txt", "x" * 500)
    with pytest.raises(DataError, match="whole documents and needs at least 2"):
        prepare(recipe(tmp_path, [{"type": "text", "path": src}], eval_fraction=0.1))


def test_length_upsampling_and_filter_counts(tmp_path):
    long_docs = [f"L{i:02d}" + "y" * 40 for i in range(10)]  # 43 tokens
    short_docs = [f"S{i:02d}" + "z" * 10 for i in range(40)]  # 13 tokens
    tiny = ["ab", "", "   "]
    src = jsonl(tmp_path / "d.jsonl", [{"text": t} for t in long_docs + short_docs + tiny])
    common = {"min_doc_tokens": 5, "long_doc_tokens": 30, "seq_length": 8}

    r = recipe(tmp_path, [{"type": "jsonl", "path": src}], short_keep_prob=0.0, **common)
    dd, m = load(prepare(r))
    s = m["sources"][0]
    assert s["records"] == 53 and s["kept"] == {"docs": 10, "tokens": 430}
    assert s["skipped"] == {
        "empty": {"docs": 2, "tokens": 3},
        "short_downsampled": {"docs": 40, "tokens": 520},
        "too_short": {"docs": 1, "tokens": 2},
    }
    text = bytes(t for t in stream(dd) if t < 256).decode()
    assert all(d in text for d in long_docs[:-1]) and "S" not in text and "z" not in text

    r = recipe(tmp_path, [{"type": "jsonl", "path": src}], short_keep_prob=0.5, **common)
    dd, m = load(prepare(r))
    s = m["sources"][0]
    n_short = s["skipped"]["short_downsampled"]["docs"]
    assert 5 < n_short < 35 and s["kept"]["docs"] == 10 + 40 - n_short
    pieces = [p.decode() for p in bytes(t if t != BOS else 0 for t in stream(dd)).split(b"\0")[1:]]
    found = {p[:3] for p in pieces if len(p) >= 3}
    # all kept documents are in the rows except possibly the one in the dropped tail (< 8 tokens)
    assert s["kept"]["docs"] - len(found) in (0, 1)
    assert {f for f in found if f.startswith("L")} >= {d[:3] for d in long_docs[:-1]}


def test_deterministic_for_a_seed(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i} " * (1 + i % 4)} for i in range(40)])
    hashes = []
    for i, seed in enumerate([3, 3, 4]):
        r = recipe(
            tmp_path / str(i),
            [{"type": "jsonl", "path": src}],
            seed=seed,
            short_keep_prob=0.5,
            long_doc_tokens=40,
            eval_fraction=0.1,
        )
        hashes.append(load(prepare(r))[1]["content_hash"])
    assert hashes[0] == hashes[1] != hashes[2]


def test_max_sequences_caps_train_rows(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [{"text": "x" * 49} for _ in range(10)])  # 10 x 50 tokens
    dd, m = load(prepare(recipe(tmp_path, [{"type": "jsonl", "path": src}], max_sequences=3, eval_fraction=0.1)))
    assert m["sources"][0]["eval"]["docs"] == 1  # 50 tokens >= 10% and >= one row of 16
    assert m["tokens"]["rows_packed"] == 28 + 3  # 450 train tokens / 16, 50 eval tokens / 16
    assert len(dd["train"]) == 3 and len(dd["eval"]) == 1  # eval in proportion to the capped train set
    assert m["tokens"]["rows_dropped_by_max_sequences"] == 31 - 4


def test_sources_text_folder_parquet_disk_corpus(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep import assets

    write(tmp_path / "folder" / "one.txt", "first file")
    write(tmp_path / "folder" / "sub" / "two.md", "second file")
    write(tmp_path / "folder" / ".hidden", "\xff never read")
    pq.write_table(pa.table({"content": ["parquet doc"]}), tmp_path / "p.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["disk doc"]})}).save_to_disk(
        str(tmp_path / "disk")
    )
    monkeypatch.setitem(assets.CORPORA, "tiny", lambda: [{"text": "corpus doc"}])
    sources = [
        {"type": "text", "path": str(tmp_path / "folder")},
        {"type": "parquet", "path": str(tmp_path / "p.parquet"), "text_field": "content"},
        {"type": "disk", "path": str(tmp_path / "disk")},
        {"type": "corpus", "path": "tiny"},
    ]
    weights = [21, 11, 8, 10]  # proportional to the sources' tokens: every document drawn once
    for s, w in zip(sources, weights):
        s["weight"] = w
    dd, m = load(prepare(recipe(tmp_path, sources, seq_length=4)))
    text = bytes(t if t < 256 else 124 for t in stream(dd)).decode()
    for doc in ["first file", "second file", "parquet doc", "disk doc", "corpus doc"]:
        assert doc in text or m["tokens"]["tail_tokens_dropped"]
    assert [s["kept"]["docs"] for s in m["sources"]] == [2, 1, 1, 1]
    assert [s["drawn"]["passes"] for s in m["sources"]] == [1.0, 1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- SFT
def sft_ids(text: str) -> list[int]:
    return list(text.encode())


def test_sft_alpaca_masks_prompt_exactly(tmp_path):
    recs = [
        {"instruction": "Say hi", "input": "", "output": "hi there"},
        {"instruction": "Sum", "input": "1 2", "output": "3"},
    ]
    src = jsonl(tmp_path / "s.jsonl", recs)
    dd, m = load(
        prepare(recipe(tmp_path, [{"type": "jsonl", "path": src, "weight": 1}], format="sft", seq_length=400))
    )
    rows = list(dd["train"])
    assert len(rows) == 2
    for rec, prompt in ((recs[0], PROMPT_NO_INPUT), (recs[1], PROMPT_INPUT)):
        p = [BOS] + sft_ids(prompt.format(**rec))
        resp = sft_ids(rec["output"]) + [EOS]
        row = next(
            r for r in rows if len(r["input_ids"]) == len(p) + len(resp) and r["input_ids"][-2] == resp[-2]
        )
        assert row["input_ids"] == p + resp
        assert row["labels"] == [-100] * len(p) + resp
        assert row["position_ids"] == list(range(len(p) + len(resp)))
    assert m["tokens"]["train_label_tokens"] == len("hi there") + 1 + len("3") + 1


def test_sft_chat_masks_all_but_assistant_turns(tmp_path):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    src = jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    dd, _ = load(prepare(recipe(tmp_path, [{"type": "jsonl", "path": src}], format="sft", seq_length=200)))
    row = dd["train"][0]
    tok = byte_tokenizer()
    assert (
        row["input_ids"]
        == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    )
    learned = [t for t in row["labels"] if t != -100]
    assert learned == sft_ids("yo") + [EOS] + sft_ids("\n") + sft_ids("a") + [EOS] + sft_ids("\n")
    # the learned tokens are exactly where they sit in the row
    assert all(lab in (-100, i) for lab, i in zip(row["labels"], row["input_ids"]))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_sft_overlong(tmp_path, overlong):
    recs = [
        {"instruction": "i", "output": "short"},
        {"instruction": "i", "output": "r" * 200},  # prompt fits, response cut
        {"instruction": "p" * 300, "output": "gone"},  # response entirely past seq_length
    ]
    src = jsonl(tmp_path / "s.jsonl", recs)
    r = recipe(tmp_path, [{"type": "jsonl", "path": src}], format="sft", seq_length=150, overlong=overlong)
    dd, m = load(prepare(r))
    skipped = m["sources"][0]["skipped"]
    if overlong == "drop":
        assert len(dd["train"]) == 1 and skipped["overlong"]["docs"] == 2
    else:
        assert len(dd["train"]) == 2 and skipped == {"response_truncated": {"docs": 1, "tokens": 150}}
        cut = next(row for row in dd["train"] if len(row["input_ids"]) == 150)
        assert cut["labels"][-1] == ord("r") and any(x != -100 for x in cut["labels"])
    assert all(any(x != -100 for x in row["labels"]) for row in dd["train"])


def test_sft_empty_response_is_dropped_and_counted(tmp_path):
    src = jsonl(
        tmp_path / "s.jsonl", [{"instruction": "i", "output": ""}, {"instruction": "i", "output": "ok"}]
    )
    dd, m = load(prepare(recipe(tmp_path, [{"type": "jsonl", "path": src}], format="sft", seq_length=300)))
    assert len(dd["train"]) == 1 and m["sources"][0]["skipped"]["empty_response"]["docs"] == 1


# --------------------------------------------------------------------------- bad input
def expect_error(r, *fragments):
    with pytest.raises(DataError) as e:
        prepare(r)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert not Path(r.data_dir).exists()
    assert not [p for p in Path(r.data_dir).parent.glob(".*")] if Path(r.data_dir).parent.exists() else True
    return str(e.value)


def test_corrupt_jsonl_line(tmp_path):
    src = write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n{"text": "broken\n')
    expect_error(recipe(tmp_path, [{"type": "jsonl", "path": src}]), f"{src}:3", "invalid JSON")


def test_missing_field_names_file_and_line(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "no text"}])
    expect_error(
        recipe(tmp_path, [{"type": "jsonl", "path": src}]), f"{src}:2", "missing field 'text'", "body"
    )


def test_missing_sft_field_names_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", None]}), tmp_path / "s.parquet")
    r = recipe(tmp_path, [{"type": "parquet", "path": str(tmp_path / "s.parquet")}], format="sft")
    expect_error(r, "s.parquet record 1", "missing field 'output'")


def test_non_utf8_file_names_line(tmp_path):
    src = write(tmp_path / "bad.txt", b"fine line\nsecond \xff\xfe line\n")
    expect_error(recipe(tmp_path, [{"type": "text", "path": src}]), f"{src}:2:8", "not valid UTF-8")


def test_empty_and_too_short_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(recipe(tmp_path, [{"type": "text", "path": str(tmp_path / "empty")}]), "no data files")
    src = write(tmp_path / "e.jsonl", "\n")
    expect_error(recipe(tmp_path, [{"type": "jsonl", "path": src}]), "no records")
    src = jsonl(tmp_path / "s.jsonl", [{"text": "tiny"}, {"text": "also"}])
    expect_error(
        recipe(tmp_path, [{"type": "jsonl", "path": src}], min_doc_tokens=10),
        "too_short: 2",
        "data.min_doc_tokens",
    )


def test_refuses_to_report_an_empty_dataset(tmp_path):
    src = write(tmp_path / "a.txt", "few tokens")
    expect_error(recipe(tmp_path, [{"type": "text", "path": src}], seq_length=64), "less than one row")


def test_tokenizer_without_separator(tmp_path, monkeypatch):
    import data_prep.prepare as prep

    def no_bos(name, **kw):
        tok = byte_tokenizer()
        tok.bos_token = None
        return tok

    monkeypatch.setattr(prep, "load_tokenizer", no_bos)
    src = write(tmp_path / "a.txt", "x" * 100)
    expect_error(recipe(tmp_path, [{"type": "text", "path": src}]), "no bos token", "data.separator")
    assert load(prepare(recipe(tmp_path, [{"type": "text", "path": src}], separator="eos")))[1]["counts"]


# --------------------------------------------------------------------------- writing
def test_atomic_write_and_is_prepared(tmp_path, monkeypatch):
    import data_prep.prepare as prep

    src = write(tmp_path / "a.txt", "y" * 100)
    r = recipe(tmp_path, [{"type": "text", "path": src}])
    assert not is_prepared(r)
    out = prepare(r)
    assert is_prepared(r) and out == r.data_dir
    before = (out / "manifest.json").read_text()
    assert prepare(r) == out and (out / "manifest.json").read_text() == before  # up to date: not redone

    def boom(splits):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prep, "_content_hash", boom)
    with pytest.raises(RuntimeError):
        prepare(r, force=True)
    assert (out / "manifest.json").read_text() == before and is_prepared(r)
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # no temporary folder left behind
    r2 = recipe(tmp_path, [{"type": "text", "path": src}], min_doc_tokens=2)
    assert not is_prepared(r2)
    with pytest.raises(RuntimeError):
        prepare(r2)
    assert (out / "manifest.json").read_text() == before
    monkeypatch.undo()
    prepare(r2)
    assert is_prepared(r2) and not is_prepared(r)


def test_cli(tmp_path, capsys):
    src = write(tmp_path / "a.txt", "z" * 100)
    rec = write(
        tmp_path / "r.yaml",
        f"run_dir: {tmp_path / 'run'}\nmodel: {{config: {{hidden_size: 8}}, tokenizer: byte}}\n"
        f"data: {{sources: [{{type: text, path: {src}}}]}}\n",
    )
    assert main([rec, "data.seq_length=10"]) == 0
    assert "train: 10 rows" in capsys.readouterr().out
    assert main([rec, "data.seq_length=1000"]) == 2
    assert "less than one row" in capsys.readouterr().err


def test_collator_pads():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [8], "labels": [8], "position_ids": [0]},
    ]
    b = DataCollator(pad_token_id=PAD, pad_to_multiple_of=4)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7, PAD], [8, PAD, PAD, PAD]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 2, 3]]


def test_num_proc_gives_the_same_result(tmp_path, monkeypatch):
    import data_prep.prepare as prep

    src = jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i} " * (1 + i % 5)} for i in range(24)])
    hashes = []
    for n in (1, 2):
        r = recipe(
            tmp_path / str(n),
            [{"type": "jsonl", "path": src}],
            num_proc=n,
            short_keep_prob=0.5,
            long_doc_tokens=20,
        )
        hashes.append(load(prepare(r))[1]["content_hash"])
    assert hashes[0] == hashes[1]

    def no_template(name, **kw):
        tok = byte_tokenizer()
        tok.chat_template = None
        return tok

    monkeypatch.setattr(prep, "load_tokenizer", no_template)
    bad = jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}] * 3)
    r = recipe(tmp_path / "s", [{"type": "jsonl", "path": bad}], format="sft", num_proc=2)
    expect_error(r, f"{bad}:1", "no chat template", "and 2 more")  # errors come back from the workers


def test_editing_a_source_file_invalidates_the_prepared_data(tmp_path, tiny_llama_config):
    from data_prep.prepare import is_prepared, prepare
    from finetune.recipe import validate

    src = tmp_path / "corpus.txt"
    src.write_text("to be or not to be, that is the question. " * 40)
    r = validate({"model": {"config": tiny_llama_config, "tokenizer": "byte"},
                  "data": {"sources": [{"type": "text", "path": str(src)}], "seq_length": 64,
                           "output_dir": str(tmp_path / "data")}})
    prepare(r)
    assert is_prepared(r)
    src.write_text("all that glitters is not gold. " * 60)
    assert not is_prepared(r)


def test_sft_eval_split_holds_whole_samples_never_trained_on(tmp_path):
    recs = [{"instruction": f"Q{i:03d}", "input": "", "output": f"A{i:03d}"} for i in range(30)]
    a = jsonl(tmp_path / "a.jsonl", recs)
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"R{i:03d}", "output": "ok"} for i in range(5)])
    sources = [{"type": "jsonl", "path": a}, {"type": "jsonl", "path": b, "weight": 3}]  # b repeated
    dd, m = load(prepare(recipe(tmp_path, sources, format="sft", seq_length=300, eval_fraction=0.2)))
    import re

    seen = {s: [x for r in dd[s]["input_ids"] for x in re.findall(r"[QR]\d{3}", bytes(t for t in r if t < 256).decode())]
            for s in dd}  # fmt: skip
    assert m["sources"][1]["drawn"]["passes"] > 1 and len(seen["eval"]) == len(set(seen["eval"]))
    assert seen["eval"] and not set(seen["train"]) & set(seen["eval"])
    assert len(seen["eval"]) == m["eval_split"]["documents"] == len(dd["eval"])

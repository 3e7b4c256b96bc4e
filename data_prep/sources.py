"""Data sources: a name -> loader table, and the normalisation of raw records.

A loader takes a `SourceSection` and yields `(where, record)` pairs: `where` is what an error
message names ("file.jsonl:12", "data.parquet record 7"), `record` a dict of raw fields.
`read_source` normalises the records for the data format and stores them as a `datasets.Dataset`
(`text` for pretrain; `instruction`/`input`/`output`/`messages` for SFT) with a `_where` column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from data_prep.assets import resolve_corpus
from data_prep.errors import DataError

Record = tuple[str, dict]


# --------------------------------------------------------------------------- loaders
def _files(path: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and (suffixes is None or p.name.endswith(suffixes))
        ]
        if not files:
            kinds = f" ({', '.join(suffixes)})" if suffixes else ""
            raise DataError(f"{path}: folder has no data files{kinds}")
        return files
    raise DataError(f"{path}: no such file or folder")


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}:{col}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert the file to UTF-8"
        ) from None


#: Control characters that do not occur in text (NUL and the C0 controls other than tab,
#: newline, carriage return and form feed): a file made of them is binary, not a document.
_BINARY = re.compile("[\x00-\x08\x0b\x0e-\x1f]")


def check_text(path: Path, text: str) -> str:
    """Refuse a "text" file that is binary: NUL bytes, or more than 1% control characters
    (valid UTF-8 such as a file of zeros would otherwise be tokenized and trained on)."""
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise DataError(f"{path}:{line}: NUL byte at character {nul}: a binary file, not text; "
                        "remove it from the text source")  # fmt: skip
    controls = len(_BINARY.findall(text))
    if text and controls > 0.01 * len(text):
        raise DataError(f"{path}: {controls} of {len(text)} characters are control characters: a binary "
                        "file, not text; remove it from the text source")  # fmt: skip
    return text


def load_text(src) -> Iterator[Record]:
    """A text file, or every non-hidden file under a folder: one document per file."""
    for f in _files(Path(src.path), None):
        yield str(f), {src.text_field: check_text(f, read_utf8(f))}


def load_jsonl(src) -> Iterator[Record]:
    """JSON Lines file(s) (`*.jsonl`, `*.json` under a folder); blank lines are ignored."""
    for f in _files(Path(src.path), (".jsonl", ".json")):
        # split on "\n" only: str.splitlines also breaks at U+2028/U+2029/U+0085, which JSON
        # allows unescaped inside strings (a valid record would be cut in two)
        for lineno, line in enumerate(read_utf8(f).split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            where = f"{f}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(rec).__name__}")
            yield where, rec


def _rows(ds, origin: str) -> Iterator[Record]:
    for i, rec in enumerate(ds):
        yield f"{origin} record {i}", rec


def load_parquet(src) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in _files(Path(src.path), (".parquet",)):
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read as parquet: {e}") from None
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield f"{f} record {i}", rec
                i += 1


def load_disk(src) -> Iterator[Record]:
    """A dataset written by `datasets` `save_to_disk` (a Dataset, or a DatasetDict and `split`)."""
    import datasets

    path = Path(src.path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (type disk expects a `save_to_disk` folder)")
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise DataError(
                f"{path}: no split '{src.split}' (splits: {', '.join(ds)}); set the source's split"
            )
        ds = ds[src.split]
    yield from _rows(ds, f"{path}[{src.split}]")


def load_hub(src) -> Iterator[Record]:
    """A Hub dataset name (needs network or the local `datasets` cache)."""
    import datasets

    ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    yield from _rows(ds, f"hub:{src.path}[{src.split}]")


def load_corpus(src) -> Iterator[Record]:
    """A bundled corpus alias (`data_prep.assets.CORPORA`); documents carry `text`."""
    for doc in resolve_corpus(src.path):
        rec = dict(doc)
        if src.text_field != "text":
            rec[src.text_field] = rec["text"]
        yield doc.get("path", src.path), rec


def load_synthetic_retrieval(src) -> Iterator[Record]:
    """Generated passkey / needle documents (`data_prep.synthetic`); `text` only, named by `path`."""
    from data_prep.synthetic import documents

    for where, rec in documents(src.synthetic, label=src.path):
        yield where, {src.text_field: rec["text"]}


#: source type (SourceSection.type) -> loader
LOADERS: dict[str, Callable[..., Iterator[Record]]] = {
    "text": load_text,
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "disk": load_disk,
    "hub": load_hub,
    "corpus": load_corpus,
    "synthetic_retrieval": load_synthetic_retrieval,
}


# --------------------------------------------------------------------------- normalisation
def _missing(where: str, field: str, rec: dict, key: str) -> DataError:
    have = ", ".join(sorted(map(str, rec))) or "none"
    return DataError(f"{where}: missing field '{field}' (fields: {have}); set {key}")


def pretrain_record(where: str, rec: dict, src) -> dict:
    if src.text_field not in rec:
        raise _missing(where, src.text_field, rec, "the source's text_field")
    text = rec[src.text_field]
    if text is None:
        text = ""  # counted as an empty document
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{src.text_field}' must be a string, got {type(text).__name__}")
    return {"text": text, "_where": where}


def sft_record(where: str, rec: dict, data) -> dict:
    """Chat (`messages_field`: list of {role, content}) or LongAlpaca (instruction/input/output)."""
    if data.messages_field in rec:
        msgs = rec[data.messages_field]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: '{data.messages_field}' must be a non-empty list of messages")
        for j, m in enumerate(msgs):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise DataError(
                    f"{where}: message {j} of '{data.messages_field}' needs string 'role' and 'content'"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: '{data.messages_field}' has no assistant message to learn from")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return {"instruction": "", "input": "", "output": "", "messages": json.dumps(msgs), "_where": where}
    out = {"messages": "", "_where": where}
    for name, field, required in (
        ("instruction", data.instruction_field, True),
        ("input", data.input_field, False),
        ("output", data.output_field, True),
    ):
        value = rec.get(field)
        if value is None:
            if required:
                raise _missing(
                    where, field, rec, f"data.{name}_field (or data.messages_field for chat records)"
                )
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        out[name] = value
    return out


def read_source(src, data, scratch: Path):
    """The source's records, normalised for `data.format`, as a `datasets.Dataset`."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if data.format == "sft" and src.type in ("text", "corpus", "synthetic_retrieval"):
        raise DataError(
            f"source {src.path}: type '{src.type}' has plain documents; data.format 'sft' needs records "
            "(jsonl, parquet, disk or hub) with instruction/output or messages fields"
        )

    seen = [0]

    def gen():
        for where, rec in LOADERS[src.type](src):
            seen[0] += 1
            yield (
                pretrain_record(where, rec, src)
                if data.format == "pretrain"
                else sft_record(where, rec, data)
            )

    if data.format == "pretrain":
        features = datasets.Features({"text": datasets.Value("string"), "_where": datasets.Value("string")})
    else:
        features = datasets.Features(
            {k: datasets.Value("string") for k in ("instruction", "input", "output", "messages", "_where")}
        )
    try:
        return datasets.Dataset.from_generator(gen, features=features, cache_dir=str(scratch))
    except ValueError as e:
        if seen[0] == 0 and not isinstance(e, DataError):  # datasets refuses an empty generator
            raise DataError(f"source {src.path} ({src.type}): no records") from None
        raise
    except DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise

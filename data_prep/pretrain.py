"""Pretraining-style data: tokenize documents, pack them into fixed-length rows.

Documents are joined into one token stream, each with a separator (`bos` before it, as LongGen
does; `eos` after it; or `none`), and the stream is cut into rows of `seq_length` tokens. A
document longer than the room left continues on the next row; the last, partial row is
dropped (its tokens are counted in the manifest). `position_ids` count from 0 at the start of
every document and at the start of every row: attention kernels find document boundaries from
these resets. `labels` equal `input_ids` (the model shifts them).
"""

from __future__ import annotations

import numpy as np

from data_prep.errors import DataError


def separator_id(tokenizer, separator: str) -> int | None:
    """Token id placed between packed documents (`data.separator`), None for `none`."""
    if separator == "none":
        return None
    tid = tokenizer.bos_token_id if separator == "bos" else tokenizer.eos_token_id
    if tid is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"tokenizer '{name}' has no {separator} token, which data.separator='{separator}' needs; "
            f"set data.separator to {'eos' if separator == 'bos' else 'bos'} or none"
        )
    return int(tid)


def tokenize_documents(ds, tokenizer, num_proc: int, cache_file: str):
    """Adds `input_ids` (no special tokens; special-token text in a document stays text), `n`, `empty`."""

    def fn(batch):
        texts = batch["text"]
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return {"input_ids": ids, "n": [len(x) for x in ids], "empty": [not t.strip() for t in texts]}

    return ds.map(
        fn,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
        remove_columns=["text"],
        cache_file_name=cache_file,
        desc="tokenizing",
    )


def pack(
    values: np.ndarray,
    offsets: np.ndarray,
    order: np.ndarray,
    seq_length: int,
    sep: int | None,
    sep_after: bool = False,
):
    """Pack documents `values[offsets[j]:offsets[j+1]]` for j in `order` into rows of `seq_length`.

    Returns (input_ids [rows, seq_length], position_ids [rows, seq_length], segment lengths
    (document + separator, in stream order), tokens dropped from the partial last row).
    """
    order = np.asarray(order, dtype=np.int64)
    starts = offsets[order].astype(np.int64)
    lens = (offsets[order + 1] - offsets[order]).astype(np.int64)
    extra = 0 if sep is None else 1
    seg = lens + extra
    total = int(seg.sum())
    seg_start = np.zeros(len(seg), dtype=np.int64)
    if len(seg):
        seg_start[1:] = np.cumsum(seg)[:-1]
    stream = np.empty(total, dtype=np.int32)
    doc_mask = np.ones(total, dtype=bool)
    if sep is not None and len(seg):
        sep_pos = seg_start + lens if sep_after else seg_start
        stream[sep_pos] = sep
        doc_mask[sep_pos] = False
    # gather every document token: stream position p of doc k reads values[starts[k] + (p - first)]
    first = seg_start + (0 if (sep is None or sep_after) else 1)
    gather = np.repeat(starts - first, lens) + np.flatnonzero(doc_mask)
    stream[doc_mask] = values[gather]

    rows = total // seq_length
    kept = rows * seq_length
    reset = np.zeros(total, dtype=bool)
    reset[seg_start[lens + extra > 0]] = True
    reset[::seq_length] = True
    idx = np.arange(total, dtype=np.int64)
    pos = idx - np.maximum.accumulate(np.where(reset, idx, 0))
    input_ids = stream[:kept].reshape(rows, seq_length)
    position_ids = pos[:kept].astype(np.int32).reshape(rows, seq_length)
    return input_ids, position_ids, seg, total - kept

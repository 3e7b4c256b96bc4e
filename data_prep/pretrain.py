"""Pretraining-style data: tokenize documents, pack them into fixed-length rows.

Documents are joined into one token stream, each with a separator (`bos` before it, as LongGen
does; `eos` after it; or `none`), and the stream is cut into rows of `seq_length` tokens. A
document longer than the room left continues on the next row (`data.packing: split`, the
default), or, with `data.packing: whole`, a document that fits a row is never cut: retrieval
documents (a key far back, its question at the end) teach nothing once the key and the question
land in different rows. The last, partial row is dropped (its tokens are counted in the manifest). `position_ids` count from 0 at the start of
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
    order, lens, seg = _segments(offsets, order, sep)
    starts = offsets[order].astype(np.int64)
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

    reset = np.zeros(total, dtype=bool)
    reset[seg_start[seg > 0]] = True
    input_ids, position_ids, tail = _rows(stream, reset, seq_length)
    return input_ids, position_ids, seg, tail


def _segments(offsets: np.ndarray, order, sep: int | None):
    """(order as int64, document lengths, segment lengths: document + separator) in stream order."""
    order = np.asarray(order, dtype=np.int64)
    lens = (offsets[order + 1] - offsets[order]).astype(np.int64)
    return order, lens, lens + (0 if sep is None else 1)


def _rows(stream: np.ndarray, reset: np.ndarray, seq_length: int):
    """The stream cut into rows (the partial last one dropped) with positions that restart where
    ``reset`` is set and at every row: (input_ids, position_ids, tokens dropped)."""
    total = len(stream)
    rows = total // seq_length
    kept = rows * seq_length
    reset = reset.copy()
    reset[::seq_length] = True
    idx = np.arange(total, dtype=np.int64)
    pos = idx - np.maximum.accumulate(np.where(reset, idx, 0))
    return stream[:kept].reshape(rows, seq_length), pos[:kept].astype(np.int32).reshape(rows, seq_length), total - kept


def owners(seg: np.ndarray, rows: int, seq_length: int) -> np.ndarray:
    """`pack`'s rows as the index into ``order`` of the document each token belongs to."""
    return np.repeat(np.arange(len(seg), dtype=np.int64), seg)[: rows * seq_length].reshape(rows, seq_length)


def pack_whole(
    values: np.ndarray,
    offsets: np.ndarray,
    order: np.ndarray,
    seq_length: int,
    sep: int | None,
    sep_after: bool = False,
    pad: int = 0,
):
    """Like `pack`, but a document that fits a row (with its separator) is never cut.

    Documents that fit go in ``order``; when the next one does not fit the room left in a row,
    the room is filled from the stream of documents longer than a row (cut anywhere, as `pack`
    cuts), or with ``pad`` tokens once that stream is spent. After the last short document
    the rest of the long stream fills rows as `pack` would; the last partial row is dropped.
    Positions restart at every document, at every piece of a cut document and at every pad run,
    so attention never crosses them.

    Returns (input_ids, position_ids, owner, tokens dropped from the partial last row), where
    ``owner`` [rows, seq_length] is the index into ``order`` of each token's document, -1 for pad.
    """
    order, lens, seg = _segments(offsets, order, sep)
    short = seg <= seq_length
    long_ks = np.flatnonzero(~short)
    pieces: list[tuple[int, int, int]] = []  # (k into order or -1 = pad, start within segment, length)
    state = {"i": 0, "off": 0}

    def take_long(n: int) -> int:
        got = 0
        while got < n and state["i"] < len(long_ks):
            k = int(long_ks[state["i"]])
            m = min(n - got, int(seg[k]) - state["off"])
            pieces.append((k, state["off"], m))
            got += m
            state["off"] += m
            if state["off"] == seg[k]:
                state["i"] += 1
                state["off"] = 0
        return got

    room = seq_length
    for k in np.flatnonzero(short):
        n = int(seg[k])
        if n > room:
            got = take_long(room)
            if got < room:
                pieces.append((-1, 0, room - got))
            room = seq_length
        pieces.append((int(k), 0, n))
        room -= n
        if room == 0:
            room = seq_length
    take_long(int(seg[long_ks].sum()))  # everything left of the long stream

    pk = np.array([p[0] for p in pieces], dtype=np.int64).reshape(-1)
    p0 = np.array([p[1] for p in pieces], dtype=np.int64).reshape(-1)
    pn = np.array([p[2] for p in pieces], dtype=np.int64).reshape(-1)
    total = int(pn.sum())
    owner = np.repeat(pk, pn)
    piece_first = np.zeros(len(pn), dtype=np.int64)
    if len(pn):
        piece_first[1:] = np.cumsum(pn)[:-1]
    j = np.arange(total, dtype=np.int64) - np.repeat(piece_first - p0, pn)  # offset within the segment
    real = owner >= 0
    stream = np.full(total, pad, dtype=np.int32)
    ko, jo = owner[real], j[real]
    if sep is None:
        is_sep = np.zeros(len(ko), dtype=bool)
        within = jo
    elif sep_after:
        is_sep = jo == lens[ko]
        within = jo
    else:
        is_sep = jo == 0
        within = jo - 1
    vals = np.where(is_sep, 0, values[offsets[order[ko]] + np.where(is_sep, 0, within)])
    stream[real] = np.where(is_sep, sep if sep is not None else 0, vals).astype(np.int32)

    reset = np.zeros(total, dtype=bool)
    reset[piece_first[pn > 0]] = True
    reset[real] |= jo == 0  # a document starting inside a piece of the long stream
    input_ids, position_ids, tail = _rows(stream, reset, seq_length)
    return input_ids, position_ids, owner[: input_ids.size].reshape(input_ids.shape), tail

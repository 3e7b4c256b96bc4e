"""`prepare(recipe)`: the recipe's data sources -> a `datasets` dataset on disk + manifest.json.

    python -m data_prep.prepare RECIPE [section.key=value ...] [--force]

Writes `recipe.data_dir` (a `DatasetDict` saved with `save_to_disk`: `train`, and `eval` when
`data.eval_fraction` > 0: whole documents chosen per source before packing and before the
mixture repeats any, so no document is in both splits) and `manifest.json` beside it. The result is built in a temporary
folder next to the destination and renamed into place, so a failure never leaves a partial
dataset where training looks for one. See docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.assets import load_tokenizer
from data_prep.errors import DataError
from data_prep.mixture import choose_eval_documents, draw_mixture, length_upsample
from data_prep.pretrain import owners, pack, pack_whole, separator_id, tokenize_documents
from data_prep.sft import IGNORE, tokenize_samples
from data_prep.sources import read_source
from finetune.rundir import swap_in

MANIFEST = "manifest.json"
#: 2: the eval split holds whole documents chosen before packing and the mixture (1: packed rows).
MANIFEST_VERSION = 2
#: Held-out documents named per source in the manifest (`sources[].eval.where`), at most.
EVAL_WHERE_LISTED = 200


# --------------------------------------------------------------------------- identity
def tokenizer_name(recipe) -> str:
    name = recipe.model.tokenizer or recipe.model.name_or_path
    if name is None:
        raise DataError("model.config builds a model without a tokenizer: set model.tokenizer (e.g. `byte`)")
    return name


def data_hash(recipe) -> str:
    """Hash of everything that decides the prepared data (not where it is written or how fast)."""
    spec = {
        "version": MANIFEST_VERSION,
        "data": recipe.data.model_dump(mode="json", exclude={"output_dir", "num_proc"}),
        "seq_length": recipe.seq_length,
        "tokenizer": tokenizer_name(recipe),
        "seed": recipe.seed,
        "files": _local_file_stamps(recipe),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _local_file_stamps(recipe) -> list:
    """Size and mtime of local source files, so editing a file re-prepares the data."""
    stamps = []
    for src in recipe.data.sources:
        if src.type in ("hub", "corpus", "synthetic_retrieval"):
            continue
        p = Path(src.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            stamps.append([str(f), st.st_size, st.st_mtime_ns])
    return stamps


def is_prepared(recipe) -> bool:
    """True when `recipe.data_dir` holds a dataset prepared from this recipe's data settings."""
    path = Path(recipe.data_dir)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return manifest.get("data_hash") == data_hash(recipe) and (path / "dataset_dict.json").is_file()
    except (OSError, ValueError):  # no manifest, unreadable manifest, or a recipe prepare would reject
        return False


# --------------------------------------------------------------------------- helpers
def _col(ds, name) -> np.ndarray:
    return ds.data.column(name).to_numpy(zero_copy_only=False)


def _lists(ds, name):
    """(values, offsets) of a list column: row j is values[offsets[j]:offsets[j+1]]."""
    arr = ds.data.column(name).combine_chunks()
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return values, offsets


def _flat(ds, name) -> np.ndarray:
    """All rows of a list column, concatenated."""
    values, offsets = _lists(ds, name)
    return values[offsets[0] : offsets[-1]]


def _histogram(lengths: np.ndarray) -> list[dict]:
    """Counts in power-of-two bins [2^k, 2^(k+1))."""
    if not len(lengths):
        return []
    k = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    counts = np.bincount(k)
    return [{"min": 2**i, "max": 2 ** (i + 1) - 1, "count": int(c)} for i, c in enumerate(counts) if c]


def _list_array(values: np.ndarray, lengths: np.ndarray):
    import pyarrow as pa

    large = int(np.sum(lengths)) >= 2**31  # list offsets are int32 unless the split is that big
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(lengths, out=offsets[1:])
    kind = pa.LargeListArray if large else pa.ListArray
    return kind.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(values, dtype=np.int32)))


def _table(columns: dict):
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(pa.table(columns)))


def _content_hash(splits: dict) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        h.update(split.encode())
        for name in ("input_ids", "labels", "position_ids"):
            values, offsets = _lists(splits[split], name)
            h.update(name.encode())
            h.update(np.ascontiguousarray(offsets - offsets[0], dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(values[offsets[0] : offsets[-1]], dtype=np.int32).tobytes())
    return h.hexdigest()


def _capped_rows(train_rows: int, eval_rows: int, data) -> tuple[int, int]:
    """(train rows, eval rows) kept: `max_sequences` caps train, and eval keeps its share
    (`eval_fraction`) of the capped train set."""
    n_train, n_eval = train_rows, eval_rows
    if data.max_sequences is not None and data.max_sequences < n_train:
        n_train = data.max_sequences
        f = data.eval_fraction
        if f > 0:
            n_eval = min(n_eval, max(1, round(n_train * f / (1 - f))))
    return n_train, n_eval


# --------------------------------------------------------------------------- per source
def _read(recipe, tokenizer, scratch: Path, progress):
    """Read, normalise and tokenize every source; per-source kept indices and report."""
    data = recipe.data
    rng = np.random.default_rng(recipe.seed)
    out = []
    for i, src in enumerate(progress(data.sources, desc="sources", unit="source")):
        ds = read_source(src, data, scratch / f"src{i}")
        cache = str(scratch / f"tok{i}.arrow")
        if data.format == "pretrain":
            tok = tokenize_documents(ds, tokenizer, data.num_proc, cache)
            n = _col(tok, "n").astype(np.int64)
            status = np.full(len(n), "", dtype=object)
            status[n < data.min_doc_tokens] = "too_short"
            status[_col(tok, "empty").astype(bool)] = "empty"
            up = length_upsample(n, data.long_doc_tokens, data.short_keep_prob, rng)
            status[(status == "") & ~up] = "short_downsampled"
        else:
            tok = tokenize_samples(ds, tokenizer, data, recipe.seq_length, data.num_proc, cache)
            errors = [e for e in _col(tok, "error") if e]
            if errors:
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise DataError(errors[0] + more)
            n = _col(tok, "n").astype(np.int64)
            status = _col(tok, "status").astype(object)
        kept = np.flatnonzero(status == "")
        skipped = {}
        for reason in sorted(set(status[status != ""])):
            sel = status == reason
            skipped[reason] = {"docs": int(sel.sum()), "tokens": int(n[sel].sum())}
        report = {
            "type": src.type,
            "path": src.path,
            "split": src.split,
            "text_field": src.text_field,
            "weight": src.weight,
            "records": len(n),
            "kept": {"docs": len(kept), "tokens": int(n[kept].sum())},
            "skipped": skipped,
        }
        if not len(kept):
            why = ", ".join(f"{r}: {v['docs']}" for r, v in skipped.items()) or "no records"
            hint = {
                "too_short": "lower data.min_doc_tokens",
                "short_downsampled": "raise data.short_keep_prob or lower data.long_doc_tokens",
                "overlong": "raise seq_length or set data.overlong: truncate",
            }
            hints = "; ".join(hint[r] for r in skipped if r in hint)
            raise DataError(
                f"source {src.path} ({src.type}): no usable {'documents' if data.format == 'pretrain' else 'samples'}"
                f" out of {len(n)} ({why})" + (f"; {hints}" if hints else "")
            )
        out.append((tok, n, kept, report))
    return out, rng


# --------------------------------------------------------------------------- build
def _pack(values, offsets, order, seq_length, sep, data, tokenizer):
    """`pack` or `pack_whole` by `data.packing`, as a dict: ids, pos, owner (each token's index
    into ``order``, -1 for padding), docs (documents packed), tokens (theirs, with separators),
    tail (tokens dropped from the partial last row)."""
    sep_after = data.separator == "eos"
    order = np.asarray(order, dtype=np.int64)
    if data.packing == "whole":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep if sep is not None else 0)
        ids, pos, owner, tail = pack_whole(values, offsets, order, seq_length, sep, sep_after, int(pad))
    else:
        ids, pos, seg, tail = pack(values, offsets, order, seq_length, sep, sep_after)
        owner = owners(seg, len(ids), seq_length)
    tokens = int((offsets[order + 1] - offsets[order]).sum()) + (0 if sep is None else len(order))
    return {"ids": ids, "pos": pos, "owner": owner, "docs": len(order), "tokens": tokens, "tail": int(tail)}


def _documents_started(owner: np.ndarray, n_rows: int) -> int:
    """Documents whose first packed token is in the first ``n_rows`` rows."""
    flat = owner.ravel()
    docs, first = np.unique(flat, return_index=True)
    return int(((docs >= 0) & (first < n_rows * owner.shape[1])).sum())


def build(recipe, scratch: Path, progress=None) -> tuple[dict, dict]:
    """The prepared splits (name -> Dataset) and the manifest, without writing anything final."""
    if progress is None:
        from tqdm.auto import tqdm as progress
    data = recipe.data
    if not data.sources:
        raise DataError("data.sources is empty: add at least one source (see docs/data.md)")
    seq_length = recipe.seq_length
    tok_name = tokenizer_name(recipe)
    tokenizer = load_tokenizer(tok_name, trust_remote_code=recipe.model.trust_remote_code)
    sep = separator_id(tokenizer, data.separator) if data.format == "pretrain" else None

    sources, rng = _read(recipe, tokenizer, scratch, progress)
    reports = [r for *_, r in sources]

    # eval split: whole documents per source, chosen before packing and before the mixture
    # draw (which may repeat documents), so no document is in both splits
    kept_tokens = sum(int(n[kept].sum()) for _, n, kept, _ in sources)
    held, train_kept = [], []
    for (tok, n, kept, report), src in zip(sources, data.sources):
        # pretrain: enough eval tokens overall for one packed row, shared by token count
        floor = seq_length * int(n[kept].sum()) / max(1, kept_tokens) if data.format == "pretrain" else 0
        if src.type == "synthetic_retrieval":  # training-only: retrieval has its own eval suites
            mask = np.zeros(len(kept), dtype=bool)
        else:
            mask = choose_eval_documents(n[kept], data.eval_fraction, floor, rng)
        if data.eval_fraction > 0 and not mask.any() and src.type != "synthetic_retrieval":
            raise DataError(
                f"source {src.path} ({src.type}) has {len(kept)} usable document(s): the eval split holds "
                "out whole documents and needs at least 2; add documents (e.g. split the file) or set "
                "data.eval_fraction: 0 and give eval.perplexity_source"
            )
        held.append(kept[mask])
        train_kept.append(kept[~mask])
        where = _col(tok, "_where")
        report["eval"] = {
            "docs": int(mask.sum()),
            "tokens": int(n[kept[mask]].sum()),
            "where": [str(where[j]) for j in sorted(kept[mask])[:EVAL_WHERE_LISTED]],
        }

    # mixture: global document ids over the concatenated sources, drawn per source, then shuffled
    values_all, offsets_all, base = [], [], 0
    order_parts, src_parts, eval_parts, eval_src_parts = [], [], [], []
    draws = draw_mixture([n[tk] for (_, n, _, _), tk in zip(sources, train_kept)], [s.weight for s in data.sources], rng)
    for i, ((tok, n, kept, report), tk, ho, drawn) in enumerate(zip(sources, train_kept, held, draws)):
        picked = tk[drawn]
        report["drawn"] = {
            "docs": len(picked),
            "tokens": int(n[picked].sum()),
            "passes": round(float(n[picked].sum()) / max(1, int(n[tk].sum())), 4),
        }
        values, offsets = _lists(tok, "input_ids")
        offsets_all.append(offsets[:-1] - offsets[0] + sum(len(v) for v in values_all))
        values_all.append(values[offsets[0] : offsets[-1]].astype(np.int32))
        order_parts.append(picked + base)
        src_parts.append(np.full(len(picked), i, dtype=np.int16))
        eval_parts.append(ho + base)
        eval_src_parts.append(np.full(len(ho), i, dtype=np.int16))
        base += len(n)
    values = np.concatenate(values_all)
    offsets = np.append(np.concatenate(offsets_all), len(values)).astype(np.int64)
    perm = rng.permutation(sum(len(p) for p in order_parts))
    order = {"train": np.concatenate(order_parts)[perm]}
    src_of = {"train": np.concatenate(src_parts)[perm]}
    eperm = rng.permutation(sum(len(p) for p in eval_parts))
    if len(eperm):
        order["eval"] = np.concatenate(eval_parts)[eperm]
        src_of["eval"] = np.concatenate(eval_src_parts)[eperm]
    kept_lengths = np.concatenate([n[kept] for _, n, kept, _ in sources])

    totals: dict = {"seq_length": seq_length}
    splits = {}
    if data.format == "pretrain":
        packed = {name: _pack(values, offsets, o, seq_length, sep, data, tokenizer) for name, o in order.items()}
        rows = {name: len(p["ids"]) for name, p in packed.items()}
        if rows["train"] == 0:
            raise DataError(
                f"the training documents hold {packed['train']['tokens']} tokens (with separators), less "
                f"than one row of seq_length={seq_length}; add data or lower data.seq_length"
            )
        if "eval" in rows and rows["eval"] == 0:
            raise DataError(
                f"the eval documents hold {packed['eval']['tokens']} tokens, less than one row of "
                f"seq_length={seq_length}; raise data.eval_fraction or add data"
            )
        n_train, n_eval = _capped_rows(rows["train"], rows.get("eval", 0), data)
        for name, n_rows in (("train", n_train), ("eval", n_eval)):
            if name not in packed:
                continue
            p = packed[name]
            input_ids, position_ids, owner, tail = p["ids"], p["pos"], p["owner"], p["tail"]
            sl = slice(0, n_rows)
            row_src = np.where(owner >= 0, src_of[name][np.maximum(owner, 0)], -1)
            ids = input_ids[sl]
            lens = np.full(len(ids), seq_length, dtype=np.int64)
            labels = np.where(owner[sl] >= 0, ids, IGNORE).astype(np.int32)
            splits[name] = _table(
                {
                    "input_ids": _list_array(ids.ravel(), lens),
                    "labels": _list_array(labels.ravel(), lens),
                    "position_ids": _list_array(position_ids[sl].ravel(), lens),
                }
            )
            for i, report in enumerate(reports):
                report[f"tokens_{name}"] = int((row_src[sl] == i).sum())
            totals[f"{name}_tokens"] = int(ids.size)
            totals[f"{name}_documents_started"] = _documents_started(owner, n_rows)
            totals[f"{name}_tail_tokens_dropped"] = int(tail)
            if data.packing == "whole":
                totals[f"{name}_pad_tokens"] = int((owner[sl] < 0).sum())
        totals["separator_tokens"] = 0 if sep is None else sum(p["docs"] for p in packed.values())
        totals["tail_tokens_dropped"] = sum(p["tail"] for p in packed.values())
        totals["rows_packed"] = sum(rows.values())
        totals["rows_dropped_by_max_sequences"] = totals["rows_packed"] - n_eval - n_train
    else:
        n_train, n_eval = _capped_rows(len(order["train"]), len(order.get("eval", [])), data)
        lab_values = np.concatenate([_flat(tok, "labels") for tok, *_ in sources]).astype(np.int32)
        for name, n_rows in (("train", n_train), ("eval", n_eval)):
            if name not in order:
                continue
            docs, srcs = order[name][:n_rows], src_of[name][:n_rows]
            lens = offsets[docs + 1] - offsets[docs]
            gather = np.repeat(offsets[docs] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(
                int(lens.sum())
            )
            labels = lab_values[gather]
            pos = np.arange(int(lens.sum())) - np.repeat(np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
            splits[name] = _table(
                {
                    "input_ids": _list_array(values[gather], lens),
                    "labels": _list_array(labels, lens),
                    "position_ids": _list_array(pos, lens),
                }
            )
            for i, report in enumerate(reports):
                report[f"tokens_{name}"] = int(lens[srcs == i].sum())
            totals[f"{name}_tokens"] = int(lens.sum())
            totals[f"{name}_label_tokens"] = int((labels != IGNORE).sum())
        totals["rows_dropped_by_max_sequences"] = len(order["train"]) + len(order.get("eval", [])) - n_eval - n_train

    for name, ds in splits.items():
        if len(ds) == 0:  # _split_rows makes this impossible; kept as the last line of defence
            raise DataError(f"split '{name}' is empty; refusing to write an empty dataset")
    manifest = {
        "version": MANIFEST_VERSION,
        "format": data.format,
        "data_hash": data_hash(recipe),
        "seed": recipe.seed,
        "seq_length": seq_length,
        "separator": data.separator if data.format == "pretrain" else None,
        "tokenizer": {"name": tok_name, "vocab_size": len(tokenizer), "class": type(tokenizer).__name__},
        "sources": reports,
        "counts": {name: len(ds) for name, ds in splits.items()},
        "eval_split": {
            "by": "document",
            "fraction": data.eval_fraction,
            "documents": int(sum(len(h) for h in held)),
        },
        "tokens": totals,
        "length_histogram": _histogram(kept_lengths),
        "content_hash": _content_hash(splits),
    }
    return splits, manifest


def prepare(recipe, force: bool = False) -> Path:
    """Prepare the recipe's data into `recipe.data_dir` (skipped when already prepared; `force` redoes it)."""
    import datasets

    out = Path(recipe.data_dir)
    if not force and is_prepared(recipe):
        return out
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise DataError(
            f"{out} exists and is not a prepared dataset; refusing to replace it (set data.output_dir)"
        )
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        scratch = tmp / "scratch"
        scratch.mkdir()
        splits, manifest = build(recipe, scratch)
        dataset = tmp / "dataset"
        datasets.DatasetDict(splits).save_to_disk(str(dataset))
        manifest["seconds"] = round(time.time() - start, 2)
        (dataset / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_in(dataset, out)  # the old dataset is deleted only after the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def summary(path: Path) -> str:
    m = json.loads((Path(path) / MANIFEST).read_text())
    lines = [f"{path}: {m['format']}, seq_length {m['seq_length']}, tokenizer {m['tokenizer']['name']}"]
    for split, rows in m["counts"].items():
        lines.append(f"  {split}: {rows} rows, {m['tokens'][f'{split}_tokens']} tokens")
    if m.get("eval_split"):
        lines.append(f"  eval split: {m['eval_split']['documents']} whole documents, none of them in train")
    for s in m["sources"]:
        skipped = ", ".join(f"{r} {v['docs']}" for r, v in s["skipped"].items()) or "none"
        lines.append(
            f"  source {s['type']}:{s['path']}: kept {s['kept']['docs']}/{s['records']} "
            f"({s['kept']['tokens']} tokens), drawn {s['drawn']['tokens']} tokens, skipped: {skipped}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from finetune.recipe import RecipeError, load_recipe

    p = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--force", action="store_true", help="prepare again even if the data is up to date")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        was = not args.force and is_prepared(recipe)
        path = prepare(recipe, force=args.force)
    except (DataError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if was:
        print(f"{path}: already prepared (use --force to redo)")
    print(summary(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

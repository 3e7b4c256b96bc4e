"""Evaluation text: where it comes from and whether training saw it.

Every suite reads its text through ``eval_text`` (one ``EvalText``: documents, where they came
from, whether training saw them); no suite reads a data source itself. Order of preference:
1. ``eval.perplexity_source`` (a data source like any other, e.g. the user's own text file or
   folder; overlap with training unchecked). A source that cannot be read, is empty, binary or
   not UTF-8 is an ``EvalError`` naming the key and the file, never a silent skip;
2. the prepared dataset's ``eval`` split (``data.eval_fraction`` > 0, ``<data_dir>/manifest.json``
   counts it), decoded back to text with the dataset's tokenizer (document separators become
   blank lines). Data prepared by this version chooses the eval documents before packing and
   before mixture repetition (manifest ``eval_split.by == "document"``): no document is on both
   sides. Older manifests split packed rows: the text is then not called held out when a
   document may straddle the boundary or the mixture repeated a source;
3. the recipe's first data source (e.g. corpus ``shakespeare``): ``longtune prepare`` records
   per-source counts but not which documents went into training rows, so this text may have
   been trained on, and summary.md says so;
4. no source: the bundled ``shakespeare`` corpus.
Sources are read with ``data_prep.sources.LOADERS`` (the readers of ``longtune prepare``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import EvalError

#: Characters read at most from a source (tokenizing more is wasted when windows are capped).
MAX_CHARS = 20_000_000


@dataclass
class EvalText:
    documents: list[str]
    description: str
    held_out: bool | None  # True: unseen by training; False: may overlap; None: no text
    note: str | None = None
    names: list[str] = field(default_factory=list)


def _record_text(rec: dict, text_field: str) -> str | None:
    v = rec.get(text_field)
    if isinstance(v, str):
        return v
    parts = [rec.get(k) for k in ("instruction", "input", "output")]
    if any(isinstance(p, str) and p for p in parts):
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    return None


def read_source(src, strict: bool = False) -> list[tuple[str, str]]:
    """``[(where, text)]`` of a ``SourceSection``. ``strict`` (a user's own text): an empty or
    binary (NUL bytes) document is a ``ValueError`` naming it instead of being skipped."""
    from data_prep.sources import LOADERS

    out, total = [], 0
    for where, rec in LOADERS[src.type](src):
        text = _record_text(rec, src.text_field)
        if strict:
            if text is None or not text.strip():
                raise ValueError(f"{where} is empty (no text to evaluate on)")
            if "\x00" in text:
                raise ValueError(f"{where} is binary (NUL bytes), not text")
        if text:
            out.append((str(where), text))
            total += len(text)
            if total >= MAX_CHARS:
                break
    return out


def data_dir(run_dir: Path, recipe) -> Path:
    if recipe is not None and recipe.data.output_dir:
        return Path(recipe.data.output_dir)
    return run_dir / "data"


def _manifest(d: Path) -> dict | None:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def repeated_sources(manifest: dict) -> list[str]:
    """Sources the mixture drew more than once (manifest `drawn.passes` > 1): the same document
    can then sit in a train row and in an eval row, so the eval split is not held out."""
    out = []
    for s in manifest.get("sources") or []:
        passes = (s.get("drawn") or {}).get("passes") or 0
        if passes > 1:
            out.append(f"{s.get('type')}:{s.get('path')}")
    return out


def held_out_split(d: Path, manifest: dict, max_tokens: int | None = None) -> list[str]:
    """The prepared ``eval`` split decoded to text (one string: the rows are contiguous)."""
    import datasets

    from data_prep.assets import load_tokenizer

    tok = load_tokenizer(manifest["tokenizer"]["name"])
    rows = datasets.load_from_disk(str(d))["eval"]["input_ids"]
    ids: list[int] = []
    for r in rows:
        ids.extend(int(t) for t in r)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    docs, cur = [], []
    for t in ids:
        if t in special:
            if cur:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        docs.append(cur)
    return ["\n\n".join(tok.decode(c, skip_special_tokens=True) for c in docs)]


def eval_text(run_dir: Path, recipe, max_tokens: int | None = None) -> EvalText | None:
    """The evaluation documents (documents empty, with the reason in ``note``, when none can be
    read; an unusable ``eval.perplexity_source`` raises ``EvalError``)."""
    if recipe is not None and recipe.eval.perplexity_source is not None:
        src = recipe.eval.perplexity_source
        return _from_source(
            src,
            "eval.perplexity_source",
            True,
            "separate evaluation source (eval.perplexity_source); its overlap with training is not checked",
            strict=True,
        )
    fallback_note = None
    d = data_dir(run_dir, recipe)
    man = _manifest(d)
    if man and (man.get("counts") or {}).get("eval"):
        try:
            docs = held_out_split(d, man, max_tokens)
            n = man["counts"]["eval"]
            where = f"{d}, {n} rows of {man.get('seq_length')} tokens, data hash {str(man.get('data_hash'))[:12]}"
            split = man.get("eval_split") or {}
            if split.get("by") == "document":
                named = [w for s in man.get("sources") or [] for w in (s.get("eval") or {}).get("where", [])]
                shown = ", ".join(Path(w).name if "/" in w else w for w in named[:5])
                more = f" and {len(named) - 5} more" if len(named) > 5 else ""
                return EvalText(
                    docs,
                    f"held-out eval split of the prepared data ({where}; {split.get('documents')} whole documents"
                    + (f": {shown}{more}" if shown else "") + ")",
                    True,
                    "documents chosen for the eval split before packing and before mixture repetition "
                    "(data.eval_fraction): no document of this text is in a training row",
                )
            repeated = repeated_sources(man)
            return EvalText(
                docs,
                f"eval split of the prepared data ({where})",
                False,
                "rows of an eval split prepared by an older longtune, which split packed rows: a document "
                "cut at the boundary is on both sides"
                + (f", and the mixture drew {', '.join(repeated)} more than once" if repeated else "")
                + ", so perplexity may be optimistic. Run `longtune prepare --force` for a split by document.",
            )
        except Exception as e:  # noqa: BLE001 - fall back to the source, say why
            fallback_note = f"the eval split in {d} could not be read ({type(e).__name__}: {e})"
    if recipe is not None and recipe.data.sources:
        src = recipe.data.sources[0]
        why = fallback_note or (
            f"no held-out split (prepared data in {d} has no eval rows)"
            if man
            else f"no prepared data manifest in {d}"
        )
        return _from_source(
            src,
            "data.sources[0]",
            False,
            f"this is the training data source and {why}; the manifest does not record which "
            "documents training used, so this text may have been seen in training (perplexity "
            "is then optimistic). Set data.eval_fraction or eval.perplexity_source for held-out text.",
        )
    from finetune.recipe import SourceSection

    return _from_source(
        SourceSection(type="corpus", path="shakespeare"),
        "bundled corpus (the recipe has no data source)",
        None,
        "bundled demo corpus; the recipe names no data source, overlap unknown",
    )


def _from_source(src, origin: str, held_out: bool | None, note: str, strict: bool = False) -> EvalText:
    try:
        docs = read_source(src, strict)
    except Exception as e:  # noqa: BLE001 - reported in the summary (or refused, for the user's own text)
        if strict:
            raise EvalError(f"{origin} ({src.type}: {src.path}) cannot be used: {e}") from None
        return EvalText(
            [], f"{src.type}:{src.path}", None, f"could not read {origin} ({src.type}:{src.path}): {e}"
        )
    if not docs:
        if strict:
            raise EvalError(f"{origin} ({src.type}: {src.path}) has no text")
        return EvalText([], f"{src.type}:{src.path}", None, f"{origin} ({src.type}:{src.path}) has no text")
    return EvalText(
        [t for _, t in docs],
        f"{src.type}:{src.path} ({origin}, {len(docs)} documents)",
        held_out,
        note,
        [w for w, _ in docs],
    )


def token_stream(
    tokenizer, documents: list[str], max_tokens: int | None = None, progress: bool = False
) -> torch.Tensor:
    """Documents tokenized and concatenated (BOS first, EOS between documents), up to max_tokens."""
    ids: list[int] = []
    bos_id = getattr(tokenizer, "bos_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if bos_id is not None:
        ids.append(bos_id)
    from tqdm.auto import tqdm

    for k, doc in enumerate(tqdm(documents, desc="tokenizing", leave=False, disable=not progress)):
        if k and eos_id is not None:
            ids.append(eos_id)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return torch.tensor(ids, dtype=torch.long)


def tokens_needed(cfg) -> int | None:
    """Tokens the perplexity protocols can use at most (None = unbounded)."""
    if cfg.perplexity_max_windows is None:
        return None
    Lmax = max(cfg.lengths)
    long_ = Lmax + cfg.perplexity_stride * (cfg.perplexity_max_windows - 1)
    slide = Lmax + (getattr(cfg, "perplexity_sliding_stride", None) or Lmax // 2) * cfg.perplexity_max_windows
    return max(long_, slide)

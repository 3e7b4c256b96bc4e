"""Evaluation text: where it comes from and whether training saw it.

Order: ``eval.perplexity_source``, else the recipe's first data source, else the bundled
``shakespeare`` corpus, else (perplexity skipped) synthetic filler for needle only. Sources are
read with ``data_prep.sources.LOADERS`` (the same readers as ``longtune prepare``).

Held-out text: when the prepared dataset's manifest (``<data_dir>/manifest.json``) lists the
documents used for training (``train_documents``) or held out (``eval_documents`` /
``held_out_documents``) by ``where``/title/path, documents training did not see are used
first; when it does not, the summary says that the text may overlap the training data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


def read_source(src) -> list[tuple[str, str]]:
    """``[(where, text)]`` of a ``SourceSection``."""
    from data_prep.sources import LOADERS

    out, total = [], 0
    for where, rec in LOADERS[src.type](src):
        text = _record_text(rec, src.text_field)
        if text:
            out.append((str(where), text))
            total += len(text)
            if total >= MAX_CHARS:
                break
    return out


def _manifest(run_dir: Path, recipe) -> dict | None:
    cands = []
    if recipe is not None and recipe.data.output_dir:
        cands.append(Path(recipe.data.output_dir))
    cands.append(run_dir / "data")
    for d in cands:
        f = d / "manifest.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def _names(v) -> set[str]:
    if not isinstance(v, list):
        return set()
    out = set()
    for x in v:
        if isinstance(x, str):
            out.add(x)
        elif isinstance(x, dict):
            out |= {str(x[k]) for k in ("where", "title", "path") if k in x}
    return out


def eval_text(run_dir: Path, recipe) -> EvalText | None:
    """The evaluation documents (None when no source can be read)."""
    src, origin = None, None
    if recipe is not None and recipe.eval.perplexity_source is not None:
        src, origin = recipe.eval.perplexity_source, "eval.perplexity_source"
    elif recipe is not None and recipe.data.sources:
        src, origin = recipe.data.sources[0], "data.sources[0]"
    if src is None:
        from finetune.recipe import SourceSection

        src, origin = SourceSection(type="corpus", path="shakespeare"), "bundled corpus (no data source)"
    try:
        docs = read_source(src)
    except Exception as e:  # noqa: BLE001 - reported in the summary
        return EvalText([], f"{src.type}:{src.path}", None, f"could not read {origin} ({src.type}:{src.path}): {e}")
    desc = f"{src.type}:{src.path} ({origin}, {len(docs)} documents)"
    if origin == "eval.perplexity_source":
        return EvalText([t for _, t in docs], desc, True,
                        "separate evaluation source (eval.perplexity_source); its overlap with training is not checked",
                        [w for w, _ in docs])
    man = _manifest(run_dir, recipe) or {}
    train = _names(man.get("train_documents"))
    held = _names(man.get("eval_documents")) | _names(man.get("held_out_documents"))

    def seen(where: str) -> bool:
        key = {where, Path(where).stem, Path(where).name}
        if held:
            return not (key & held)
        return bool(key & train)

    if held or train:
        unseen = [(w, t) for w, t in docs if not seen(w)]
        if unseen:
            return EvalText([t for _, t in unseen], f"{desc}; {len(unseen)} held-out documents", True,
                            "documents the data manifest marks as not used for training", [w for w, _ in unseen])
        note = "the data manifest lists every document of the source as training data: text was seen in training"
        return EvalText([t for _, t in docs], desc, False, note, [w for w, _ in docs])
    note = ("the training data source itself: no manifest of held-out documents was found, so this text may "
            "have been seen in training (perplexity is then optimistic). Set eval.perplexity_source to held-out text.")
    return EvalText([t for _, t in docs], desc, False, note, [w for w, _ in docs])


def token_stream(tokenizer, documents: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Documents tokenized and concatenated (BOS first, EOS between documents), up to max_tokens."""
    ids: list[int] = []
    bos_id = getattr(tokenizer, "bos_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if bos_id is not None:
        ids.append(bos_id)
    for k, doc in enumerate(documents):
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

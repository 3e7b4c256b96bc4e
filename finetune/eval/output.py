"""Everything `longtune eval` writes, and only under `<run_dir>/eval/`: results.json, summary.md
and the figures, built in a temporary sibling and swapped in (a crash never leaves a half-written
eval/, a rerun replaces it). The model card is not written here: `finetune.export.card` renders
it from `eval/results.json` at export and push time.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from finetune import rundir
from finetune.export.card import CARD_SECTION

from . import report


def environment() -> dict:
    import transformers

    dev = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return {
        "device": dev,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def assemble(run_dir, cfg, table: dict, names: list[str], text, infos, notes, res, errors, skipped) -> dict:
    """results.json's dict: per suite ``{"results": {model: ...}, ...describe}`` (a primary-only
    suite: its own entry); a suite with no result at all goes to ``skipped`` with why."""
    out_suites: dict[str, dict] = {}
    for s in names:
        if s in skipped:
            continue
        data = res.get(s)
        if not data:
            why = "; ".join(f"{m}: {e}" for m, e in errors.get(s, {}).items()) or "no model was evaluated"
            skipped[s] = f"failed: {why}"
            continue
        suite = table[s]
        entry = dict(data) if suite.primary_only else {"results": data}
        if suite.describe is not None:
            entry.update(suite.describe(cfg, text))
        if errors.get(s):
            entry["errors"] = errors[s]
        out_suites[s] = entry
    for s, errs in errors.items():
        if s in out_suites:
            for m, e in errs.items():
                notes.append(f"{s} failed for `{m}`: {e}")
    return {
        "run_dir": str(run_dir),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": environment(),
        "eval_config": cfg.model_dump(mode="json"),
        "models": infos,
        "model_notes": notes,
        "suites": out_suites,
        "skipped": skipped,
    }


def card_section(results: dict, table: dict) -> str:
    """The model card's Evaluation section (`eval/card.md`): each suite's section (figures are not
    part of the export, so they are left out), the text it was measured on and the notes. Export
    and push embed it as written, so the card shows what this eval measured."""
    out = ["## Evaluation", "", f"`longtune eval`, {results['created']}, {results['environment']['device']}."]
    models = results.get("models") or {}
    out += ["", report.table(["model", "source", "max positions", "KV cache"],
                             [[n, i.get("source"), i.get("max_position_embeddings"), i.get("kv_cache")]
                              for n, i in models.items()])]  # fmt: skip
    out += [f"- {n}" for n in [""] + list(results.get("model_notes") or []) if n]
    for name, suite in table.items():
        entry = results["suites"].get(name)
        if entry is not None:
            out += ["", f"### {suite.title}", "", suite.report(entry)]
    for s, why in (results.get("skipped") or {}).items():
        out.append(f"- {s} skipped: {why}")
    return "\n".join(out) + "\n"


def draw(results: dict, table: dict) -> dict[str, Path]:
    """Each suite's figure into a temporary folder (copied into eval/ by `write`)."""
    tmp = Path(tempfile.mkdtemp(prefix="longtune-eval-plots-"))
    out = {}
    for s, entry in results["suites"].items():
        plot = table[s].plot
        if plot is None:
            continue
        data = entry if table[s].primary_only else entry["results"]
        try:
            p = plot(data, tmp / f"{s}.png")
        except Exception as e:  # noqa: BLE001 - a figure is not worth losing the numbers for
            results["model_notes"].append(f"figure {s}.png not drawn: {type(e).__name__}: {e}")
            p = None
        if p is not None:
            out[s] = p
            entry["figures"] = [p.name]
    if not out:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write(results: dict, table: dict, out_dir: Path) -> None:
    """results.json, summary.md and the figures into ``out_dir`` (atomically)."""
    figures = draw(results, table)
    files: dict[str, bytes | Path] = {
        "results.json": json.dumps(results, indent=2, default=str).encode(),
        "summary.md": report.summary_md(results, table).encode(),
        CARD_SECTION: card_section(results, table).encode(),
    }
    files.update({p.name: p for p in figures.values()})
    try:
        with rundir.atomic_dir(out_dir) as tmp:
            for name, data in files.items():
                if isinstance(data, Path):
                    shutil.copyfile(data, tmp / name)
                else:
                    (tmp / name).write_bytes(data)
    finally:
        if figures:
            shutil.rmtree(next(iter(figures.values())).parent, ignore_errors=True)

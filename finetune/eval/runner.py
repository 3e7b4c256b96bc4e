"""`longtune eval RUN_DIR`: every suite the recipe names, on the run's export, against the base
and the `eval.compare` models; results.json, PNGs and summary.md in `<run_dir>/eval/`.

Models are loaded one at a time (tuned first), each runs every suite, then is freed, so peak
memory is one model. The kv_cache suite runs on the tuned model only. A suite that fails for a
model is recorded with its error (summary.md says so); nothing is filled in.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import kv_cache as kv_suite
from . import needle as needle_suite
from . import passkey as passkey_suite
from . import perplexity as ppl_suite
from . import plots, report
from . import sinks as sinks_suite
from .texts import EvalText, eval_text, token_stream, tokens_needed

SUITES = ("perplexity", "passkey", "needle", "sinks", "kv_cache")
TUNED = "tuned"
BASE = "base"


class EvalError(RuntimeError):
    """An evaluation that cannot start; the message says what to do."""


@dataclass
class ModelSpec:
    name: str
    source: str
    load: Callable[[], tuple[Any, Any, dict]]  # -> (model, tokenizer or None, info)


# --------------------------------------------------------------------------- loading
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_dtype():
    # CPU: fp32 (bf16 matmuls are slow and lossy on most CPUs); GPU: the checkpoint's own dtype.
    return "float32" if _device() == "cpu" else None


def _model_info(model, source: str, loader: str) -> dict:
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if isinstance(rope, dict):
        rope = {k: v for k, v in rope.items() if v is not None}
        rope = ", ".join(f"{k}={v}" for k, v in rope.items())
    kv = getattr(model, "longtune_kv_cache", None)
    return {
        "source": source,
        "loader": loader,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "rope": rope or "default",
        "attn_implementation": cfg._attn_implementation,
        "kv_cache": (kv or {}).get("method", "full"),
    }


def _load_longtune(path: Path) -> tuple[Any, Any, dict]:
    """An export dir / final/ via finetune.loading (layout + KV config restored)."""
    from finetune.loading import load_model, load_tokenizer

    # Full KV cache for perplexity/passkey/needle/sinks: the model's own ability (for a LongGen hybrid
    # model this is exact: its sparse layers are masked by position either way); the compressed
    # caches are what the kv_cache suite measures.
    model = load_model(path, kv_cache="full", dtype=_load_dtype(), device=_device())
    try:
        tok = load_tokenizer(path)
    except Exception:  # noqa: BLE001 - a final/ without tokenizer files: the caller's default
        tok = None
    info = _model_info(model, str(path), "finetune.loading.load_model")
    shipped = path / "kv_cache_config.json"
    if shipped.is_file():
        try:
            method = json.loads(shipped.read_text()).get("method", "full")
        except (OSError, json.JSONDecodeError):
            method = "?"
        if method != "full":
            info["kv_cache"] = f"full (export default: {method})"
    return model, tok, info


def _load_plain(ref: str) -> tuple[Any, Any, dict]:
    """A Hugging Face checkpoint (hub id, directory or bundled alias), its own config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.assets import resolve_model

    path = resolve_model(ref)
    dtype = torch.float32 if _device() == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(_device()).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001
        tok = None
    return model, tok, _model_info(model, ref, "transformers.AutoModelForCausalLM")


def _load_any(ref: str, run_dir: Path) -> tuple[Any, Any, dict]:
    for cand in (Path(ref), run_dir / ref):
        if cand.is_dir() and ((cand / "config.json").is_file() or (cand / "longtune_model.json").is_file()):
            return _load_longtune(cand)
    return _load_plain(ref)


def tuned_path(run_dir: Path, recipe) -> Path:
    cands = [run_dir / "export"]
    if recipe is not None and recipe.export.output_dir:
        cands.insert(0, Path(recipe.export.output_dir))
    cands.append(run_dir / "final")
    for c in cands:
        if (c / "config.json").is_file() or (c / "longtune_model.json").is_file():
            from finetune.rundir import export_staleness, stale_message

            stale = export_staleness(c, run_dir)  # None for final/ (no longtune_export.json)
            if stale:
                raise EvalError(stale_message(stale, run_dir))
            return c
    raise EvalError(
        f"{run_dir} has no exported model (export/config.json) and no trained final/ "
        "(final/longtune_model.json): run `longtune train` and `longtune export` first"
    )


def base_ref(run_dir: Path, recipe) -> tuple[str | None, str | None]:
    """(where the base weights are, None) or (None, why there is no base to compare)."""
    if recipe is not None and recipe.kind == "pretrain":
        return None, "pretrain run: its base is a random initialisation"
    final = run_dir / "final"
    meta_file = final / "longtune_model.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            from finetune.export.merge import base_location

            return base_location(final, str(meta["base_model"])), None
        except Exception as e:  # noqa: BLE001
            return None, f"cannot locate the base model named by {meta_file}: {e}"
    run_json = run_dir / "run.json"
    if run_json.is_file():
        try:
            b = json.loads(run_json.read_text()).get("base_model")
            if b and b != "base":
                return str(b), None
        except json.JSONDecodeError:
            pass
    if recipe is not None and recipe.model.name_or_path:
        return recipe.model.name_or_path, None
    return None, "the base model is an inline config with no saved weights (final/base/ missing)"


def model_specs(run_dir: Path, recipe, cfg, notes: list[str]) -> list[ModelSpec]:
    path = tuned_path(run_dir, recipe)
    specs = [ModelSpec(TUNED, str(path), lambda: _load_longtune(path))]
    if cfg.compare_base:
        ref, why = base_ref(run_dir, recipe)
        if ref is not None:
            specs.append(ModelSpec(BASE, ref, lambda ref=ref: _load_plain(ref)))
        else:
            notes.append(f"base model not compared: {why}")
    for name, ref in cfg.compare.items():
        specs.append(ModelSpec(name, ref, lambda ref=ref: _load_any(ref, run_dir)))
    return specs


def given_specs(models: dict, run_dir: Path) -> list[ModelSpec]:
    """`models=` of run_eval: name -> path | model | (model, tokenizer)."""
    specs = []
    for name, m in models.items():
        if isinstance(m, (str, Path)):
            specs.append(ModelSpec(name, str(m), lambda m=m: _load_any(str(m), run_dir)))
        else:
            model, tok = m if isinstance(m, tuple) else (m, None)
            specs.append(
                ModelSpec(
                    name,
                    f"<{type(model).__name__} object>",
                    lambda model=model, tok=tok, name=name: (
                        model,
                        tok,
                        _model_info(model, f"<{name}>", "given"),
                    ),
                )
            )
    return specs


def _fallback_tokenizer(recipe, run_dir: Path):
    try:
        from finetune.loading import load_tokenizer

        return load_tokenizer(tuned_path(run_dir, recipe))
    except Exception:  # noqa: BLE001, S110 - no tokenizer files beside the model: try the recipe's
        pass
    if recipe is not None:
        from data_prep.assets import load_tokenizer as assets_tokenizer

        name = recipe.model.tokenizer or recipe.model.name_or_path
        if name:
            return assets_tokenizer(name)
    raise EvalError("no tokenizer: the export has none and the recipe names none (model.tokenizer)")


# --------------------------------------------------------------------------- writing
def _write_atomic_dir(files: dict[str, bytes | Path], out_dir: Path) -> None:
    """Write every file into a temporary sibling directory, then swap it in for out_dir."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name, data in files.items():
            if isinstance(data, Path):
                shutil.copyfile(data, tmp / name)
            else:
                (tmp / name).write_bytes(data)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refresh_card(run_dir: Path, export_dir: Path) -> str | None:
    """`finetune.export.card.refresh_card(run_dir, export_dir)`; a failure is reported, not raised."""
    from finetune.export.card import refresh_card

    try:
        path = refresh_card(run_dir, export_dir)
    except Exception as e:  # noqa: BLE001 - the eval results stand; say what failed
        return f"model card refresh failed: {type(e).__name__}: {e}"
    return f"model card updated: {path}" if path else None


# --------------------------------------------------------------------------- run
def _environment() -> dict:
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


def run_eval(run_dir, recipe=None, models: dict | None = None, progress: bool = True) -> dict:
    """Run the recipe's eval suites on the run's export; write `<run_dir>/eval/`; return results.

    `recipe`: a Recipe, or None to read `<run_dir>/recipe.yaml`. `models`: name -> path | model |
    (model, tokenizer) replaces the automatic list (tuned export, base, `eval.compare`); the
    first is the one the kv_cache suite measures.
    """
    from finetune.recipe import load_recipe

    run_dir = Path(run_dir)
    if recipe is None:
        f = run_dir / "recipe.yaml"
        if not f.is_file():
            raise EvalError(f"{f} not found: is {run_dir} a run directory? (or pass a recipe)")
        recipe = load_recipe(f)
    cfg = recipe.eval
    suites = [s for s in SUITES if s in cfg.suites]
    torch.manual_seed(cfg.seed)
    notes: list[str] = []
    specs = given_specs(models, run_dir) if models else model_specs(run_dir, recipe, cfg, notes)
    primary = specs[0].name

    cap = tokens_needed(cfg)
    text: EvalText | None = eval_text(run_dir, recipe, None if cap is None else 4 * cap) if suites else None
    skipped: dict[str, str] = {}
    errors: dict[str, dict[str, str]] = {}
    res: dict[str, dict] = {}
    infos: dict[str, dict] = {}
    default_tok = None
    seconds: dict[str, dict[str, float]] = {}
    stream_tokens: dict[str, int] = {}

    bar = tqdm(total=len(specs) * len(suites), desc="eval", disable=not progress)
    for spec in specs:
        try:
            model, tok, info = spec.load()
        except Exception as e:  # noqa: BLE001
            notes.append(
                f"`{spec.name}` ({spec.source}) not evaluated: could not load it: {type(e).__name__}: {e}"
            )
            bar.update(len(suites))
            continue
        if tok is None:
            default_tok = default_tok or _fallback_tokenizer(recipe, run_dir)
            tok = default_tok
        default_tok = default_tok or tok
        infos[spec.name] = info
        one = {spec.name: (model, tok)}
        ids = None
        if text is not None and text.documents:
            ids = token_stream(tok, text.documents, None if cap is None else 4 * cap, progress)
            stream_tokens[spec.name] = int(ids.numel())
        for suite in suites:
            bar.set_postfix_str(f"{spec.name}: {suite}")
            t0 = time.perf_counter()
            try:
                if suite == "perplexity":
                    if ids is None:
                        raise _Skip(f"no evaluation text ({text.note if text else 'no source'})")
                    res.setdefault(suite, {}).update(ppl_suite.run(one, ids, cfg, progress))
                elif suite == "passkey":
                    res.setdefault(suite, {}).update(passkey_suite.run(one, cfg, progress))
                elif suite == "needle":
                    sentences = (
                        needle_suite.split_sentences("\n".join(text.documents[:50]))
                        if text and text.documents
                        else []
                    )
                    if len(sentences) < 8:
                        sentences = needle_suite.SYNTHETIC
                    res.setdefault(suite, {}).update(needle_suite.run(one, sentences, cfg, progress))
                elif suite == "sinks":
                    sink_ids = ids
                    if sink_ids is None:  # no corpus: synthetic filler is still text
                        sink_ids = token_stream(tok, [" ".join(needle_suite.SYNTHETIC * 200)])
                    res.setdefault(suite, {}).update(sinks_suite.run(one, sink_ids, cfg, progress=progress))
                elif suite == "kv_cache":
                    if spec.name != primary:
                        bar.update(1)
                        continue
                    res[suite] = _kv(model, tok, ids, cfg, spec, progress)
            except _Skip as s:
                skipped[suite] = str(s)
            except Exception as e:  # noqa: BLE001 - recorded, shown in summary.md
                errors.setdefault(suite, {})[spec.name] = f"{type(e).__name__}: {e}"
                if os.environ.get("LONGTUNE_EVAL_DEBUG"):
                    traceback.print_exc()
            seconds.setdefault(suite, {})[spec.name] = round(time.perf_counter() - t0, 3)
            bar.update(1)
        del model, one
        gc.collect()
    bar.close()

    results = _assemble(run_dir, cfg, suites, text, infos, notes, res, errors, skipped)
    if "perplexity" in results["suites"]:
        results["suites"]["perplexity"]["source"]["tokens"] = stream_tokens
    results["seconds"] = seconds
    figures = _draw(results)
    md = report.summary_md(results)
    files: dict[str, bytes | Path] = {
        "results.json": json.dumps(results, indent=2, default=str).encode(),
        "summary.md": md.encode(),
    }
    files.update({p.name: p for p in figures.values()})
    out_dir = run_dir / "eval"
    _write_atomic_dir(files, out_dir)
    if figures:
        shutil.rmtree(next(iter(figures.values())).parent, ignore_errors=True)
    if not models:
        exp = recipe.export_dir if recipe.export.output_dir else run_dir / "export"
        card = _refresh_card(run_dir, exp)
        if card:
            print(card, file=sys.stderr)
    print(f"\nlongtune eval: {run_dir} -> {out_dir}\n")
    print(report.headline(results))
    for s, why in results["skipped"].items():
        print(f"skipped {s}: {why}")
    return results


class _Skip(Exception):
    pass


def _kv(model, tok, ids, cfg, spec, progress) -> dict:
    if ids is None:
        ids = token_stream(tok, [" ".join(needle_suite.SYNTHETIC * 400)])
    export_cfg = None
    f = Path(spec.source) / "kv_cache_config.json"
    if f.is_file():
        try:
            export_cfg = json.loads(f.read_text())
        except json.JSONDecodeError:
            export_cfg = None
    out = kv_suite.run(model, ids, cfg, export_cfg, progress)
    out["model"] = spec.name
    return out


def _assemble(run_dir, cfg, suites, text, infos, notes, res, errors, skipped) -> dict:
    out_suites: dict[str, dict] = {}
    for s in suites:
        if s in skipped:
            continue
        data = res.get(s)
        if not data:
            why = "; ".join(f"{m}: {e}" for m, e in errors.get(s, {}).items()) or "no model was evaluated"
            skipped[s] = f"failed: {why}"
            continue
        if s == "kv_cache":
            entry = dict(data)
        else:
            entry = {"results": data}
        if s == "perplexity":
            entry.update(
                protocols=list(cfg.perplexity_protocols),
                stride=cfg.perplexity_stride,
                sliding_stride=cfg.perplexity_sliding_stride,
                max_windows=cfg.perplexity_max_windows,
                source={
                    "description": text.description,
                    "held_out": text.held_out,
                    "note": text.note,
                    "tokens": None,
                },
            )
        if s == "needle":
            entry["haystack"] = (
                f"sentences of {text.description}"
                if text and text.documents
                else "synthetic filler sentences (no corpus available)"
            )
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
        "environment": _environment(),
        "eval_config": cfg.model_dump(mode="json"),
        "models": infos,
        "model_notes": notes,
        "suites": out_suites,
        "skipped": skipped,
    }


def _draw(results: dict) -> dict[str, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="longtune-eval-plots-"))
    drawers = {
        "perplexity": plots.perplexity,
        "passkey": plots.passkey,
        "needle": plots.needle,
        "sinks": plots.sinks,
        "kv_cache": plots.kv_cache,
    }
    out = {}
    for s, entry in results["suites"].items():
        data = entry if s == "kv_cache" else entry["results"]
        try:
            p = drawers[s](data, tmp / f"{s}.png")
        except Exception as e:  # noqa: BLE001 - a figure is not worth losing the numbers for
            results["model_notes"].append(f"figure {s}.png not drawn: {type(e).__name__}: {e}")
            p = None
        if p is not None:
            out[s] = p
            entry["figures"] = [p.name]
    if not out:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtune eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="run directory (recipe.yaml, export/ or final/)")
    p.add_argument(
        "overrides", nargs="*", help="recipe overrides section.key=value, e.g. eval.passkey_trials=3"
    )
    p.add_argument("--recipe", help="recipe file (default: RUN_DIR/recipe.yaml)")
    p.add_argument("--suites", nargs="+", choices=SUITES, help="suites to run (default: eval.suites)")
    p.add_argument("--lengths", nargs="+", type=int, help="context lengths (default: eval.lengths)")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="extra model to compare (repeatable; added to eval.compare)",
    )
    p.add_argument("--no-base", action="store_true", help="do not compare with the base model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    from finetune.recipe import RecipeError, apply_overrides, load_raw, validate

    args = build_parser().parse_intermixed_args(argv)
    run_dir = Path(args.run_dir)
    rfile = Path(args.recipe) if args.recipe else run_dir / "recipe.yaml"
    overrides = list(args.overrides)
    if args.suites:
        overrides.append(f"eval.suites=[{', '.join(args.suites)}]")
    if args.lengths:
        overrides.append(f"eval.lengths=[{', '.join(map(str, args.lengths))}]")
    if args.no_base:
        overrides.append("eval.compare_base=false")
    try:
        data = apply_overrides(load_raw(rfile), overrides)
        for item in args.compare:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise RecipeError(f"--compare '{item}' must look like NAME=PATH")
            data.setdefault("eval", {}).setdefault("compare", {})[name] = path
        recipe = validate(data, origin=str(rfile))
        results = run_eval(run_dir, recipe=recipe, progress=not args.no_progress)
    except (RecipeError, EvalError) as e:
        print(f"longtune eval: {e}", file=sys.stderr)
        return 2
    if not results["models"]:
        print("longtune eval: no model could be loaded (see eval/summary.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

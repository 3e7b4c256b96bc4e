"""`run_eval`: every suite the recipe names, on the run's export, against the base and the
`eval.compare` models; results.json, PNGs and summary.md in `<run_dir>/eval/`.

This module finds and loads the models and walks the suite table (`suites.SUITES`); the suites,
the text (`texts`), what is written (`output`) and the CLI (`cli`) live in their own modules.
Models are loaded one at a time (tuned first), each runs every suite, then is freed, so peak
memory is one model. The kv_cache suite runs on the tuned model only. A suite that fails for a
model is recorded with its error (summary.md says so); nothing is filled in.
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from finetune import rundir

from . import output, report
from .errors import EvalError
from .suites import SUITES as SUITE_TABLE
from .suites import Context, SuiteSkipped
from .texts import EvalText, eval_text, token_stream, tokens_needed

SUITES = tuple(SUITE_TABLE)
TUNED = "tuned"
BASE = "base"


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
    cands = [rundir.default_export_dir(run_dir)]
    if recipe is not None and recipe.export.output_dir:
        cands.insert(0, Path(recipe.export.output_dir))
    cands.append(rundir.final_dir(run_dir))
    for c in cands:
        if rundir.is_model_dir(c):
            stale = rundir.export_staleness(c, run_dir)  # None for final/ (no longtune_export.json)
            if stale:
                raise EvalError(rundir.stale_message(stale, run_dir))
            return c
    raise EvalError(
        f"{run_dir} has no exported model (export/config.json) and no trained final/ "
        "(final/longtune_model.json): run `longtune train` and `longtune export` first"
    )


def base_ref(run_dir: Path, recipe) -> tuple[str | None, str | None]:
    """(where the base weights are, None) or (None, why there is no base to compare)."""
    if recipe is not None and recipe.kind == "pretrain":
        return None, "pretrain run: its base is a random initialisation"
    final = rundir.final_dir(run_dir)
    meta_file = final / rundir.MODEL_META
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            from finetune.export.merge import base_location

            return base_location(final, str(meta["base_model"])), None
        except Exception as e:  # noqa: BLE001
            return None, f"cannot locate the base model named by {meta_file}: {e}"
    run_json = run_dir / rundir.RUN_FILE
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


# --------------------------------------------------------------------------- run
def _positions_note(name: str, info: dict, lengths: list[int]) -> str | None:
    """Lengths past the model's max_position_embeddings still run (RoPE extrapolates), but say so."""
    n = info.get("max_position_embeddings")
    beyond = [L for L in lengths if n and L > n]
    if not beyond:
        return None
    info["lengths_beyond_positions"] = beyond
    return (
        f"`{name}` has max_position_embeddings {n}: length(s) {', '.join(map(str, beyond))} run past the "
        "positions it was configured for (RoPE extrapolation), so its numbers there measure extrapolation"
    )


def _preflight(cfg, names: list[str]) -> None:
    """Refuse what would fail for every model before anything is loaded or written."""
    if "lm_eval" in names:
        from . import lm_eval_bridge

        lm_eval_bridge.check(cfg)


def run_eval(run_dir, recipe=None, models: dict | None = None, progress: bool = True) -> dict:
    """Run the recipe's eval suites on the run's export; write `<run_dir>/eval/`; return results.

    `recipe`: a Recipe, or None to read `<run_dir>/recipe.yaml`. `models`: name -> path | model |
    (model, tokenizer) replaces the automatic list (tuned export, base, `eval.compare`); the
    first is the one the kv_cache suite measures. Bad input (an unreadable evaluation text, a
    missing optional package) raises `EvalError` before anything is written.
    """
    from finetune.recipe import load_recipe

    run_dir = Path(run_dir)
    if recipe is None:
        f = rundir.recipe_file(run_dir)
        if not f.is_file():
            raise EvalError(f"{f} not found: is {run_dir} a run directory? (or pass a recipe)")
        recipe = load_recipe(f)
    cfg = recipe.eval
    names = [s for s in SUITES if s in cfg.suites]
    _preflight(cfg, names)
    torch.manual_seed(cfg.seed)
    notes: list[str] = []
    specs = given_specs(models, run_dir) if models else model_specs(run_dir, recipe, cfg, notes)
    primary = specs[0].name

    cap = tokens_needed(cfg)
    text: EvalText | None = eval_text(run_dir, recipe, None if cap is None else 4 * cap) if names else None
    skipped: dict[str, str] = {}
    errors: dict[str, dict[str, str]] = {}
    res: dict[str, dict] = {}
    infos: dict[str, dict] = {}
    default_tok = None
    seconds: dict[str, dict[str, float]] = {}
    stream_tokens: dict[str, int] = {}

    bar = tqdm(total=len(specs) * len(names), desc="eval", disable=not progress)
    for spec in specs:
        try:
            model, tok, info = spec.load()
        except Exception as e:  # noqa: BLE001
            notes.append(
                f"`{spec.name}` ({spec.source}) not evaluated: could not load it: {type(e).__name__}: {e}"
            )
            bar.update(len(names))
            continue
        if tok is None:
            default_tok = default_tok or _fallback_tokenizer(recipe, run_dir)
            tok = default_tok
        default_tok = default_tok or tok
        infos[spec.name] = info
        note = _positions_note(spec.name, info, cfg.lengths)
        if note:
            notes.append(note)
        ids = None
        if text is not None and text.documents:
            ids = token_stream(tok, text.documents, None if cap is None else 4 * cap, progress)
            stream_tokens[spec.name] = int(ids.numel())
        ctx = Context(spec.name, spec.source, model, tok, cfg, text, ids, progress)
        for name in names:
            suite = SUITE_TABLE[name]
            if suite.primary_only and spec.name != primary:
                bar.update(1)
                continue
            bar.set_postfix_str(f"{spec.name}: {name}")
            t0 = time.perf_counter()
            try:
                out = suite.run(ctx)
                if suite.primary_only:
                    res[name] = out
                else:
                    res.setdefault(name, {})[spec.name] = out
            except SuiteSkipped as s:
                skipped[name] = str(s)
            except Exception as e:  # noqa: BLE001 - recorded, shown in summary.md
                errors.setdefault(name, {})[spec.name] = f"{type(e).__name__}: {e}"
                if os.environ.get("LONGTUNE_EVAL_DEBUG"):
                    traceback.print_exc()
            seconds.setdefault(name, {})[spec.name] = round(time.perf_counter() - t0, 3)
            bar.update(1)
        del model, ctx
        gc.collect()
    bar.close()

    results = output.assemble(run_dir, cfg, SUITE_TABLE, names, text, infos, notes, res, errors, skipped)
    if "perplexity" in results["suites"]:
        results["suites"]["perplexity"]["source"]["tokens"] = stream_tokens
    results["text"] = None if text is None else {
        "description": text.description, "held_out": text.held_out, "note": text.note,
    }  # fmt: skip
    results["seconds"] = seconds
    out_dir = run_dir / "eval"
    output.write(results, SUITE_TABLE, out_dir)
    print(f"\nlongtune eval: {run_dir} -> {out_dir}\n")
    print(report.headline(results, SUITE_TABLE))
    for s, why in results["skipped"].items():
        print(f"skipped {s}: {why}")
    return results

"""Export a run: merged safetensors checkpoint + KV-cache config + model card (docs/export.md).

`export_run(run_dir)` -> `<run_dir>/export/`:
    config.json (RoPE scaling + inference attention layout), model-*.safetensors (+ index),
    generation_config.json, tokenizer files, kv_cache_config.json, README.md,
    longtune_export.json, custom_generate/generate.py, and for LongGen hybrids longtune_hybrid.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any


class ExportError(RuntimeError):
    """A run that cannot be exported; the message says which file and what to do."""


__all__ = ["ExportError", "export_run", "main"]

DTYPES = ("float32", "bfloat16", "float16")
HERE = Path(__file__).resolve().parent
HYBRID_MODULE = "longtune_hybrid.py"
AUTO_MAP = {
    "AutoConfig": "longtune_hybrid.LongtuneLlamaConfig",
    "AutoModelForCausalLM": "longtune_hybrid.LongtuneLlamaForCausalLM",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def _read_recipe(run_dir: Path):
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    from finetune.recipe import load_recipe

    return load_recipe(path)


def _tokenizer(run, recipe):
    """The tokenizer train saved in final/ (or the checkpoint), else the recipe's."""
    from transformers import AutoTokenizer

    for d in (run.source, run.run_dir / "final"):
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(d))
    if recipe is not None:
        from data_prep.assets import load_tokenizer

        return load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path)
    raise ExportError(f"no tokenizer files in {run.source} and no recipe.yaml in {run.run_dir} to find one")


def _generation_config(model, tokenizer):
    from transformers import GenerationConfig

    gc = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gc, attr, None) is None and getattr(tokenizer, attr, None) is not None:
            setattr(gc, attr, getattr(tokenizer, attr))
    return gc


def _export_info(run, recipe, dtype: str, kv: dict) -> dict[str, Any]:
    # Paths relative to the run: this file and the card get published, local paths should not.
    info: dict[str, Any] = {
        "longtune_export_version": 1,
        "source": _rel(run.source, run.run_dir),
        "base_model": run.base_ref,
        "base_path": _rel(Path(run.base_path), run.run_dir)
        if Path(run.base_path).exists()
        else run.base_path,
        "lora_mode": run.lora_mode,
        "recipe_hash": run.meta.get("recipe_hash"),
        "dtype": dtype,
        "train_layout": run.train_layout,
        "rope": run.meta.get("model_config", {}).get("longtune_rope"),
        "kv_cache_method": kv.get("method"),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if recipe is not None:
        info["name"] = recipe.name
        info["license"] = recipe.export.license
        info["datasets"] = [s.path for s in recipe.data.sources if s.type == "hub"]
        # Local files by name only (the card is published); Hub ids and bundled corpora in full.
        info["datasets_all"] = [
            f"{s.type}: {s.path if s.type in ('hub', 'corpus') else Path(s.path).name}"
            for s in recipe.data.sources
        ]
    return info


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def _check_written(tmp: Path) -> None:
    """Only safetensors, and no empty tensors, ended up in the export."""
    from finetune.export.merge import refuse_empty

    pickles = [p.name for p in tmp.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"export would contain pickle files: {pickles}")
    refuse_empty(sorted(tmp.glob("*.safetensors")), tmp)


def _readable(d: Path) -> None:
    """Shards are written 0600 by the serializer: give them the usual file mode (umask applies)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in d.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    """Atomic replace: `tmp` becomes `out`; an old `out` is removed only after the rename."""
    old = None
    if out.exists():
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(
    run_dir,
    output_dir=None,
    force: bool = False,
    dtype: str | None = None,
    checkpoint: bool | str | Path = False,
    max_shard_size: str | None = None,
) -> Path:
    """Merge the run's adapter into its base and write a self-contained checkpoint.

    `output_dir`: default the recipe's `export.output_dir`, else `<run_dir>/export`.
    `dtype`: float32 / bfloat16 / float16; default the recipe's `export.dtype` (bfloat16).
    `checkpoint`: export the newest `checkpoint-N/` (True) or the given one, not `final/`.
    An existing output is replaced only with `force`; a failure leaves it untouched.
    """
    import torch

    from finetune.caches import config as kv_config
    from finetune.export import card
    from finetune.export.merge import load_merged

    run_dir = Path(run_dir)
    if (run_dir / "longtune_model.json").is_file():  # given final/ itself
        run_dir = run_dir.parent
    recipe = _read_recipe(run_dir)
    if output_dir is None:
        output_dir = recipe.export.output_dir if recipe and recipe.export.output_dir else run_dir / "export"
    out = Path(output_dir)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    dtype = dtype or (recipe.export.dtype if recipe else "bfloat16")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    shard = max_shard_size or (recipe.export.max_shard_size if recipe else "2GB")

    # Validate the cheap things before merging: the KV config against the run's model config.
    from finetune.export.merge import config_from_dict, newest_checkpoint, run_meta

    if checkpoint is True:
        checkpoint = newest_checkpoint(run_dir)
    meta = run_meta(run_dir, Path(checkpoint) if checkpoint else None)
    run_config = config_from_dict(meta["model_config"])
    layout = getattr(run_config, "longtune_attention", None)
    inf_layout = None
    if layout is not None:
        from kernels.layout import inference_layout

        inf_layout = inference_layout(layout)
        run_config.longtune_attention = inf_layout
    kv_section = recipe.export.kv_cache if recipe else {"method": "full"}
    kv = kv_config.build(kv_section, run_config)
    hybrid = kv_config.is_hybrid(inf_layout)

    run = load_merged(run_dir, checkpoint=checkpoint, dtype=torch.float32)
    model = run.model
    tokenizer = _tokenizer(run, recipe)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        model.to(getattr(torch, dtype))
        cfg = model.config
        if inf_layout is not None:
            cfg.longtune_attention = inf_layout
        cfg.use_cache = True
        model.generation_config = _generation_config(model, tokenizer)
        model.save_pretrained(str(tmp), max_shard_size=shard)
        tokenizer.save_pretrained(str(tmp))
        cj = json.loads((tmp / "config.json").read_text())
        cj.pop("_attn_implementation", None)
        if inf_layout is not None:
            cj["longtune_attention"] = inf_layout
        if run.meta.get("model_config", {}).get("rope_parameters") is not None:
            cj["rope_parameters"] = run.meta["model_config"]["rope_parameters"]
        if hybrid:
            cj["model_type"] = "longtune_llama"
            cj["architectures"] = ["LongtuneLlamaForCausalLM"]
            cj["auto_map"] = dict(AUTO_MAP)
            shutil.copyfile(HERE / "longtune_hybrid.py", tmp / HYBRID_MODULE)
        (tmp / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
        (tmp / "custom_generate").mkdir()
        shutil.copyfile(HERE / "custom_generate.py", tmp / "custom_generate" / "generate.py")
        kv_config.write(tmp, kv)
        info = _export_info(run, recipe, dtype, kv)
        (tmp / card.INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        eval_dir = run_dir / "eval"
        card.write_card(tmp, eval_dir if eval_dir.is_dir() else None)
        _check_written(tmp)
        _readable(tmp)
        _swap_in(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtune export", description="Merge and export a training run")
    ap.add_argument("run_dir", help="run directory (holds final/ and recipe.yaml)")
    ap.add_argument("--output", "-o", help="output directory (default: <run_dir>/export)")
    ap.add_argument("--force", action="store_true", help="replace an existing export")
    ap.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the recipe's export.dtype)")
    ap.add_argument("--checkpoint", nargs="?", const=True, default=False, metavar="DIR",
                    help="export the newest checkpoint-N/ (or DIR) instead of final/; ZeRO-3 "
                         "partitions are consolidated with deepspeed's zero_to_fp32")  # fmt: skip
    ap.add_argument("--max-shard-size", help="safetensors shard size (default: the recipe's, 2GB)")
    a = ap.parse_args(argv)
    try:
        out = export_run(a.run_dir, a.output, force=a.force, dtype=a.dtype, checkpoint=a.checkpoint,
                         max_shard_size=a.max_shard_size)  # fmt: skip
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0

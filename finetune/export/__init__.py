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
from pathlib import Path
from typing import Any

from finetune import rundir
from finetune.export.errors import ExportError

__all__ = ["ExportError", "export_run", "main"]

DTYPES = ("float32", "bfloat16", "float16")
HERE = Path(__file__).resolve().parent
HYBRID_MODULE = "longtune_hybrid.py"
AUTO_MAP = {
    "AutoConfig": "longtune_hybrid.LongtuneLlamaConfig",
    "AutoModelForCausalLM": "longtune_hybrid.LongtuneLlamaForCausalLM",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def _read_recipe(run_dir: Path, overrides: list[str] | None = None):
    """The run's recipe.yaml with `export.*` overrides (the rest is what the run trained with)."""
    path = rundir.recipe_file(run_dir)
    if not path.is_file():
        if overrides:
            raise ExportError(f"{run_dir} has no recipe.yaml to apply {' '.join(overrides)} to")
        return None
    from finetune.recipe import load_recipe, parse_override

    for o in overrides or []:
        if parse_override(o)[0][0] != "export":
            raise ExportError(
                f"override '{o}': export takes only export.* overrides (the rest of the recipe is what the "
                "run was trained with)"
            )
    return load_recipe(path, overrides)


def check_output(out: Path, run_dir: Path, force: bool) -> None:
    """Export never deletes what it did not create.

    Refused: the run directory itself, a folder inside it other than export/, a folder that
    contains the run, a file, and a non-empty folder without longtune_export.json (the mark
    of a folder export wrote). An export of ours is replaced only with `force`."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"--output {out}: {parent} is a file, not a folder")
    o, r = out.resolve(), run_dir.resolve()
    if o == r:
        raise ExportError(
            f"--output {out} is the run directory itself; export writes a folder of its own "
            f"(default {rundir.default_export_dir(run_dir)})"
        )
    if r in o.parents and o != rundir.default_export_dir(r):
        raise ExportError(
            f"--output {out} is inside the run directory {run_dir}; the only export folder there is "
            f"{rundir.default_export_dir(run_dir)}"
        )
    if o in r.parents:
        raise ExportError(f"--output {out} contains the run directory {run_dir}; choose a folder of its own")
    if out.is_dir() and any(out.iterdir()):
        if not (out / rundir.EXPORT_INFO).is_file():
            raise ExportError(
                f"--output {out} is a non-empty folder that `longtune export` did not write (no "
                f"{rundir.EXPORT_INFO}); refusing to replace it, even with --force. Choose a new or empty folder"
            )
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it")


def _tokenizer(run, recipe):
    """The tokenizer train saved in final/ (or the checkpoint), else the recipe's."""
    from transformers import AutoTokenizer

    for d in (run.source, rundir.final_dir(run.run_dir)):
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
        # Which folder was merged and its identity: push and eval refuse a stale export.
        **rundir.source_record(run.run_dir, run.source),
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


def export_run(
    run_dir,
    output_dir=None,
    force: bool = False,
    dtype: str | None = None,
    checkpoint: bool | str | Path = False,
    max_shard_size: str | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Merge the run's adapter into its base and write a self-contained checkpoint.

    `output_dir`: default the recipe's `export.output_dir`, else `<run_dir>/export`.
    `dtype`: float32 / bfloat16 / float16; default the recipe's `export.dtype` (bfloat16).
    `checkpoint`: export the newest `checkpoint-N/` (True) or the given one, not `final/`.
    `overrides`: `export.key=value` applied to the run's recipe.yaml.
    An existing output is replaced only with `force`, and only when export wrote it
    (`check_output`); a failure leaves it untouched.
    """
    import torch

    from finetune.caches import config as kv_config
    from finetune.export import card
    from finetune.export.merge import load_merged

    run_dir = rundir.run_of(run_dir)  # given final/ itself: its run
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory")
    recipe = _read_recipe(run_dir, overrides)
    if output_dir is None:
        output_dir = recipe.export.output_dir if recipe and recipe.export.output_dir else rundir.default_export_dir(run_dir)
    out = Path(output_dir)
    check_output(out, run_dir, force)
    rundir.clean_leftovers(out)  # hidden .<name>.tmp-* / .old-* a killed export left
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
    from kernels.layout import inference_layout, is_hybrid

    layout = getattr(run_config, "longtune_attention", None)
    inf_layout = None
    if layout is not None:
        inf_layout = inference_layout(layout)
        run_config.longtune_attention = inf_layout
    kv_section = recipe.export.kv_cache if recipe else {"method": "full"}
    kv = kv_config.build(kv_section, run_config)
    hybrid = is_hybrid(inf_layout)

    run = load_merged(run_dir, checkpoint=checkpoint, dtype=torch.float32)
    model = run.model
    tokenizer = _tokenizer(run, recipe)

    with rundir.atomic_dir(out) as tmp:
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
        (tmp / rundir.EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        eval_dir = rundir.eval_dir(run_dir)
        card.write_card(tmp, eval_dir if eval_dir.is_dir() else None)
        _check_written(tmp)
        _readable(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtune export", description="Merge and export a training run")
    ap.add_argument("run_dir", help="run directory (holds final/ and recipe.yaml)")
    ap.add_argument("overrides", nargs="*", help="export.key=value overrides of the run's recipe")
    ap.add_argument("--output", "-o", help="output directory (default: <run_dir>/export)")
    ap.add_argument("--force", action="store_true", help="replace an existing export")
    ap.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the recipe's export.dtype)")
    ap.add_argument("--checkpoint", nargs="?", const=True, default=False, metavar="DIR",
                    help="export the newest checkpoint-N/ (or DIR) instead of final/; ZeRO-3 "
                         "partitions are consolidated with deepspeed's zero_to_fp32")  # fmt: skip
    ap.add_argument("--max-shard-size", help="safetensors shard size (default: the recipe's, 2GB)")
    a = ap.parse_intermixed_args(argv)  # overrides before or after the flags
    try:
        out = export_run(a.run_dir, a.output, force=a.force, dtype=a.dtype, checkpoint=a.checkpoint,
                         max_shard_size=a.max_shard_size, overrides=a.overrides)  # fmt: skip
    except (ExportError, ValueError, FileNotFoundError) as e:
        from finetune.debug import debug

        if debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0

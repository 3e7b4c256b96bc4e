"""`make train` / `longtune train`: validate, prepare data, then start the ranks.

With a DeepSpeed config the DeepSpeed launcher starts one process per GPU (all local GPUs by
default, `num_gpus`, or a multi-node `hostfile`); without CUDA it runs `DS_ACCELERATOR=cpu`
with 2 ranks, which is how CI exercises real ZeRO-2/3 training.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from finetune.deepspeed_config import deepspeed_config, find_file, release_cpu_comm_buffers, zero_stage  # noqa: F401 (public names)
from finetune.recipe import Recipe, RecipeError, load_recipe
from finetune.rundir import already_finished, check_run_dir, finished_message, write_resolved

CPU_RANKS = 2


def world(recipe: Recipe, ngpus: int | None) -> tuple[int, bool]:
    """(processes per node, on_cpu)."""
    if torch.cuda.is_available():
        return (ngpus or recipe.deepspeed.num_gpus or torch.cuda.device_count()), False
    return (ngpus or recipe.deepspeed.num_gpus or CPU_RANKS), True


def preflight(recipe: Recipe, ngpus: int | None, hostfile: str | None = None) -> None:
    """Checks that need the world size or the model's config, before any process is spawned."""
    from finetune.model import check_tokenizer, load_base_config
    from finetune.sequence_parallel import check_world

    if recipe.model.config is not None and recipe.model.tokenizer:  # a local tokenizer: checked before anything is spawned
        from data_prep.assets import load_tokenizer

        check_tokenizer(recipe, load_base_config(recipe), load_tokenizer(recipe.model.tokenizer))
    if recipe.memory.sequence_parallel > 1:
        n, _ = world(recipe, ngpus)
        multi_node = bool(hostfile or recipe.deepspeed.hostfile)  # world = nodes x n: DeepSpeed checks
        check_world(recipe, recipe.memory.sequence_parallel if multi_node else n, load_base_config(recipe))


def dry_run(recipe: Recipe, ngpus: int | None) -> dict:
    from finetune.model import estimate

    preflight(recipe, ngpus)
    n, on_cpu = world(recipe, ngpus)
    est = estimate(recipe, n, zero_stage(recipe))
    print("# resolved recipe")
    print(recipe.to_yaml())
    print(f"# trainable parameters: {est['trainable_params']:,} of {est['total_params']:,}"
          f" ({100 * est['trainable_params'] / max(est['total_params'], 1):.2f}%)")
    print(f"# per-{'rank' if on_cpu else 'GPU'} memory estimate ({n} ranks, ZeRO-{est['zero_stage']}, "
          f"{est['precision']}, seq {recipe.seq_length}, batch {recipe.training.per_device_batch_size}):")
    for k, v in est["per_gpu_gib"].items():
        print(f"#   {k:<22} {v:8.2f} GiB")
    m = recipe.memory
    print(f"# sequence parallel {m.sequence_parallel} ({recipe.seq_length // m.sequence_parallel} tokens per rank), "
          f"tiled loss {m.tiled_loss}, tiled MLP {m.tiled_mlp}, checkpoint offload {m.offload_activations} "
          "(offloaded_to_cpu: host memory, not in the total)")
    print("# an estimate from the config alone (no weights loaded); attention layout: "
          + ", ".join(sorted(set(est["attention_layers"]))))
    from finetune import architectures

    if architectures.used_fallback(recipe.model.name_or_path):
        print(f"# {architectures.note(recipe.model.name_or_path)}")
    return est


def command(recipe_path: Path, recipe: Recipe, ngpus: int | None, hostfile: str | None) -> tuple[list[str], dict]:
    """The rank command line; the launcher has already checked (and with overwrite cleared)
    the run directory, so the ranks get no --overwrite."""
    env = dict(os.environ)
    inner = ["--recipe", str(recipe_path)]
    if not recipe.deepspeed.config:
        return [sys.executable, "-m", "finetune.train", *inner], env
    n, on_cpu = world(recipe, ngpus)
    ds = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [ds]
    hostfile = hostfile or recipe.deepspeed.hostfile
    if hostfile:
        if not Path(hostfile).is_file():
            raise RecipeError(f"deepspeed.hostfile: file not found: {hostfile}")
        cmd += ["--hostfile", hostfile]
    else:
        cmd += ["--num_gpus", str(n)]
    if on_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // n)))
    cmd += ["--master_port", str(recipe.deepspeed.master_port), "--module", "finetune.train", *inner]
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtune train", description="Train a recipe (DeepSpeed launcher).")
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved recipe, parameter count and memory estimate")
    ap.add_argument("--ngpus", type=int, default=None)
    ap.add_argument("--hostfile", default=None)
    ap.add_argument("--overwrite", action="store_true", help="delete what a previous run in run_dir produced (checkpoints, final/, export/, eval/, logs) and start again")
    a = ap.parse_intermixed_args(argv)  # overrides before or after the flags
    overrides = list(a.overrides)
    overwrite = a.overwrite
    for o in list(overrides):  # `make train ARGS="overwrite=true"`
        if o.split("=", 1)[0] == "overwrite":
            overwrite = str(o.split("=", 1)[1]).lower() in ("1", "true", "yes")
            overrides.remove(o)
    try:
        recipe = load_recipe(a.recipe, overrides)
        if a.dry_run:
            dry_run(recipe, a.ngpus)
            return 0
        preflight(recipe, a.ngpus, a.hostfile)
        from data_prep.prepare import is_prepared, prepare

        gone = check_run_dir(recipe, overwrite=overwrite)
        if gone:
            print(f"[longtune] overwrite: deleted {', '.join(str(p) for p in gone)}")
        done = already_finished(recipe)
        if done is not None:
            print(finished_message(recipe, done))
            return 0
        resolved = write_resolved(recipe)
        if not is_prepared(recipe):
            print(f"[longtune] preparing data into {recipe.data_dir}")
            prepare(recipe)
        cmd, env = command(resolved, recipe, a.ngpus, a.hostfile)
    except (RecipeError, ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        from finetune.debug import debug

        if debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("[longtune] " + " ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd, env=env)
    finally:
        if env.get("DS_ACCELERATOR") == "cpu":  # ranks that crashed never reached _leave
            release_cpu_comm_buffers(port=recipe.deepspeed.master_port, rank="*")


if __name__ == "__main__":
    sys.exit(main())

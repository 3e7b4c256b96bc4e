"""`longtune bench long`: one LoRA+ SF-Attn training step of SmolLM2-135M at long lengths.

Per length, side by side, each in a fresh process (one model per process, so one run's memory
never inflates another's peak):
- ``longtune``: the recipe recipes/smollm2-135m-16k.yaml at that length (SF-Attn on the CPU
  block kernels, gradient checkpointing), memory features off;
- ``longtune+memory``: the same with ``memory.tiled_loss``, ``tiled_mlp`` and
  ``offload_activations`` on (offload keeps the checkpoints in host memory: on a CPU that is
  the same memory, so it only shows on a GPU);
- ``peer``: what a user gets elsewhere: transformers' own SDPA attention (full causal), peft
  LoRA with the same rank, target modules and fully trained embeddings + norms, the same RoPE
  scaling and gradient checkpointing, the stock loss.
A step is forward + backward + one AdamW update on random tokens; time is wall clock of the
step (not the model load), peak memory is the process's peak resident set during the step
(Linux VmHWM, reset after loading) minus its resident set before the model was built. ``longtune`` rows also show the dry-run estimate
(finetune/model.py ``estimate``, one rank, no DeepSpeed) and its ratio to the measurement;
``--estimate-lengths`` (default 1024 2048) adds ``longtune`` rows at cheap lengths for that check.

The table goes to docs/benchmarks.md between the bench:long markers. The full run (4k..32k,
~1 hour on 2 cores) is for a quiet machine; ``--lengths 256 --estimate-lengths --no-write`` smoke-tests it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from kernels import benchdoc

DOC = benchdoc.DOC
START, END = benchdoc.markers("long")
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m-16k.yaml"
VARIANTS = ("longtune", "longtune+memory", "peer")
MEMORY_ON = ["memory.tiled_loss=true", "memory.tiled_mlp=true", "memory.offload_activations=true"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM), so loading the model is not the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bench_recipe(length: int, memory: bool):
    from finetune.recipe import load_recipe

    over = [f"data.seq_length={length}", f"rope.target_length={max(16384, length)}", "deepspeed.config=null",
            "model.dtype=float32", "training.precision=fp32"]
    return load_recipe(RECIPE, over + (MEMORY_ON if memory else []))


def _step(model, params, inputs, loss_fn):
    import torch

    opt = torch.optim.AdamW(params, lr=1e-5)
    t0 = time.perf_counter()
    loss = loss_fn(model, inputs)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, float(loss)


def worker(variant: str, length: int) -> dict:
    """One step in this process; returns the measurements (JSON on stdout)."""
    import torch

    torch.manual_seed(0)
    base = rss_bytes()
    recipe = bench_recipe(length, variant == "longtune+memory")
    ids = torch.randint(0, 49152, (1, length))
    inputs = {"input_ids": ids, "position_ids": torch.arange(length)[None], "labels": ids}
    est = None
    if variant.startswith("longtune"):
        from finetune.memory import loss_sum_and_outputs, shift_labels
        from finetune.model import build_model, estimate

        est = estimate(recipe, 1, None)["per_gpu_gib"]
        model = build_model(recipe)

        def loss_fn(m, x):
            targets = shift_labels(x["labels"])
            s, _ = loss_sum_and_outputs(m, {k: v for k, v in x.items() if k != "labels"}, targets, recipe.memory)
            return s / (targets != -100).sum()
    else:
        model = peer_model(recipe)

        def loss_fn(m, x):
            return m(**x).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    import gc

    gc.collect()
    loaded = rss_bytes()
    reset_peak()
    seconds, loss = _step(model, params, inputs, loss_fn)
    from finetune.model import count_parameters

    return {"variant": variant, "length": length, "seconds": seconds, "loss": loss,
            "peak_gib": (peak_rss_bytes() - base) / 2**30, "model_gib": (loaded - base) / 2**30, "trainable": count_parameters(model)[0],
            "estimate_gib": None if est is None else est["total"] + est.get("offloaded_to_cpu", 0.0)}


def peer_model(recipe):
    """transformers + peft as documented upstream: SDPA, LoRA, embeddings and norms trained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.model import apply_rope, modules_to_save, resolve_model_path

    path = resolve_model_path(recipe.model.name_or_path)
    config = AutoConfig.from_pretrained(path)
    apply_rope(config, recipe.rope)  # the same RoPE scaling as longtune's run
    config.use_cache = False
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    lora = recipe.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                             modules_to_save=modules_to_save(lora, model.config), task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def measure(variant: str, length: int, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "finetune.long_bench", "--worker", variant, str(length)]
    # A fixed mmap threshold: every large tensor is its own mapping, returned to the system when
    # freed, so the resident set follows the live tensors (glibc otherwise keeps freed heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "length": length, "error": f"timeout {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    killed = p.returncode in (-9, 137)
    tail = (p.stderr or "").strip().splitlines()[-1:] or [""]
    return {"variant": variant, "length": length,
            "error": "out of memory (killed)" if killed or "memory" in tail[0].lower() else f"failed: {tail[0][:120]}"}


def table(rows: list[dict], argv_text: str) -> str:
    import torch

    lines = [START, "## Long sequences: one SmolLM2-135M training step (`longtune bench long`)", "",
             (f"Machine: {benchdoc.cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{platform.system()}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."),
             f"Command: `python -m finetune.long_bench {argv_text}`.", "",
             ("LoRA+ (r 8 on q/k/v/o, embeddings and norms trained), fp32, batch 1, gradient checkpointing, one "
             "forward + backward + AdamW step on random tokens, one model per process. `longtune`: SF-Attn "
             "(group 1/4, 4 sinks) on the CPU block kernels; `+memory`: tiled loss, tiled MLP and checkpoint "
             "offload on (the offload cannot save host memory on a CPU); `peer`: transformers SDPA (full causal) "
             "+ peft LoRA, same rank and trained modules. Peak = peak resident set during the step (Linux VmHWM, "
             "reset after loading) minus the resident set before the model was built. Estimate = `longtune train --dry-run`'s per-rank total for that run."), "",
             "| tokens | variant | step s | peak GiB | speed-up vs peer | estimate GiB | estimate / peak |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    peer = {r["length"]: r for r in rows if r["variant"] == "peer" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['variant']} | {r['error']} | | | | |")
            continue
        p = peer.get(r["length"])
        speed = f"{p['seconds'] / r['seconds']:.2f}x" if p and r["variant"] != "peer" else ""
        est = r.get("estimate_gib")
        lines.append(f"| {r['length']} | {r['variant']} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | {speed} | "
                     + (f"{est:.2f} | {est / r['peak_gib']:.2f} |" if est else " | |"))
    lines += ["", END]
    return "\n".join(lines)


def write_section(text: str, path: Path = DOC) -> None:
    """Replace the bench:long section of docs/benchmarks.md, keeping the others."""
    benchdoc.write_section(text, "long", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="longtune bench long", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--estimate-lengths", type=int, nargs="*", default=[1024, 2048],
                    help="extra `longtune` rows holding the dry-run estimate against the measured peak")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))), flush=True)
        return 0
    rows = []
    for length in args.estimate_lengths:
        r = measure("longtune", length, args.timeout)
        print(json.dumps(r), flush=True)
        rows.append(r)
    for length in args.lengths:
        for variant in args.variants:
            r = measure(variant, length, args.timeout)
            print(json.dumps(r), flush=True)
            rows.append(r)
    text = table(rows, " ".join(argv))
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

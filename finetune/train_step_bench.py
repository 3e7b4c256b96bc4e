"""One LoRA+ training step of a Llama-shaped ~1B model built from a config: SF-Attn vs full attention.

    python -m finetune.train_step_bench [--lengths 16384 32768] [--variants causal sf_attn sf_attn:sdpa_groups]
        [--device cuda] [--json rows.json] [--output FILE.md] [--smoke]

What a user's GPU step costs at long lengths, with the attention pattern as the only change:
the model is TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads / 4 KV heads, head_dim 64,
MLP 5632, vocabulary 32000) built from a LlamaConfig with random weights (nothing downloaded),
bf16 on a GPU, the recipe's LoRA+ (LoRA r 8 on q/k/v/o, embeddings and norms trained), gradient
checkpointing, batch 1, random tokens; one forward + backward + AdamW update through the same
code as training (finetune.model.build_model, finetune.memory.loss_sum_and_outputs).
A variant is ``PATTERN[:BACKEND]``: ``causal`` (full attention: SDPA), ``sf_attn`` (group 1/4, 4
sinks, the ``auto`` backend), ``sf_attn:sdpa_groups`` (the grouped-SDPA GPU path forced).

Per variant one process (a hang or an out-of-memory stays in it; ``--timeout`` bounds it); per
length one untimed warm-up step (compiles FlexAttention), then ``--repeats`` timed steps (the
best kept). Time: wall clock of the synchronised step. Peak: CUDA allocator peak during the timed
step (on CPU: the process's peak resident set, VmHWM), total and over what was allocated before
it (model, optimizer state). ``kernels`` is what the attention calls really ran
(kernels.registry.kernel_calls), so an ``auto`` choice is visible. ``--smoke``: a tiny config on
the CPU (fp32) with short lengths, to try the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from finetune.rundir import atomic_write_text
from kernels import benchdoc

DOC = benchdoc.DOC
START, END = benchdoc.markers("train_step")

#: TinyLlama-1.1B's published architecture (a Llama-2-style model of 1.1B parameters).
LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}  # fmt: skip
SMOKE = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False,
}  # fmt: skip
#: GPU target: the SF-Attn step at least this much faster than full attention from 16k on.
TARGET = (16384, 1.5)


def recipe_for(variant: str, length: int, device: str, smoke: bool):
    from finetune.recipe import validate

    pattern, _, backend = variant.partition(":")
    cfg = dict(SMOKE if smoke else LLAMA_1B, max_position_embeddings=max(length, 2048))
    dtype = "bfloat16" if device == "cuda" else "float32"
    attention = {"pattern": pattern, "backend": backend or "auto"}
    if pattern == "sf_attn":
        attention.update(group_ratio=0.25, num_sink_tokens=4)
    return validate({
        "run_dir": "runs/train-step-bench", "seed": 0,
        "model": {"config": cfg, "tokenizer": "byte", "dtype": dtype},
        "attention": attention,
        "lora": {"r": 8, "alpha": 16},
        "data": {"seq_length": length},
        "deepspeed": {"config": None},
        "training": {"gradient_checkpointing": True, "precision": "bf16" if device == "cuda" else "fp32"},
    })  # fmt: skip


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker(variant: str, lengths: list[int], device: str, smoke: bool, repeats: int) -> list[dict]:
    """All lengths of one variant in this process; one JSON line per length on stdout."""
    import torch

    rows = []
    for length in lengths:
        row = {"variant": variant, "length": length}
        try:
            row.update(_one_length(variant, length, device, smoke, repeats))
        except Exception as e:  # noqa: BLE001 - one length's failure is a row; the next length runs
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        import gc

        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _one_length(variant: str, length: int, device: str, smoke: bool, repeats: int) -> dict:
    """Warm-up step, then the best of ``repeats`` timed steps of a fresh model at ``length``."""
    import torch

    from finetune.long_bench import peak_rss_bytes, reset_peak, rss_bytes
    from finetune.memory import loss_sum_and_outputs, shift_labels
    from finetune.model import build_model, count_parameters
    from kernels.registry import kernel_calls, reset_kernel_calls

    recipe = recipe_for(variant, length, device, smoke)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains
        model = build_model(recipe)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    inputs = {"input_ids": ids, "position_ids": torch.arange(length, device=device)[None]}
    targets = shift_labels(ids)

    def step():
        s, _ = loss_sum_and_outputs(model, inputs, targets, recipe.memory)
        loss = s / (targets != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    row = {}
    t0 = time.perf_counter()
    step()  # warm-up: compiles, allocates the optimizer state
    _sync(device)
    row["warmup_s"] = time.perf_counter() - t0
    best = None
    for _ in range(repeats):
        reset_kernel_calls()
        if device == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
            reset_peak()
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
        if best is None or secs < best["seconds"]:
            best = {"seconds": secs, "loss": loss, "peak_gib": peak / 2**30, "step_extra_gib": (peak - base) / 2**30}
    row.update(best)
    row["kernels"] = {f"{p}/{b}": n for (p, b), n in sorted(kernel_calls().items())}
    row["trainable"], row["parameters"] = count_parameters(model)
    return row


def measure(variant: str, lengths: list[int], device: str, smoke: bool, repeats: int, timeout: int) -> list[dict]:
    cmd = [sys.executable, "-m", "finetune.train_step_bench", "--worker", variant, "--device", device,
           "--repeats", str(repeats), "--lengths", *map(str, lengths)] + (["--smoke"] if smoke else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows: list[dict] = []
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        out, err, status = p.stdout, p.stderr, f"exit {p.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timeout {timeout}s"
    for line in out.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    done = {r["length"] for r in rows}
    tail = (err or "").strip().splitlines()[-1:] or [""]
    for length in lengths:
        if length not in done:
            rows.append({"variant": variant, "length": length, "error": f"not measured ({status}): {tail[0][:160]}"})
    if err:
        sys.stderr.write(err[-4000:])
    return rows


def machine(device: str) -> str:
    import platform

    import torch

    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU {benchdoc.cpu_name()}"
    return f"{dev}; torch {torch.__version__}; {platform.system()}"


def table(rows: list[dict], device: str, argv_text: str, smoke: bool) -> str:
    shape = SMOKE if smoke else LLAMA_1B
    lines = [START, "## One LoRA+ training step of a ~1B Llama (`python -m finetune.train_step_bench`)", "",
             f"Machine: {machine(device)}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             f"Command: `python -m finetune.train_step_bench {argv_text}`.", "",
             (f"Llama from config ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
              f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads, vocabulary "
              f"{shape['vocab_size']}), {'bf16' if device == 'cuda' else 'fp32'}, LoRA r 8 on q/k/v/o with embeddings "
              "and norms trained, gradient checkpointing, batch 1; forward + backward + AdamW step, best of the "
              "timed steps after a warm-up step. Peak: allocator peak during the step (GPU) / peak resident set "
              "(CPU). `x full`: full attention's step time / this step time at the same length."), "",
             "| tokens | variant | step s | x full | peak GiB | kernels |", "| ---: | --- | ---: | ---: | ---: | --- |"]
    lines += table_rows(rows)
    lines += ["", END]
    return "\n".join(lines)


def table_rows(rows: list[dict]) -> list[str]:
    full = {r["length"]: r for r in rows if r["variant"] == "causal" and "error" not in r}
    out = []
    for r in sorted(rows, key=lambda r: (r["length"], r["variant"] != "causal", r["variant"])):
        if "error" in r:
            out.append(f"| {r['length']} | {r['variant']} | failed: {r['error']} | | | |")
            continue
        f = full.get(r["length"])
        x = f"{f['seconds'] / r['seconds']:.2f}x" if f else ""
        kern = ", ".join(f"{k} {n}" for k, n in r.get("kernels", {}).items())
        out.append(f"| {r['length']} | {r['variant']} | {r['seconds']:.2f} | {x} | {r['peak_gib']:.2f} | {kern} |")
    return out


def _write_json(path: Path, rows: list[dict], device: str, smoke: bool) -> None:
    data = {"machine": machine(device), "device": device, "smoke": smoke, "rows": rows,
            "model": "smoke" if smoke else "TinyLlama-1.1B shape", "config": SMOKE if smoke else LLAMA_1B,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic_write_text(path, json.dumps(data, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.train_step_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="default 16384 32768 (--smoke: 256 512)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="PATTERN[:BACKEND]; default causal sf_attn sf_attn:sdpa_groups (--smoke: causal sf_attn)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per length after the warm-up step")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per variant (all its lengths)")
    ap.add_argument("--smoke", action="store_true", help="tiny config, CPU-sized lengths")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows (after each variant)")
    ap.add_argument("--output", type=Path, default=DOC, help="markdown file whose bench:train_step section is rewritten")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    lengths = args.lengths or ([256, 512] if args.smoke else [16384, 32768])
    if args.worker:
        worker(args.worker, lengths, device, args.smoke, args.repeats)
        return 0
    variants = args.variants or (["causal", "sf_attn"] if args.smoke or device != "cuda"
                                 else ["causal", "sf_attn", "sf_attn:sdpa_groups"])
    for v in variants:
        pattern, _, backend = v.partition(":")
        if pattern not in ("causal", "s2_attn", "sf_attn") or backend not in ("", "auto", "dense", "flex",
                                                                                 "sdpa_groups", "flash"):
            ap.error(f"--variants: {v!r} is not PATTERN[:BACKEND] (causal|s2_attn|sf_attn, auto|flex|sdpa_groups|flash|dense)")
    rows: list[dict] = []
    for v in variants:
        rows += measure(v, lengths, device, args.smoke, args.repeats, args.timeout)
        for r in rows[-len(lengths):]:
            print(json.dumps(r), flush=True)
        if args.json is not None:
            _write_json(args.json, rows, device, args.smoke)
    text = table(rows, device, " ".join(argv), args.smoke)
    print(text)
    if not args.no_write:
        benchdoc.write_section(text, "train_step", args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

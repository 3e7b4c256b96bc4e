"""`longtune bench long`: one LoRA+ SF-Attn training step of SmolLM2-135M at long lengths.

Per length, side by side, each in a fresh process (one model per process, so one run's memory
never inflates another's peak):
- ``longtune``: the recipe recipes/smollm2-135m-16k.yaml at that length (SF-Attn on the CPU
  block kernels, gradient checkpointing that keeps the attention outputs: ``memory.save_attention``),
  memory features off;
- ``longtune+memory``: the same with ``memory.tiled_loss``, ``tiled_mlp`` and
  ``offload_activations`` on (offload keeps the checkpoints in host memory: on a CPU that is
  the same memory, so it only shows on a GPU);
- ``peer``: what a user gets elsewhere: transformers' own SDPA attention (full causal), peft
  LoRA with the same rank, target modules and fully trained embeddings + norms, the same RoPE
  scaling and gradient checkpointing, the stock loss.
A step is forward + backward + one AdamW update on random tokens; time is wall clock of the
step (not the model load; ``--clock cpu``: the process's CPU time, with ``--threads 1`` the
steadier measure on a shared machine), peak memory is the process's peak resident set during the step
(Linux VmHWM, reset after loading) minus its resident set before the model was built. ``longtune`` rows also show the dry-run estimate
(finetune/model.py ``estimate``, one rank, no DeepSpeed) and its ratio to the measurement;
``--estimate-lengths`` (default 1024 2048) adds ``longtune`` rows at cheap lengths for that check.

Every measured row is kept in docs/benchmarks_long.json (RESULTS) with the run that made it (date,
machine, command): a run replaces only the (length, variant) rows it measured, and the table in
docs/benchmarks.md (between the bench:long markers) is drawn from all stored rows, so lengths can be
measured in separate runs. Each worker may grow its address space by at most ``--memory-cap`` GiB
(RLIMIT_AS): an allocation past it fails inside the worker, which reports the row as
``OOM (> N GiB)`` instead of the kernel's OOM killer picking a victim on a shared machine; once a
variant is out of memory its longer lengths are not run. The full run (4k..32k, about an hour on 2
cores) is for a quiet machine; ``--lengths 256 --estimate-lengths --no-write`` smoke-tests it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from kernels import benchdoc

DOC = benchdoc.DOC
RESULTS = DOC.with_name("benchmarks_long.json")
MEMORY_CAP_GIB = 22.0
START, END = benchdoc.markers("long")
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m-16k.yaml"
VARIANTS = ("longtune", "longtune+memory", "peer")
MEMORY_ON = ["memory.tiled_loss=true", "memory.tiled_mlp=true", "memory.offload_activations=true"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM), so loading the model is not the peak."""
    from finetune.caches.measure import reset_peak_rss

    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs)")


def peak_rss_bytes() -> int:
    from finetune.caches.measure import status_kib

    kib = status_kib("VmHWM")
    if kib is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return kib * 1024


def bench_recipe(length: int, memory: bool):
    from finetune.recipe import load_recipe

    over = [f"data.seq_length={length}", f"rope.target_length={max(16384, length)}", "deepspeed.config=null",
            "model.dtype=float32", "training.precision=fp32"]
    return load_recipe(RECIPE, over + (MEMORY_ON if memory else []))


#: ``--clock``: wall clock, or the process's CPU time (all threads; steadier on a shared machine).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _step(model, params, inputs, loss_fn, clock: str = "wall"):
    import torch

    now = CLOCKS[clock]
    opt = torch.optim.AdamW(params, lr=1e-5)
    t0 = now()
    loss = loss_fn(model, inputs)
    # what a run killed by the timeout still reports (the parent reads it from the pipe)
    print(json.dumps({"progress": "forward", "seconds": now() - t0}), flush=True)
    loss.backward()
    opt.step()
    return now() - t0, float(loss)


def vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def cap_address_space(cap_gib: float) -> None:
    """From here on this process's address space may grow by at most ``cap_gib`` GiB: an
    allocation past it fails (torch raises) instead of the machine running out of memory."""
    limit = vm_bytes() + int(cap_gib * 2**30)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text \
        or "cannot allocate memory" in text


def oom_text(cap_gib: float) -> str:
    return f"OOM (> {cap_gib:g} GiB)"


def capped_worker(variant: str, length: int, cap_gib: float | None, clock: str = "wall") -> dict:
    """``worker`` under the memory cap; an allocation failure becomes an ``OOM`` row."""
    import torch  # imported before the cap is set: its libraries are not the step's memory

    if cap_gib:
        cap_address_space(cap_gib)
    try:
        return worker(variant, length, clock)
    except (RuntimeError, MemoryError) as exc:
        if cap_gib and out_of_memory(exc):
            del exc
            return {"variant": variant, "length": length, "error": oom_text(cap_gib)}
        raise
    finally:
        del torch


def worker(variant: str, length: int, clock: str = "wall") -> dict:
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
    seconds, loss = _step(model, params, inputs, loss_fn, clock)
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


def measure(variant: str, length: int, timeout: int, cap_gib: float | None = MEMORY_CAP_GIB,
            threads: int | None = None, clock: str = "wall") -> dict:
    cmd = [sys.executable, "-m", "finetune.long_bench", "--worker", variant, str(length),
           "--memory-cap", str(cap_gib or 0), "--clock", clock] + (["--threads", str(threads)] if threads else [])
    # A fixed mmap threshold: every large tensor is its own mapping, returned to the system when
    # freed, so the resident set follows the live tensors (glibc otherwise keeps freed heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        done = [json.loads(line) for line in out.splitlines() if line.startswith('{"progress"')]
        note = f" (forward took {done[-1]['seconds']:.0f} s)" if done else " (forward not finished)"
        return {"variant": variant, "length": length, "error": f"not finished in {timeout} s{note}"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{") and not line.startswith('{"progress"'):
            return json.loads(line)
    killed = p.returncode in (-9, 137)
    tail = (p.stderr or "").strip().splitlines()[-1:] or [""]
    if killed:
        error = "killed (out of memory?)"
    elif "memory" in tail[0].lower() or "bad_alloc" in tail[0]:
        error = oom_text(cap_gib) if cap_gib else "out of memory"
    else:
        error = f"failed (exit {p.returncode}): {tail[0][:120]}"
    return {"variant": variant, "length": length, "error": error}


def run_info(argv_text: str, threads: int | None = None, clock: str = "wall", repeats: int = 1) -> dict:
    import torch

    how = f", {threads} torch thread{'s' if threads != 1 else ''}" if threads else ""
    how += ", CPU-time clock" if clock == "cpu" else ""
    how += f", fastest of {repeats} alternating repeats" if repeats > 1 else ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{benchdoc.cpu_name()}, {os.cpu_count()} cores{how}, torch {torch.__version__}, {platform.system()}",
            "command": f"python -m finetune.long_bench {argv_text}".strip()}


def fastest(measured: list[dict]) -> dict:
    """One row from the repeated measurements of one (length, variant): the fastest step (on a
    shared machine the least disturbed one; the variants alternate, so each had the same chances),
    with the largest peak of them all. An error row stands when nothing was measured."""
    ok = [r for r in measured if "error" not in r]
    if not ok:
        return measured[0]
    best = dict(min(ok, key=lambda r: r["seconds"]))
    best["peak_gib"] = max(r["peak_gib"] for r in ok)
    if len(ok) > 1:
        best["all_seconds"] = [round(r["seconds"], 1) for r in ok]
    return best


def load_results(path: Path = RESULTS) -> dict:
    if not path.exists():
        return {"runs": [], "rows": []}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # a run cut short never leaves half a file (atomic): this one was edited
        raise ValueError(f"{path}: not the JSON `longtune bench long` writes ({e}); fix or delete it") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: expected {{'runs': [...], 'rows': [...]}}")  # noqa: TRY004 (a corrupt file, not a wrong argument type)
    return data


def merge(stored: dict, run: dict, rows: list[dict]) -> dict:
    """``stored`` with ``rows`` (measured by ``run``) in place of the stored rows of the same
    (length, variant); runs no row refers to any more are dropped, the rest renumbered."""
    new_keys = {(r["length"], r["variant"]) for r in rows}
    kept = [(stored["runs"][r["run"]], r) for r in stored["rows"] if (r["length"], r["variant"]) not in new_keys]
    pairs = kept + [(run, r) for r in rows]
    runs: list[dict] = []
    out = []
    for info, r in pairs:
        if info not in runs:
            runs.append(info)
        out.append({**r, "run": runs.index(info)})
    order = {v: i for i, v in enumerate(VARIANTS)}
    out.sort(key=lambda r: (r["length"], order.get(r["variant"], len(order))))
    return {"runs": runs, "rows": out}


def run_label(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"R{i}"


def table(results: dict) -> str:
    rows, runs = results["rows"], results["runs"]
    lines = [START, "## Long sequences: one SmolLM2-135M training step (`longtune bench long`)", "",
             "Runs (every row says which made it; rows are kept in `docs/benchmarks_long.json`):", ""]
    lines += [f"- {run_label(i)}: {r['date']}, {r['machine']}. Command: `{r['command']}`." for i, r in enumerate(runs)]
    lines += ["",
              ("LoRA+ (r 8 on q/k/v/o, embeddings and norms trained), fp32, batch 1, gradient checkpointing, one "
               "forward + backward + AdamW step on random tokens, one model per process. `longtune`: SF-Attn "
               "(group 1/4, 4 sinks) on the CPU block kernels, selective checkpointing (the attention outputs are "
               "kept, not recomputed: `memory.save_attention`); `+memory`: tiled loss, tiled MLP and checkpoint "
               "offload on (the offload cannot save host memory on a CPU); `peer`: transformers SDPA (full causal) "
               "+ peft LoRA, same rank and trained modules. Peak = peak resident set during the step (Linux VmHWM, "
               "reset after loading) minus the resident set before the model was built. Estimate = `longtune train "
               "--dry-run`'s per-rank total for that run. `OOM (> N GiB)`: the worker's address space may grow by N "
               "GiB at most (RLIMIT_AS) and the step needed more; a variant out of memory is not run at longer "
               "lengths. Step time: wall clock, or process CPU time where the run says `CPU-time clock`; where it says `fastest of N alternating repeats`, every variant was measured N times, round by round, and the row keeps the fastest step (and the largest peak). Speed-up = the peer's step time / this row's, both from the same run."), "",
              "| tokens | variant | step s | peak GiB | speed-up vs peer | estimate GiB | estimate / peak | run |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    peer = {r["length"]: r for r in rows if r["variant"] == "peer" and "error" not in r}
    for r in rows:
        label = run_label(r["run"])
        if "error" in r:
            lines.append(f"| {r['length']} | {r['variant']} | {r['error']} | | | | | {label} |")
            continue
        p = peer.get(r["length"])
        speed = (f"{p['seconds'] / r['seconds']:.2f}x" if p and r["variant"] != "peer" and p["run"] == r["run"]
                 else "")
        est = r.get("estimate_gib")
        lines.append(f"| {r['length']} | {r['variant']} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | {speed} | "
                     + (f"{est:.2f} | {est / r['peak_gib']:.2f} |" if est else " | |") + f" {label} |")
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
    ap.add_argument("--memory-cap", type=float, default=MEMORY_CAP_GIB,
                    help="GiB the address space of each measurement may grow by (0: no cap)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per measurement (default: torch's choice)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="step time: wall clock, or process CPU time (a shared machine; use with --threads 1)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure every (length, variant) this many times, alternating, and keep the fastest")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(capped_worker(args.worker[0], int(args.worker[1]), args.memory_cap, args.clock)), flush=True)
        return 0
    stored = load_results() if not args.no_write else {"runs": [], "rows": []}
    run = run_info(" ".join(argv), args.threads, args.clock, args.repeats)
    plan = [(n, ["longtune"], 1) for n in args.estimate_lengths]
    plan += [(n, list(args.variants), args.repeats) for n in sorted(args.lengths)]
    done: dict[tuple[int, str], list[dict]] = {}  # (length, variant) -> its measurements
    failed: dict[str, dict] = {}  # variant -> its first out-of-memory row
    for length, variants, repeats in plan:
        for _ in range(repeats):  # alternating: each variant once per round
            for variant in variants:
                measured = done.setdefault((length, variant), [])
                if variant in failed and length > failed[variant]["length"]:
                    if not measured:
                        measured.append({"variant": variant, "length": length,
                                         "error": f"not run ({failed[variant]['error']} at {failed[variant]['length']})"})
                    continue
                if any("error" in r for r in measured):  # out of memory or timed out: once is enough
                    continue
                r = measure(variant, length, args.timeout, args.memory_cap, args.threads, args.clock)
                if "OOM" in r.get("error", "") or "killed" in r.get("error", ""):
                    failed.setdefault(variant, r)
                print(json.dumps(r), flush=True)
                measured.append(r)
                if not args.no_write:  # after every measurement: a run stopped halfway keeps what it measured
                    save(merge(stored, run, [fastest(m) for m in done.values()]))
    rows = [fastest(m) for m in done.values()]
    text = table(merge(stored, run, rows))
    print(text)
    if not args.no_write:
        print(f"wrote {RESULTS} and {DOC}")
    return 0


def save(results: dict) -> None:
    from finetune.rundir import atomic_write_text

    atomic_write_text(RESULTS, json.dumps(results, indent=1) + "\n")
    write_section(table(results))


if __name__ == "__main__":
    raise SystemExit(main())

"""Attention benchmark: forward+backward time and peak memory of each pattern/backend vs full
causal SDPA, written to docs/benchmarks.md (between the bench:attention markers).

    python -m kernels.bench [--lengths 2048 4096 8192 16384] [--quick] [--no-write]
        [--heads 8 --head-dim 64] [--device cuda] [--json rows.json] [--output FILE.md]

CPU: fp32; GPU: bf16. One batch row, 8 heads, head_dim 64 by default (small model dims: the
attention is what is timed; ``--heads 32 --head-dim 128`` is a 7B model's attention). ``--quick``
runs 16k only for full causal and sink_window (the two the targets compare there) and skips the
masked-SDPA block_sparse case above 4k (it costs full attention plus a mask). FlexAttention has
no CPU backward, so flex is timed on GPU only; on a GPU, SF-Attn runs through both GPU
backends (FlexAttention and grouped SDPA, plus flash-attn when installed), S2-Attn through
grouped SDPA (and flash-attn), sink_window / block_sparse through FlexAttention (and flash-attn
for sink_window). ``--json`` writes the rows
measured so far after each length (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from kernels import benchdoc
from kernels.layout import attended_fraction
from kernels.masks import build_context, resolve_spec
from kernels.registry import run_backend

START, END = benchdoc.markers("attention")
HEADS, HEAD_DIM = 8, 64
TARGETS = {("s2_attn", 8192): 2.5, ("sf_attn", 8192): 2.5, ("sink_window", 16384): 3.0}
#: GPU targets (bf16 fwd+bwd vs full causal SDPA; the best GPU backend of the pattern counts)
GPU_TARGETS = {("sf_attn", 32768): 3.5}


def cases(n: int, device: str, quick: bool):
    """(label, spec, backend) to time at length n."""
    out = [("full causal", {"pattern": "causal"}, "sdpa")]
    big = quick and n > 8192
    cuda = device == "cuda"
    grouped = (["flash"] if _has_flash() else []) + ["flex", "sdpa_groups"] if cuda else ["sdpa_groups"]
    s2 = {"pattern": "s2_attn", "group_ratio": 0.25}
    sf = {"pattern": "sf_attn", "group_ratio": 0.25, "num_sink_tokens": 4}
    if not big:
        # S2 on a GPU through grouped SDPA (and flash-attn) only: each FlexAttention pattern costs a
        # compile per shape, and SF-Attn's FlexAttention row already shows that kernel on groups
        out += [("S2-Attn 1/4", s2, b) for b in grouped if b != "flex"]
        out += [("SF-Attn 1/4 +4 sinks", sf, b) for b in grouped]
    window = (["flash"] if _has_flash() else []) + ["flex"] if cuda else ["sdpa_groups"]
    sw = {"pattern": "sink_window", "window": n // 8, "num_sink_tokens": 4}
    out += [(f"sink_window W=N/8 ({n // 8})", sw, b) for b in window]
    block = {"pattern": "block_sparse", "block_size": 64, "local_blocks": 4, "stride": 8}
    if cuda:
        out.append(("block_sparse 64/4/8", block, "flex"))
    elif not (quick and n > 4096):
        out.append(("block_sparse 64/4/8", block, "sdpa"))
    return out


def _has_flash() -> bool:
    from kernels.backends import flash

    return flash.available()


def _glibc():
    """glibc keeps freed blocks (its mmap threshold grows after large frees), which hides a
    case's own peak: fix the threshold and trim before each measurement."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: large tensors always mmapped, freed at once
        return libc
    except (OSError, AttributeError):
        return None


class _PeakRSS:
    """Sampled resident-set high-water mark (CPU has no allocator statistics)."""

    libc = None

    def __enter__(self):
        if _PeakRSS.libc is None:
            _PeakRSS.libc = _glibc() or False
        if _PeakRSS.libc:
            _PeakRSS.libc.malloc_trim(0)
        self.base = self.peak = self._rss()
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def make_step(n: int, spec: dict, backend: str, device: str, heads: int = HEADS, head_dim: int = HEAD_DIM):
    """A closure running one forward+backward of the case."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = resolve_spec(spec)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    ctx = build_context(1, n, n, device)

    def step():
        out = run_backend(backend, q, k, v, spec, ctx, head_dim ** -0.5)
        out.sum().backward()
        q.grad = k.grad = v.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def measure(step, device: str) -> tuple[float, float]:
    """(seconds, peak extra MiB) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        step()
        secs = time.perf_counter() - t0
    mib = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else rss.mib
    return secs, mib


def machine(device: str) -> str:
    cpu = benchdoc.cpu_name()
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU {cpu}, {torch.get_num_threads()} torch threads"
    return f"{dev}; torch {torch.__version__}; {platform.system()}"


def run(lengths, device: str, quick: bool, repeats: int, heads: int = HEADS, head_dim: int = HEAD_DIM,
        json_path: Path | None = None) -> list[dict]:
    """Per length: warm every case up, then `repeats` rounds that time each case once in turn
    (interleaved, so load from other processes hits every case alike); keep each case's best.
    A case that fails (out of memory, a backend that cannot compile) is a row with its error;
    the others still run."""
    rows = []
    for n in lengths:
        todo, failed = [], []
        for label, spec, backend in cases(n, device, quick):
            try:
                step = make_step(n, spec, backend, device, heads, head_dim)
                t0 = time.perf_counter()
                step()  # warm-up (and compile for flex)
                print(f"{n:>6} {label:<28} {backend:<12} warm-up {time.perf_counter() - t0:7.1f} s", flush=True)
                todo.append((label, spec, backend, step))
            except Exception as e:  # noqa: BLE001 - reported in the table, the bench goes on
                failed.append((label, spec, backend, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                print(f"{n:>6} {label:<28} {backend:<12} FAILED {failed[-1][3]}", flush=True)
                _free(device)
        best = {(label, backend): (float("inf"), 0.0) for label, _s, backend, _ in todo}
        for _ in range(repeats):
            for label, _spec, backend, step in todo:
                secs, mib = measure(step, device)
                best[label, backend] = (min(best[label, backend][0], secs), max(best[label, backend][1], mib))
        base = best[todo[0][0], todo[0][2]][0] if todo and todo[0][1]["pattern"] == "causal" else None
        for label, spec, backend, _ in todo:
            secs, mib = best[label, backend]
            row = {"n": n, "label": label, "pattern": spec["pattern"], "backend": backend,
                   "fraction": attended_fraction(spec, n, heads), "ms": secs * 1e3, "mib": mib,
                   "speedup": base / secs if base else None}
            rows.append(row)
            print(f"{n:>6} {label:<28} {backend:<12} frac {row['fraction']:.3f}  {row['ms']:9.1f} ms  "
                  f"x{row['speedup'] or float('nan'):5.2f}  {mib:8.1f} MiB", flush=True)
        for label, spec, backend, err in failed:
            rows.append({"n": n, "label": label, "pattern": spec["pattern"], "backend": backend, "error": err})
        del todo
        _free(device)
        if json_path is not None:
            _write_json(json_path, rows, device, heads, head_dim)
    return rows


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _write_json(path: Path, rows: list[dict], device: str, heads: int, head_dim: int) -> None:
    """The rows so far with the machine line (temp file + rename: a cut-short run leaves a whole file)."""
    data = {"machine": machine(device), "device": device, "heads": heads, "head_dim": head_dim,
            "dtype": "bf16" if device == "cuda" else "fp32", "rows": rows,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    benchdoc.write_file(path, json.dumps(data, indent=1))


def table(rows, device: str, argv_text: str, heads: int = HEADS, head_dim: int = HEAD_DIM) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        START,
        "## Attention kernels (`longtune bench attention`)",
        "",
        f"Machine: {machine(device)}. Date: {now}.",
        f"Command: `python -m kernels.bench {argv_text}`.",
        "",
        (
            f"Forward + backward of one attention call, batch 1, {heads} heads, head_dim {head_dim}, "
            f"{'bf16' if device == 'cuda' else 'fp32'}; best of interleaved timed rounds after a warm-up. "
            "`attended` = pairs the pattern attends / pairs of full causal attention (the FLOP fraction, "
            "`kernels.layout.attended_fraction`); `speed-up` = full causal SDPA time / this time. "
            "Peak = extra memory during the timed steps "
            f"({'CUDA allocator peak' if device == 'cuda' else 'sampled RSS high-water mark, approximate'})."
        ),
        "",
        "| N | pattern | backend | attended | fwd+bwd ms | speed-up | peak MiB |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['label']} | {r['backend']} | | failed: {r['error']} | | |")
            continue
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        lines.append(f"| {r['n']} | {r['label']} | {r['backend']} | {r['fraction']:.3f} | {r['ms']:.1f} | "
                     f"{speed} | {r['mib']:.0f} |")
    lines.append("")
    verdicts = []
    for (pattern, n), target in (GPU_TARGETS if device == "cuda" else TARGETS).items():
        got = max(((r["speedup"], r["backend"]) for r in rows
                   if r["pattern"] == pattern and r["n"] == n and r.get("speedup")), default=None)
        if got:
            verdicts.append(f"{pattern} at {n}: {got[0]:.2f}x ({got[1]}; target >= {target}x: "
                            f"{'met' if got[0] >= target else 'NOT met'})")
    if verdicts:
        lines.append("Targets: " + "; ".join(verdicts) + ".")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_section(text: str, path: Path = benchdoc.DOC) -> None:
    """Replace the bench:attention section of docs/benchmarks.md, keeping every other section."""
    benchdoc.write_section(text, "attention", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="longtune bench attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--quick", action="store_true", help="16k only for causal and sink_window")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (best kept)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--heads", type=int, default=HEADS, help="attention heads (q = k = v heads)")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows (updated after each length)")
    ap.add_argument("--output", type=Path, default=benchdoc.DOC, help="markdown file whose section is rewritten")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    rows = run(args.lengths, device, args.quick, args.repeats, args.heads, args.head_dim, args.json)
    argv_text = " ".join(argv)
    text = table(rows, device, argv_text, args.heads, args.head_dim)
    if not args.no_write:
        write_section(text, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

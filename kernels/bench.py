"""Attention benchmark: forward+backward time and peak memory of each pattern/backend vs full
causal SDPA, written to docs/benchmarks.md (between the bench:attention markers).

    python -m kernels.bench [--lengths 2048 4096 8192 16384] [--quick] [--no-write]

CPU: fp32; GPU: bf16. One batch row, 8 heads, head_dim 64 (small model dims: the attention is
what is timed). ``--quick`` runs 16k only for full causal and sink_window (the two the targets
compare there) and skips the masked-SDPA block_sparse case above 4k (it costs full attention
plus a mask). FlexAttention has no CPU backward, so flex is timed on GPU only.
"""

from __future__ import annotations

import argparse
import datetime
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


def cases(n: int, device: str, quick: bool):
    """(label, spec, backend) to time at length n."""
    out = [("full causal", {"pattern": "causal"}, "sdpa")]
    big = quick and n > 8192
    grouped = "flash" if device == "cuda" and _has_flash() else ("flex" if device == "cuda" else "sdpa_groups")
    if not big:
        out.append(("S2-Attn 1/4", {"pattern": "s2_attn", "group_ratio": 0.25}, grouped))
        out.append(("SF-Attn 1/4 +4 sinks", {"pattern": "sf_attn", "group_ratio": 0.25, "num_sink_tokens": 4},
                    grouped))
    window = "flash" if device == "cuda" and _has_flash() else ("flex" if device == "cuda" else "sdpa_groups")
    out.append((f"sink_window W=N/8 ({n // 8})", {"pattern": "sink_window", "window": n // 8, "num_sink_tokens": 4},
                window))
    block = {"pattern": "block_sparse", "block_size": 64, "local_blocks": 4, "stride": 8}
    if device == "cuda":
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


def make_step(n: int, spec: dict, backend: str, device: str):
    """A closure running one forward+backward of the case."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = resolve_spec(spec)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    ctx = build_context(1, n, n, device)

    def step():
        out = run_backend(backend, q, k, v, spec, ctx, HEAD_DIM ** -0.5)
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


def run(lengths, device: str, quick: bool, repeats: int) -> list[dict]:
    """Per length: warm every case up, then `repeats` rounds that time each case once in turn
    (interleaved, so load from other processes hits every case alike); keep each case's best."""
    rows = []
    for n in lengths:
        todo = [(label, spec, backend, make_step(n, spec, backend, device)) for label, spec, backend in
                cases(n, device, quick)]
        for *_, step in todo:
            step()  # warm-up (and compile for flex)
        best = {label: (float("inf"), 0.0) for label, *_ in todo}
        for _ in range(repeats):
            for label, _spec, _backend, step in todo:
                secs, mib = measure(step, device)
                best[label] = (min(best[label][0], secs), max(best[label][1], mib))
        base = best[todo[0][0]][0]
        for label, spec, backend, _ in todo:
            secs, mib = best[label]
            row = {"n": n, "label": label, "pattern": spec["pattern"], "backend": backend,
                   "fraction": attended_fraction(spec, n, HEADS), "ms": secs * 1e3, "mib": mib,
                   "speedup": base / secs}
            rows.append(row)
            print(f"{n:>6} {label:<28} {backend:<12} frac {row['fraction']:.3f}  {row['ms']:9.1f} ms  "
                  f"x{row['speedup']:5.2f}  {mib:8.1f} MiB", flush=True)
    return rows


def table(rows, device: str, argv_text: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        START,
        "## Attention kernels (`longtune bench attention`)",
        "",
        f"Machine: {machine(device)}. Date: {now}.",
        f"Command: `python -m kernels.bench {argv_text}`.",
        "",
        (
            f"Forward + backward of one attention call, batch 1, {HEADS} heads, head_dim {HEAD_DIM}, "
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
        lines.append(f"| {r['n']} | {r['label']} | {r['backend']} | {r['fraction']:.3f} | {r['ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['mib']:.0f} |")
    lines.append("")
    verdicts = []
    for (pattern, n), target in TARGETS.items():
        got = [r["speedup"] for r in rows if r["pattern"] == pattern and r["n"] == n]
        if got:
            verdicts.append(f"{pattern} at {n}: {got[0]:.2f}x (target >= {target}x: {'met' if got[0] >= target else 'NOT met'})")
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
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = run(args.lengths, device, args.quick, args.repeats)
    argv_text = " ".join(argv)
    text = table(rows, device, argv_text)
    if not args.no_write:
        write_section(text)
        print(f"wrote {benchdoc.DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

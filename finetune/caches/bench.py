"""`longtune bench kv`: KV bytes and prefill/decode time of the caches on a small random Llama.

    python -m finetune.caches.bench [--lengths 512 1024 2048] [--no-write]

Full attention (DynamicCache) against the LongGen hybrid (1/3 full layers in the middle, the
rest sink_window), the sink cache and H2O at the same budget, at several context lengths, next
to the formula F/L + (L-F)/L * (W+s)/T. Prints a table and rewrites the `bench:kv` section of
docs/benchmarks.md with the machine and the date. CPU timings of a toy model: the bytes are
exact, the times only show the trend.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

BENCH_MD = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:kv -->", "<!-- /bench:kv -->"


def middle_full_layers(num_layers: int, fraction: float) -> list[int]:
    f = max(1, round(num_layers * fraction))
    start = (num_layers - f) // 2
    return list(range(start, start + f))


def hybrid_layout(num_layers: int, full: list[int], window: int, sinks: int) -> dict:
    sw = {"pattern": "sink_window", "window": window, "num_sink_tokens": sinks}
    layers = [{"pattern": "causal"} if i in full else dict(sw) for i in range(num_layers)]
    return {"version": 1, "backend": "auto", "cross_document": False, "layers": layers}


def causal_layout(num_layers: int) -> dict:
    return {
        "version": 1,
        "backend": "auto",
        "cross_document": False,
        "layers": [{"pattern": "causal"}] * num_layers,
    }


def use_layout(model, layout: dict) -> None:
    """Run `model` with the longtune attention function and `layout`."""
    from kernels.layout import install_layout

    install_layout(model.config, layout)


def formula(F: int, L: int, W: int, s: int, T: int) -> float:
    return float(Fraction(F, L) + Fraction(L - F, L) * Fraction(min(W + s, T), T))


@torch.no_grad()
def run_one(model, cache, T: int, decode: int, vocab: int, seed: int = 0) -> dict:
    from finetune.caches import cache_nbytes

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, T), generator=g)
    t0 = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True)
    prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(decode):
        nxt = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    per_tok = (time.perf_counter() - t0) / max(1, decode)
    return {
        "seen": cache.get_seq_length(),
        "nbytes": cache_nbytes(cache),
        "prefill_s": prefill,
        "decode_s": per_tok,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}"


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """`longtune bench kv` / `python -m finetune.caches.bench`: exit status 0 (rows: `run`)."""
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> list[dict]:
    """Measure, print the table, write docs/benchmarks.md (unless --no-write); the rows."""
    p = argparse.ArgumentParser(prog="longtune bench kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--full-fraction", type=float, default=1 / 3)
    p.add_argument("--window", type=int, default=128, help="sink_window / sink cache window W")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--decode", type=int, default=16, help="decode steps timed after the prefill")
    p.add_argument("--methods", nargs="+", default=["full", "hybrid", "sink", "h2o"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output", type=Path, default=BENCH_MD)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from finetune.caches import make_cache

    if args.threads:
        torch.set_num_threads(args.threads)
    L, W, s = args.layers, args.window, args.sinks
    vocab = 512
    full_idx = middle_full_layers(L, args.full_fraction)
    F = len(full_idx)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=L,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=vocab,
        max_position_embeddings=max(args.lengths) + args.decode + 8,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    kv_configs = {
        "full": None,
        "hybrid": {"method": "hybrid"},
        "sink": {"method": "sink", "window": W, "num_sink_tokens": s},
        "h2o": {"method": "h2o", "heavy": W // 2, "recent": W - W // 2, "num_sink_tokens": s},
    }
    rows = []
    for T in args.lengths:
        full_bytes = None
        for method in args.methods:
            use_layout(model, hybrid_layout(L, full_idx, W, s) if method == "hybrid" else causal_layout(L))

            def new_cache(method=method):
                return (
                    DynamicCache(config=model.config)
                    if method == "full"
                    else make_cache(model, kv_configs[method])
                )

            run_one(model, new_cache(), min(T, 64), 2, vocab)  # warm-up: first calls of each path
            cache = new_cache()
            r = run_one(model, cache, T, args.decode, vocab)
            if method == "full":
                full_bytes = r["nbytes"]
            seen = r["seen"]
            frac = r["nbytes"] / full_bytes if full_bytes else float("nan")
            pred = {"full": 1.0, "hybrid": formula(F, L, W, s, seen)}.get(method, formula(0, L, W, s, seen))
            rows.append({"method": method, "T": seen, **r, "fraction": frac, "formula": pred})
            print(
                f"{method:>6} T={seen:>5}  KV {r['nbytes'] / 2**20:8.2f} MiB  {frac:6.3f} of full "
                f"(formula {pred:6.3f})  prefill {r['prefill_s']:6.3f} s  decode {1e3 * r['decode_s']:7.2f} ms/token",
                flush=True,
            )

    header = (
        f"Random Llama, {L} layers (full: {full_idx[0]}..{full_idx[-1]}, F={F}), hidden {args.hidden}, "
        f"{args.heads} heads / {args.kv_heads} KV heads, fp32, batch 1; sink_window W={W}, s={s}; "
        f"sink cache W={W}, s={s}; H2O heavy {W // 2} + recent {W - W // 2} + {s} sinks (same budget). "
        f"T = tokens in the cache after the prefill and {args.decode} decode steps. Formula: "
        f"F/L + (L-F)/L x (W+s)/T (hybrid), (W+s)/T (sink, H2O: every layer compressed)."
    )
    table = [
        "| method | T | KV MiB | of full | formula | prefill s | decode ms/token |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['T']} | {r['nbytes'] / 2**20:.2f} | {r['fraction']:.3f} | {r['formula']:.3f} "
            f"| {r['prefill_s']:.3f} | {1e3 * r['decode_s']:.2f} |"
        )
    body = "\n".join(
        [
            "## KV caches (`longtune bench kv`)",
            "",
            f"Machine: {machine()}. Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
            f"Command: `{' '.join(['python -m finetune.caches.bench', *(argv or [])])}`.",
            "",
            header,
            "",
            *table,
            "",
            "Bytes are exact (`cache.nbytes()`: K/V held). CPU times of a toy model, shared cores: trends only.",
        ]
    )
    print()
    print("\n".join(table))
    if not args.no_write:
        write_section(args.output, body)
        print(f"\nwrote the bench:kv section of {args.output}")
    return rows


if __name__ == "__main__":
    sys.exit(main())

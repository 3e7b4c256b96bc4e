"""`longtune bench kv`: what each KV cache buys, in bytes, prefill and decode speed, next to full.

    python -m finetune.caches.bench [--model smollm2-135m | RUN_DIR | EXPORT_DIR]
        [--lengths 4096 16384] [--batch 1 4] [--decode 32] [--methods ...] [--rows FILE] [--no-write]

For each context length and batch size: a fresh cache per method (full = transformers'
DynamicCache; the LongGen hybrid, the sink cache and H2O at the same budget), a prefill of
random tokens (`logits_to_keep=1`, as generate does) timed and its peak memory measured
(finetune/caches/measure.py), then greedy decode steps timed one token at a time. Reported:
KV bytes held and their fraction of full (next to the formula F/L + (L-F)/L * (W+s)/T), prefill
and decode tokens/s, peak prefill memory, and each as a ratio to the full cache (x full: > 1 is
faster / < 1 is smaller). Without `--model` the model is a random Llama of the given shape (the
hybrid then gets 1/3 full layers in the middle, the rest sink_window); with `--model` (a run
directory, an export directory or the offline asset `smollm2-135m`) it is that model, and
`hybrid` runs its own LongGen layout or, for a model without one, the same synthetic layout as
the random model (full layers in the middle, the rest sink_window): the model was not trained
for it, so only its speed and memory mean anything (the tokens are random anyway). Prints a
table and rewrites the `bench:kv` section of docs/benchmarks.md with the machine, the date and
the command.

`--rows FILE` splits a long measurement into pieces (one length, batch or method per process,
e.g. each under its own hold of a machine lock): each run adds its rows to FILE (JSON; a row of
the same method, length and batch is replaced) and the section is written from all of FILE's
rows, the ratios against the full-cache row of the same length and batch wherever it came from;
(length, batch) pairs asked for but not measured (`--max-tokens`, a piece not run yet) are
listed as such. Pieces must share the model and cache settings (checked).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import platform
import shlex
import sys
from fractions import Fraction
from pathlib import Path

import torch

from finetune.rundir import atomic_write_text
from kernels import benchdoc

BENCH_MD = benchdoc.DOC
BEGIN, END = benchdoc.markers("kv")


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
def run_one(model, cache, T: int, decode: int, vocab: int, batch: int = 1, seed: int = 0, clock: str = "wall") -> dict:
    """Prefill `batch` rows of T random tokens into `cache`, then `decode` greedy steps."""
    from finetune.caches import cache_nbytes
    from finetune.caches.measure import CLOCKS, OtherLoad, sync, timed_peak

    device = model.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, T), generator=g).to(device)
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    from kernels.registry import kernel_calls, reset_kernel_calls

    reset_kernel_calls()
    with OtherLoad() as load:
        out, prefill, peak = timed_peak(lambda: model(input_ids=ids, cache=cache, use_cache=True, **kw), device, clock)
    prefill_kernels = {f"{p}/{b}": n for (p, b), n in sorted(kernel_calls().items())}
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    sync(device)
    now = CLOCKS[clock]
    t0 = now()
    for _ in range(decode):
        nxt = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    sync(device)
    per_tok = (now() - t0) / max(1, decode)
    return {
        "batch": batch,
        "seen": cache.get_seq_length(),
        "nbytes": cache_nbytes(cache),
        "prefill_s": prefill,
        "prefill_tokens_per_s": batch * T / prefill if prefill > 0 else float("nan"),
        "peak_prefill_bytes": peak,
        "decode_s": per_tok,
        "decode_tokens_per_s": batch / per_tok if per_tok > 0 else float("nan"),
        "prefill_kernels": prefill_kernels,  # the attention calls of the prefill (pattern/backend)
        "others_cpus": load.cpus,  # CPUs other processes kept busy during the prefill (None: unknown)
    }


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add each row's ratio to the full cache of the same length and batch: tokens/s (> 1 is
    faster), peak prefill memory (< 1 is smaller) and the KV bytes' fraction."""
    full = {(r["T"], r["batch"]): r for r in rows if r["method"] == "full"}
    for r in rows:
        f = full.get((r["T"], r["batch"]))
        r["fraction"] = r["nbytes"] / f["nbytes"] if f and f.get("nbytes") else None
        for key, out in (("prefill_tokens_per_s", "prefill_x"), ("decode_tokens_per_s", "decode_x"),
                         ("peak_prefill_bytes", "memory_x")):  # fmt: skip
            r[out] = r[key] / f[key] if f and r.get(key) is not None and f.get(key) else None
    return rows


def machine() -> str:
    return f"{benchdoc.cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}"


def write_section(path: Path, body: str) -> None:
    benchdoc.write_section(f"{BEGIN}\n{body.rstrip()}\n{END}", "kv", path)


METHOD_ORDER = ("full", "hybrid", "sink", "h2o")


def merge_rows(path: Path, rows: list[dict], setting: dict, command: str,
               requested: list[tuple[int, int]] = ()) -> tuple[list[dict], list[str], list[tuple[int, int]]]:
    """`--rows`: FILE's rows with these replacing any of the same (method, length, batch), saved
    atomically; (all rows, the commands that measured them, every (length, batch) pair asked
    for so far, measured or skipped). Raises SystemExit(2) when FILE was measured with other
    settings (model, shapes, cache budgets, clock)."""
    old = {"setting": setting, "commands": [], "rows": []}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old_setting, old_rows, commands = old["setting"], old["rows"], list(old["commands"])
            pairs = {tuple(x) for x in old.get("pairs", [])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--rows {path}: not a rows file of `longtune bench kv` ({e})") from None
        if old_setting != setting:
            diff = sorted(k for k in set(setting) | set(old_setting) if setting.get(k) != old_setting.get(k))
            print(f"error: --rows {path} was measured with other settings ({', '.join(diff)}); "
                  "use another file", file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
    else:
        old_rows, commands, pairs = [], [], set()
    key = lambda r: (r["method"], r["length"], r["batch"])
    new = {key(r) for r in rows}
    merged = [r for r in old_rows if key(r) not in new] + [dict(r) for r in rows]
    merged.sort(key=lambda r: (r["length"], r["batch"], METHOD_ORDER.index(r["method"])))
    if rows and command not in commands:  # a run that measured nothing only rewrites the table
        commands.append(command)
    pairs = sorted(pairs | {tuple(x) for x in requested} | {(r["length"], r["batch"]) for r in merged})
    atomic_write_text(path, json.dumps({"setting": setting, "commands": commands, "pairs": pairs, "rows": merged}, indent=1))
    return merged, commands, pairs


def main(argv: list[str] | None = None) -> int:
    """`longtune bench kv` / `python -m finetune.caches.bench`: exit status 0 (rows: `run`)."""
    run(argv)
    return 0


def load_model(name: str, dtype: str):
    """`--model`: a run directory, an export directory or an asset alias (`smollm2-135m`)."""
    from data_prep.assets import resolve_model
    from finetune.loading import load_model as load

    return load(resolve_model(name), dtype=dtype).eval()


def run(argv: list[str] | None = None) -> list[dict]:
    """Measure, print the table, write docs/benchmarks.md (unless --no-write); the rows."""
    p = argparse.ArgumentParser(prog="longtune bench kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="run dir, export dir or smollm2-135m (default: a random Llama of the shape below)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (--model or the random Llama)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (rows of random tokens)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="skip (length, batch) pairs whose batch x length exceeds this (e.g. batch 4 at 16k on a CPU)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--full-fraction", type=float, default=1 / 3)
    p.add_argument("--window", type=int, default=128, help="sink_window / sink cache window W")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--decode", type=int, default=16, help="decode steps timed after the prefill")
    p.add_argument("--methods", nargs="+", default=["full", "hybrid", "sink", "h2o"],
                   choices=["full", "hybrid", "sink", "h2o"])
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per method, interleaved; the best time (and memory) of each is reported")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall clock, or process CPU time (a shared machine; use with --threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=BENCH_MD)
    p.add_argument("--json", type=Path, default=None,
                   help="also write the rows measured so far (after each length and batch) as JSON")
    p.add_argument("--rows", type=Path, default=None,
                   help="JSON file that collects rows across runs (pieces); the table shows all of them")
    p.add_argument("--note", default="", help="a sentence added to the section (e.g. how the pieces' runs differed)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    if min(args.lengths) < 1 or min(args.batch) < 1 or args.decode < 1 or args.repeat < 1:
        p.error("--lengths, --batch, --decode and --repeat must be >= 1")

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from finetune.caches import make_cache
    from finetune.caches.hybrid import layout_of
    from kernels.layout import is_hybrid, sparse_layer_indices

    if args.threads:
        torch.set_num_threads(args.threads)
    W, s = args.window, args.sinks
    methods = [m for m in METHOD_ORDER if m in args.methods]
    if "full" not in methods and not args.rows:
        p.error("--methods without full needs --rows FILE holding the full-cache rows (the ratios' reference)")
    if args.model:
        model = load_model(args.model, args.dtype).to(args.device)
        cfg = model.config
        L, vocab = cfg.num_hidden_layers, cfg.vocab_size
        own = layout_of(cfg)
        hybrid_model = is_hybrid(own)
        if hybrid_model:
            full_idx = [i for i in range(L) if i not in set(sparse_layer_indices(own))]
        else:
            full_idx = middle_full_layers(L, args.full_fraction)
        base_layout = own if hybrid_model else causal_layout(L)
        what = (f"{args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
                f"heads / {cfg.num_key_value_heads} KV heads, {args.dtype}"
                + (", its own hybrid layout" if hybrid_model else
                   f"; hybrid: run with a LongGen layout it was not trained for, speed and memory only: full layers "
                   f"{full_idx[0]}..{full_idx[-1]} (F={len(full_idx)}), the rest sink_window W={W}, s={s}") + ")")  # fmt: skip
    else:
        L, vocab = args.layers, 512
        full_idx = middle_full_layers(L, args.full_fraction)
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=L,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=vocab,
            max_position_embeddings=max(args.lengths) + args.decode + 8,
        )  # fmt: skip
        with torch.device(args.device):  # initialised where it runs (a 1B model: seconds, not a minute)
            model = LlamaForCausalLM(cfg)
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        hybrid_model, base_layout = False, causal_layout(L)
        what = (f"Random Llama, {L} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads, "
                f"{args.dtype}; hybrid: full layers {full_idx[0]}..{full_idx[-1]} (F={len(full_idx)}), the rest "
                f"sink_window W={W}, s={s}")  # fmt: skip
    F = len(full_idx) if "hybrid" in methods or hybrid_model else L
    kv_configs = {
        "full": None,
        "hybrid": {"method": "hybrid"},
        "sink": {"method": "sink", "window": W, "num_sink_tokens": s},
        "h2o": {"method": "h2o", "heavy": W // 2, "recent": W - W // 2, "num_sink_tokens": s},
    }
    rows, skipped = [], []
    full_bytes = None
    for T in args.lengths:
        for B in args.batch:
            if args.max_tokens and B * T > args.max_tokens:
                skipped.append(f"batch {B} at {T}")
                print(f"skipped batch {B} at {T}: {B * T} tokens > --max-tokens {args.max_tokens}", flush=True)
                continue
            best: dict[str, dict] = {}
            for _ in range(args.repeat):  # methods interleaved; each keeps its best time
                for method in methods:
                    if method == "hybrid" and not hybrid_model:
                        use_layout(model, hybrid_layout(L, full_idx, W, s))
                    else:
                        use_layout(model, base_layout)

                    def new_cache(method=method):
                        if method == "full":
                            return DynamicCache(config=model.config)
                        return make_cache(model, kv_configs[method])

                    if method not in best:
                        run_one(model, new_cache(), min(T, 64), 2, vocab, B)  # warm-up: first calls of each path
                    r = run_one(model, new_cache(), T, args.decode, vocab, B, clock=args.clock)
                    b = best.setdefault(method, r)
                    if r["prefill_s"] < b["prefill_s"]:  # the load of the run whose time is kept
                        b["others_cpus"] = r["others_cpus"]
                    for key in ("prefill_s", "decode_s", "peak_prefill_bytes"):
                        if r[key] is not None and (b[key] is None or r[key] < b[key]):
                            b[key] = r[key]
                    b["prefill_tokens_per_s"] = B * T / b["prefill_s"]
                    b["decode_tokens_per_s"] = B / b["decode_s"] if b["decode_s"] > 0 else float("nan")
            for method in methods:
                r = best[method]
                seen = r["seen"]
                if method == "full":
                    full_bytes = r["nbytes"]
                pred = {"full": 1.0, "hybrid": formula(F, L, W, s, seen)}.get(method, formula(0, L, W, s, seen))
                rows.append({"method": method, "length": T, "T": seen, **r, "formula": pred})
                frac = f"{r['nbytes'] / full_bytes:6.3f} of full " if "full" in methods else ""
                print(
                    f"{method:>6} T={seen:>5} batch {B}  KV {r['nbytes'] / 2**20:8.2f} MiB {frac}"
                    f"(formula {pred:6.3f})  prefill {r['prefill_tokens_per_s']:9.1f} tok/s "
                    f"peak {_mib(r['peak_prefill_bytes'])} MiB  decode {r['decode_tokens_per_s']:8.2f} tok/s"
                    f"  (others: {_cpus(r.get('others_cpus'))} CPUs busy)",
                    flush=True,
                )
            if args.json is not None:
                _write_json(args.json, with_ratios(rows), what, W, s, args)
    command = shlex.join(["python", "-m", "finetune.caches.bench", *(argv if argv is not None else sys.argv[1:])])
    commands = [command]
    if args.rows:
        setting = {"model": what, "window": W, "sinks": s, "decode": args.decode, "clock": args.clock,
                   "threads": torch.get_num_threads(), "repeat": args.repeat}  # fmt: skip
        requested = [(T, B) for T in args.lengths for B in args.batch]
        rows, commands, pairs = merge_rows(args.rows, rows, setting, command, requested)
        have = {(r["method"], r["length"], r["batch"]) for r in rows}
        ran = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
        skipped = [f"batch {B} at {T}" for T, B in pairs if not any((m, T, B) in have for m in ran)]
        skipped += [f"{m} at {T} batch {B}" for T, B in pairs for m in ran
                    if (m, T, B) not in have and any((x, T, B) in have for x in ran)]  # fmt: skip
    with_ratios(rows)
    table = [
        (
            "| method | T | batch | KV MiB | of full | formula | prefill tok/s | x full | peak prefill MiB | x full "
            "| decode tok/s | x full |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['T']} | {r['batch']} | {r['nbytes'] / 2**20:.2f} | {_x(r['fraction'], 3)} "
            f"| {r['formula']:.3f} | {r['prefill_tokens_per_s']:.1f} | {_x(r['prefill_x'])} "
            f"| {_mib(r['peak_prefill_bytes'])} | {_x(r['memory_x'])} | {r['decode_tokens_per_s']:.2f} "
            f"| {_x(r['decode_x'])} |"
        )
    header = (
        f"{what}. Sink cache W={W}, s={s}; H2O heavy {W // 2} + recent {W - W // 2} + {s} sinks (the same "
        f"budget). T = tokens seen after the prefill and {args.decode} decode steps (timed one by one; "
        f"best of {args.repeat} interleaved run(s) per method). "
        f"Formula: F/L + (L-F)/L x (W+s)/T (hybrid), (W+s)/T (sink, H2O: every layer compressed). "
        f"x full: this method's tokens/s (prefill, decode) or peak prefill memory over the full cache's "
        f"at the same T and batch."
        + _load_sentence(rows, args.clock)
        + (f" Not measured: {', '.join(skipped)}." if skipped else "")
        + (f" {args.note.strip()}" if args.note.strip() else "")
    )
    body = "\n".join(
        [
            "## KV caches (`longtune bench kv`)",
            "",
            f"Machine: {machine()}. Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
            ("Command: " if len(commands) == 1 else "Commands (one piece each, rows merged with `--rows`): ")
            + "; ".join(f"`{c}`" for c in commands) + ".",
            "",
            header,
            "",
            *table,
            "",
            "Bytes are exact (`cache.nbytes()`: K/V held). Peak prefill memory: growth of the process during "
            "the prefill (finetune/caches/measure.py). Times: "
            + ("wall clock." if args.clock == "wall" else "process CPU time (`--clock cpu`), one torch thread per "
               "process on a shared machine: the work itself, not what a user waits on a busy box."),
        ]
    )
    print()
    print("\n".join(table))
    if not args.no_write:
        write_section(args.output, body)
        print(f"\nwrote the bench:kv section of {args.output}")
    return rows


def _write_json(path: Path, rows: list[dict], what: str, W: int, s: int, args) -> None:
    """Rows so far + what was measured (temp file + rename: a run cut short leaves a whole file)."""
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else benchdoc.cpu_name()
    data = {"machine": f"{name}, torch {torch.__version__}", "model": what, "window": W, "sinks": s,
            "decode": args.decode, "clock": args.clock, "rows": rows,
            "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def _cpus(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def _load_sentence(rows: list[dict], clock: str) -> str:
    """What the neighbours did while the prefills ran (finetune.caches.measure.OtherLoad)."""
    loads = [r["others_cpus"] for r in rows if r.get("others_cpus") is not None]
    if not loads:
        return ""
    import os

    text = (f" Other processes kept {min(loads):.1f}-{max(loads):.1f} of the machine's {os.cpu_count()} CPUs "
            "busy during the timed prefills (/proc/stat; 0: a quiet machine)")
    if clock == "cpu" and max(loads) >= 0.5:
        text += ("; with the CPU-time clock, neighbours competing for caches and memory bandwidth slow "
                 "some methods more than others, so compare ratios measured under similar load")
    return text + "."


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _x(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())

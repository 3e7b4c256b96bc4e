"""`make ablation`: the papers' choices side by side on the demo's small model.

Six ways to extend the demo's 256-token base to 2048 tokens, at equal steps, data and seed
(every row is `recipes/demo/extend-sfattn.yaml` with only the named keys changed):

| row | what changes | the paper's claim it tests |
| --- | --- | --- |
| full-ft | causal attention, every weight trained | LongLoRA: the reference |
| full-lora+ | causal attention, LoRA + embeddings + norms | LongLoRA: LoRA+ close to full fine-tuning |
| s2-lora+ | S2-Attn, LoRA+ | LongLoRA: S2-Attn + LoRA+ close to full fine-tuning |
| sf-lora+ | SF-Attn, LoRA+ (the demo's run) | SinkLoRA: SF-Attn better than S2-Attn |
| sf-lora | SF-Attn, plain LoRA (no embeddings, no norms) | LongLoRA: plain LoRA far worse |
| hybrid | LongGen hybrid (recipes/demo/extend-hybrid.yaml, the demo's run) | LongGen: close to full attention, small KV cache |

Each row is trained (`longtune train`), exported and evaluated (perplexity at every eval
length, passkey and needle retrieval) by the same commands as the demo; the demo's own
SF-Attn and hybrid runs are reused for seed 0 when they exist. Rows whose perplexity or
retrieval at the longest length lies close to another row's get a second seed
(`training.seed`: initialisation and data order; the prepared data stay the same), and the
table shows the mean and the spread (half the range). Writes runs/ablation/results.json,
docs/ablation.md, docs/ablation/ablation.png and the README block between
`<!-- ablation:table -->` markers, all from the runs; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.demo import DEMO, REPO, _longtune, _run
from finetune.rundir import final_dir

ROOT = Path("runs/ablation")  # relative to the repo: the commands run there

#: `--smoke`: the whole path (train, export, eval, table, plot) in about a minute per row:
#: 2 steps at 256 tokens, one window and one trial per suite, in runs/ablation-smoke, the
#: demo's runs never reused and docs/README untouched (the table lands in that folder).
SMOKE_OVERRIDES = (
    "training.max_steps=2", "training.save_steps=2", "training.warmup_steps=0", "data.seq_length=256",
    "data.output_dir=runs/ablation-smoke/data",
    ("data.sources=[{type: corpus, path: shakespeare}, {type: synthetic_retrieval, path: retrieval, weight: 0.66, "
     "synthetic: {documents: 200, min_chars: 110, max_chars: 256}}]"),
    "eval.lengths=[256,512]", "eval.perplexity_max_windows=1", "eval.passkey_trials=1",
    "eval.needle_depths=[0.5]", "eval.needle_trials=1",
)  # fmt: skip
_smoke: dict = {"on": False}


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    recipe: str  # file under recipes/demo
    overrides: tuple[str, ...] = ()
    demo_run: str | None = None  # the demo's run of exactly this recipe (reused for seed 0)


ROWS = (
    Row("full-ft", "full attention, full fine-tuning", "extend-sfattn.yaml",
        ("attention.pattern=causal", "lora.mode=full")),
    Row("full-lora+", "full attention, LoRA+", "extend-sfattn.yaml", ("attention.pattern=causal",)),
    Row("s2-lora+", "S2-Attn, LoRA+", "extend-sfattn.yaml",
        ("attention.pattern=s2_attn", "attention.num_sink_tokens=0")),
    Row("sf-lora+", "SF-Attn, LoRA+", "extend-sfattn.yaml", (), "runs/demo/extend-sfattn"),
    Row("sf-lora", "SF-Attn, plain LoRA", "extend-sfattn.yaml",
        ("lora.trainable_embeddings=false", "lora.trainable_norms=false")),
    Row("hybrid", "LongGen hybrid, LoRA+", "extend-hybrid.yaml", (), "runs/demo/extend-hybrid"),
)  # fmt: skip
ROW_NAMES = tuple(r.name for r in ROWS)
EVAL_SUITES = "eval.suites=[perplexity,passkey,needle]"

#: Two rows are "close" (each gets a second seed) when their perplexities at the longest length
#: differ by less than this fraction; the verdicts call rows this close "close" too.
PPL_CLOSE = 0.05


# --------------------------------------------------------------------------- running
def root() -> Path:
    return Path("runs/ablation-smoke") if _smoke["on"] else ROOT


def run_dir(row: Row, seed: int) -> Path:
    if seed == 0 and row.demo_run and not _smoke["on"] and final_dir(REPO / row.demo_run).is_dir():
        return Path(row.demo_run)
    return root() / row.name / f"seed{seed}"


def run_row(row: Row, seed: int, times: dict[str, float]) -> Path:
    """Train (unless finished), export and evaluate one row; its run directory."""
    rd = run_dir(row, seed)
    overrides = [*row.overrides, f"run_dir={rd}", f"name=ablation-{row.name}-seed{seed}"]
    if _smoke["on"]:
        overrides += [*SMOKE_OVERRIDES, f"model.name_or_path={_smoke['base']}"]
    if seed:
        overrides.append(f"training.seed={seed}")
    if rd == Path(row.demo_run or "-"):
        overrides = []  # the demo's run, as the demo made it
    base = _mtime(Path(_smoke["base"]) if _smoke["on"] else final_dir(REPO / BASE_RUN))
    if not final_dir(REPO / rd).is_dir() or _mtime(REPO / rd / "run.json") < base:
        # a run extended from an older base is redone, never mixed with this base's rows
        stale = ["overwrite=true"] if final_dir(REPO / rd).is_dir() else []
        times[f"train {row.name} seed {seed}"] = _run(
            f"train {row.name} seed {seed}", _longtune("train", str(DEMO / row.recipe), *overrides, *stale)
        )
    results = REPO / rd / "eval" / "results.json"
    if _mtime(results) < _mtime(REPO / rd / "run.json"):
        _run(f"export {row.name} seed {seed}", _longtune("export", str(rd), "--force"))
        times[f"eval {row.name} seed {seed}"] = _run(
            f"eval {row.name} seed {seed}", _longtune("eval", str(rd), "--no-base", EVAL_SUITES)
        )
    return rd


BASE_RUN = "runs/demo/pretrain"


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def _finished(row: Row, seed: int) -> bool:
    return (REPO / run_dir(row, seed) / "eval" / "results.json").is_file()


def ensure_base(times: dict[str, float]) -> None:
    from finetune.recipe import load_recipe

    pre = load_recipe(DEMO / "pretrain.yaml")
    if not final_dir(REPO / pre.run_dir).is_dir():
        times["pretrain (256 tokens)"] = _run("pretrain", _longtune("train", str(DEMO / "pretrain.yaml")))


# --------------------------------------------------------------------------- measuring
def kv_bytes(config: dict, length: int) -> int:
    """KV-cache bytes after `length` tokens with the model's own attention: every layer keeps
    keys and values of `length` tokens, a LongGen sink-window layer of `sinks + window` at most."""
    layers = config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[
        str(config.get("dtype") or config.get("torch_dtype") or "float32")
    ]
    per_token = 2 * kv_heads * head_dim * itemsize
    layout = (config.get("longtune_attention") or {}).get("layers") or [{"pattern": "causal"}] * layers
    total = 0
    for spec in layout:
        kept = length
        if spec.get("pattern") == "sink_window":
            kept = min(length, spec.get("num_sink_tokens", 0) + spec["window"])
        total += kept * per_token
    return total


def row_result(row: Row, seed: int, rd: Path) -> dict:
    """One run's numbers: perplexity and retrieval per length, s/step, parameters, KV bytes."""
    res = json.loads((REPO / rd / "eval" / "results.json").read_text())
    run = json.loads((REPO / rd / "run.json").read_text())
    suites = res["suites"]
    ppl = suites["perplexity"]["results"]["tuned"]["longlora"]
    passkey = suites["passkey"]["results"]["tuned"]
    needle = suites["needle"]["results"]["tuned"]
    lengths = sorted(int(L) for L in ppl)
    last = next((h for h in reversed(run.get("log_history", [])) if "train_runtime" in h), {})
    steps = run.get("global_step") or last.get("step")
    export_cfg = json.loads((REPO / rd / "export" / "config.json").read_text())
    return {
        "row": row.name,
        "label": row.label,
        "seed": seed,
        "run_dir": str(rd),
        "steps": steps,
        "seconds_per_step": last["train_runtime"] / steps if last and steps else None,
        "trained": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((REPO / rd / "run.json").stat().st_mtime)),
        "trainable_params": run.get("trainable_params"),
        "total_params": run.get("total_params"),
        "ppl": {str(L): ppl[str(L)]["ppl"] for L in lengths},
        "passkey": {L: v.get("accuracy") for L, v in passkey.items()},
        "needle": {
            str(L): (None if any(a is None for a in accs) else sum(accs) / len(accs))
            for L, accs in zip(needle["lengths"], needle["accuracy"])
        },
        "kv_bytes": {str(L): kv_bytes(export_cfg, L) for L in lengths},
    }


def close_rows(results: list[dict], length: str) -> set[str]:
    """Rows whose perplexity at `length` is within PPL_CLOSE (relative) of another row's: they
    get a second seed. (Retrieval does not decide: 10 trials per length move in steps of 10%.)"""
    out = set()
    for a in results:
        for b in results:
            pa, pb = a["ppl"].get(length), b["ppl"].get(length)
            if (
                a["row"] != b["row"]
                and pa is not None
                and pb is not None
                and abs(pa - pb) / min(pa, pb) < PPL_CLOSE
            ):
                out |= {a["row"], b["row"]}
    return out


# --------------------------------------------------------------------------- summarising
def _mean_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    return mean, ((max(vals) - min(vals)) / 2 if len(vals) > 1 else None)


def aggregate(runs: list[dict]) -> list[dict]:
    """Per row (in ROWS order): mean and spread over its seeds of every number."""
    out = []
    order = {n: i for i, n in enumerate(ROW_NAMES)}
    for name in sorted({r["row"] for r in runs}, key=lambda n: order.get(n, len(order))):
        rs = [r for r in runs if r["row"] == name]
        agg = {"row": name, "label": rs[0]["label"], "seeds": sorted(r["seed"] for r in rs)}
        for key in ("seconds_per_step", "trainable_params", "total_params", "steps"):
            agg[key] = _mean_spread([r.get(key) for r in rs])[0]
        for key in ("ppl", "passkey", "needle", "kv_bytes"):
            lengths = sorted({L for r in rs for L in r[key]}, key=int)
            agg[key] = {L: _mean_spread([r[key].get(L) for r in rs]) for L in lengths}
        out.append(agg)
    return out


def _fmt(ms: tuple, digits: int = 2, pct: bool = False) -> str:
    mean, spread = ms
    if mean is None:
        return "n/a"
    scale = 100 if pct else 1
    text = f"{mean * scale:.{0 if pct else digits}f}{'%' if pct else ''}"
    if spread is not None:
        text += f" ± {spread * scale:.{0 if pct else digits}f}{'%' if pct else ''}"
    return text


def table(rows: list[dict]) -> str:
    lengths = sorted({L for r in rows for L in r["ppl"]}, key=int)
    Lmax = lengths[-1] if lengths else "?"
    head = (["row", "seeds"] + [f"ppl {L}" for L in lengths]
            + [f"passkey {Lmax}", f"needle {Lmax}", "s/step", "trainable params", f"KV MiB at {Lmax}"])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        kv = r["kv_bytes"].get(Lmax, (None, None))[0]
        cells = [f"{r['row']} ({r['label']})", ", ".join(map(str, r["seeds"]))]
        cells += [_fmt(r["ppl"].get(L, (None, None))) for L in lengths]
        cells += [
            _fmt(r["passkey"].get(Lmax, (None, None)), pct=True),
            _fmt(r["needle"].get(Lmax, (None, None)), pct=True),
        ]
        cells += ["n/a" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}",
                  "n/a" if r["trainable_params"] is None else f"{int(r['trainable_params']):,}",
                  "n/a" if kv is None else f"{kv / 2**20:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The papers' orderings against ours, said plainly (perplexity at the longest length; a
    difference inside the seed spread is no ordering)."""
    by = {r["row"]: r for r in rows}
    lengths = sorted({L for r in rows for L in r["ppl"]}, key=int)
    if not lengths:
        return []
    L = lengths[-1]

    def p(name):
        return by[name]["ppl"].get(L, (None, None)) if name in by else (None, None)

    def within(a, b):  # |a - b| inside the sum of the spreads
        return abs(a[0] - b[0]) <= (a[1] or 0) + (b[1] or 0)

    out = []

    def claim(text, a, b, holds):
        pa, pb = p(a), p(b)
        if pa[0] is None or pb[0] is None:
            out.append(f"- {text}: not measured ({a} or {b} missing).")
            return
        ours = f"{a} {pa[0]:.2f} vs {b} {pb[0]:.2f} at {L}"
        if within(pa, pb) and (pa[1] or pb[1]):
            out.append(f"- {text}: ours {ours}, inside the seed spread: no ordering either way.")
        else:
            out.append(f"- {text}: ours {ours}: **{'agrees' if holds(pa[0], pb[0]) else 'disagrees'}**.")

    rel = PPL_CLOSE
    claim(
        "LongLoRA: S2-Attn + LoRA+ is close to full fine-tuning (PG19 8k: 8.04 vs 8.02)",
        "s2-lora+",
        "full-ft",
        lambda a, b: abs(a - b) / b < rel,
    )
    claim(
        "LongLoRA: plain LoRA is far worse than LoRA+", "sf-lora", "sf-lora+", lambda a, b: (a - b) / b >= rel
    )
    claim(
        "SinkLoRA: SF-Attn is better than S2-Attn (9.09 -> 8.64)", "sf-lora+", "s2-lora+", lambda a, b: a < b
    )
    claim(
        "LongGen: the hybrid is close to full attention",
        "hybrid",
        "full-lora+",
        lambda a, b: abs(a - b) / b < rel,
    )
    if "hybrid" in by and "full-lora+" in by:
        kh, kf = by["hybrid"]["kv_bytes"].get(L, (None,))[0], by["full-lora+"]["kv_bytes"].get(L, (None,))[0]
        if kh and kf:
            out.append(
                f"- LongGen: ... at a fraction of the KV cache: ours {kh / kf:.1%} of full attention's at {L}."
            )
    out.append(
        f'("close": within {rel:.0%} of the other row\'s perplexity; "far worse": at least {rel:.0%} higher.)'
    )
    return out


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        Ls = sorted(r["ppl"], key=int)
        ys = [r["ppl"][L][0] for L in Ls]
        err = [r["ppl"][L][1] or 0 for L in Ls]
        a1.errorbar([int(L) for L in Ls], ys, yerr=err, marker="o", capsize=3, label=r["row"])
    a1.set_xscale("log", base=2)
    a1.set_xlabel("context length (tokens)")
    a1.set_ylabel("perplexity (LongLoRA protocol)")
    a1.legend(fontsize=8)
    a1.set_title("perplexity vs length")
    lengths = sorted({L for r in rows for L in r["ppl"]}, key=int)
    L = lengths[-1] if lengths else "?"
    xs = range(len(rows))
    for k, (suite, off) in enumerate((("passkey", -0.2), ("needle", 0.2))):
        vals = [(r[suite].get(L, (None, None))[0] or 0) for r in rows]
        errs = [(r[suite].get(L, (None, None))[1] or 0) for r in rows]
        a2.bar([x + off for x in xs], vals, width=0.4, yerr=errs, capsize=3, label=suite)
    a2.set_xticks(list(xs), [r["row"] for r in rows], rotation=30, fontsize=8)
    a2.set_ylim(0, 1.05)
    a2.set_ylabel(f"accuracy at {L}")
    a2.legend(fontsize=8)
    a2.set_title(f"retrieval at {L}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


README_START, README_END = "<!-- ablation:table -->", "<!-- /ablation:table -->"


def write_outputs(results: dict, repo: Path = REPO, smoke_dir: Path | None = None) -> str:
    """docs/ablation.md, docs/ablation/ablation.png and the README block, from results.json's dict
    (a smoke run writes ablation.md and ablation/ablation.png into `smoke_dir` only)."""
    from finetune.rundir import atomic_write_text
    from kernels.benchdoc import replace_marked

    rows = aggregate(results["runs"])
    tbl = table(rows)
    smoke = [
        "**Smoke test** (`--smoke`: 2 steps at 256 tokens, tiny eval): the path works; these are not results.",
        "",
    ]
    header = (f"{results['created']} · {results.get('device', 'CPU')} · base `runs/demo/pretrain/final` "
              f"(trained at 256 tokens) · every row {results.get('steps', '?')} steps at 2048 tokens on the same "
              "prepared data (`runs/demo/data-2048`) and seed; rows close to another get a second `training.seed`, "
              "shown as mean ± half the range.")  # fmt: skip
    legend = ("Perplexity: LongLoRA protocol on the held-out plays. Retrieval: passkey (exact key) and needle "
              "(mean over depths), held-out keys. s/step: seconds per optimizer step of that run on this machine "
              "(2 DeepSpeed CPU ranks). KV: cache bytes after the longest length with the model's own attention "
              "(full for every row but the hybrid, whose sparse layers keep sinks + window).")  # fmt: skip
    lines = ["# Ablation (CPU)", "", *(smoke if results.get("smoke") else []),
             "Produced by `make ablation` (finetune/ablation.py) from its runs; nothing here is typed by hand.",
             "", header, "", legend, "", tbl, "", "![ablation](ablation/ablation.png)", "",
             "## The papers' orderings against ours", ""]  # fmt: skip
    lines += verdicts(rows)
    lines += ["", "## Runs", "",
              ("s/step compares runs made under the same load only: the seed-0 SF-Attn and hybrid rows reuse "
               "`make demo`'s runs, which may have been trained at another time (and load) than the rest."), "",
              "| row | seed | run | trained | s/step |", "| --- | ---: | --- | --- | ---: |"]
    lines += [f"| {r['row']} | {r['seed']} | `{r['run_dir']}` | {r.get('trained', 'n/a')} | "
              + ("n/a" if r.get("seconds_per_step") is None else f"{r['seconds_per_step']:.2f}") + " |"
              for r in results["runs"]]
    if results.get("times"):
        lines += ["", "## Wall time", "", "| step | seconds |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.0f} |" for k, v in results["times"].items()]
    doc = "\n".join(lines) + "\n"
    out = smoke_dir or repo / "docs"
    atomic_write_text(out / "ablation.md", doc)
    plot(rows, out / "ablation" / "ablation.png")
    readme = repo / "README.md"
    if readme.is_file() and smoke_dir is None:
        block = (f"{README_START}\nMeasured by `make ablation` on {results['created']} "
                 f"([docs/ablation.md](docs/ablation.md) has the plot and the papers' orderings):\n\n{tbl}\n{README_END}")  # fmt: skip
        new = replace_marked(readme.read_text(), README_START, README_END, block)
        if new is not None:
            atomic_write_text(readme, new)
    return doc


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows",
        default=",".join(ROW_NAMES),
        help=f"comma-separated rows (default all: {', '.join(ROW_NAMES)})",
    )
    ap.add_argument("--seeds", default="auto",
                    help="auto (seed 0 for every row, seed 1 for rows close to another), or a list such as 0,1")  # fmt: skip
    ap.add_argument(
        "--write-only", action="store_true", help="only rewrite docs and README from finished runs"
    )
    ap.add_argument("--smoke", metavar="BASE", help="smoke test from the model folder BASE: 2 steps at 256 tokens per "
                    "row, tiny eval, results in runs/ablation-smoke (docs and README untouched)")  # fmt: skip
    a = ap.parse_args(argv)
    if a.smoke:
        if not Path(a.smoke).is_dir():
            print(f"--smoke: {a.smoke}: no such model folder", file=sys.stderr)
            return 2
        _smoke.update(on=True, base=str(Path(a.smoke).resolve()))
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        print(f"--rows: unknown row {unknown[0]!r} (rows: {', '.join(ROW_NAMES)})", file=sys.stderr)
        return 2
    if a.seeds != "auto" and not re.fullmatch(r"\d+(,\d+)*", a.seeds):
        print(f"--seeds: expected auto or numbers such as 0,1 (got {a.seeds!r})", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if r.name in names]
    times: dict[str, float] = {}
    t0 = time.time()
    seeds = [0] if a.seeds == "auto" else [int(s) for s in a.seeds.split(",")]
    if not a.write_only and not _smoke["on"]:
        ensure_base(times)
    for seed in seeds:
        for row in rows:
            if not a.write_only:
                run_row(row, seed, times)
    if a.seeds == "auto":
        # close rows among every finished seed-0 row (rows of earlier calls too) get seed 1
        seed0 = [row_result(r, 0, run_dir(r, 0)) for r in ROWS if _finished(r, 0)]
        L = max((L for r in seed0 for L in r["ppl"]), key=int, default=None)
        close = close_rows(seed0, L) if L else set()
        for row in rows:
            if row.name in close and not a.write_only:
                run_row(row, 1, times)
    # every finished run of every row is in the table
    runs = [row_result(r, s, run_dir(r, s)) for r in ROWS for s in (0, 1, 2, 3) if _finished(r, s)]
    if not runs:
        print("no finished ablation runs to summarise (run `make ablation`)", file=sys.stderr)
        return 2
    import platform

    from finetune.rundir import atomic_write_text

    res_path = REPO / root() / "results.json"
    old = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": f"CPU ({platform.machine()})",
        "steps": ", ".join(str(x) for x in sorted({r["steps"] for r in runs if r.get("steps")})) or "?",
        "smoke": _smoke["on"],
        "runs": runs,
        "times": {**old.get("times", {}), **times},
        "seconds": time.time() - t0,
    }
    res_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(res_path, json.dumps(results, indent=1))
    print(write_outputs(results, smoke_dir=REPO / root() if _smoke["on"] else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

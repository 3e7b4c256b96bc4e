"""`make demo`: the whole pipeline on CPU, offline, with a real context-extension effect.

1. pretrain a small Llama on Shakespeare at 256 tokens (recipes/demo/pretrain.yaml);
2. make an interpolation-only model (the base with RoPE linear x8, no training);
3. extend it to 2048 tokens with SF-Attn + LoRA+ (recipes/demo/extend-sfattn.yaml), and as a
   LongGen hybrid (recipes/demo/extend-hybrid.yaml);
4. export both (merged safetensors + KV-cache config + model card);
5. evaluate: perplexity vs length for base / interpolation-only / tuned, passkey, needle,
   attention sinks, KV-cache memory; write docs/demo.md with the table and the plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from finetune.recipe import RECIPES_DIR, load_recipe
from finetune.rundir import final_dir

REPO = RECIPES_DIR.parent
DEMO = RECIPES_DIR / "demo"


def _run(step: str, cmd: list[str]) -> float:
    print(f"\n=== {step}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        raise SystemExit(f"demo step '{step}' failed with exit code {rc}")
    return time.time() - t0


def _longtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", *args]


def interpolation_only(base_dir: Path, out: Path, target: int) -> Path:
    """The base with RoPE linear interpolation to `target` and no training: the usual baseline."""
    from transformers import AutoConfig

    from finetune.model import apply_rope
    from finetune.recipe import RopeSection
    from finetune.rundir import MODEL_META, atomic_dir

    with atomic_dir(out) as tmp:
        shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns("base", MODEL_META), dirs_exist_ok=True)
        cfg = AutoConfig.from_pretrained(tmp)
        apply_rope(cfg, RopeSection(type="linear", target_length=target))
        cfg.save_pretrained(tmp)
    return out


def _trainer_seconds(run_dir: Path) -> float:
    """`train_runtime` of a finished run (run.json), 0 when unknown."""
    try:
        hist = json.loads((run_dir / "run.json").read_text()).get("log_history", [])
    except (OSError, ValueError):
        return 0.0
    return float(next((h["train_runtime"] for h in reversed(hist) if "train_runtime" in h), 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.demo")
    ap.add_argument("--skip-hybrid", action="store_true", help="only the SF-Attn extension")
    ap.add_argument("--fresh", action="store_true", help="delete runs/demo first")
    a = ap.parse_args(argv)
    pre = load_recipe(DEMO / "pretrain.yaml")
    ext = load_recipe(DEMO / "extend-sfattn.yaml")
    hyb = load_recipe(DEMO / "extend-hybrid.yaml")
    root = Path(pre.run_dir).parent
    if a.fresh:
        shutil.rmtree(REPO / root, ignore_errors=True)
    times: dict[str, float] = {}
    t_all = time.time()
    reused = 0.0
    if not final_dir(REPO / pre.run_dir).is_dir():
        times["pretrain (256 tokens)"] = _run("pretrain", _longtune("train", str(DEMO / "pretrain.yaml")))
    else:  # a finished base is reused: its own training time still belongs to the demo's cost
        reused = _trainer_seconds(REPO / pre.run_dir)
        if reused:
            times["pretrain (256 tokens): reused run, its trainer time"] = reused
    interpolation_only(final_dir(REPO / pre.run_dir), REPO / root / "interpolation-only", ext.rope.target_length)
    pi_dir = root / "interpolation-only"  # relative to the repo (the commands run there)
    runs = [(ext, DEMO / "extend-sfattn.yaml")]
    if not a.skip_hybrid:
        runs.append((hyb, DEMO / "extend-hybrid.yaml"))
    # A pretrain that ran now is a new base: runs extended from an older one are redone, never
    # reused (their numbers would mix two bases). Finished runs are otherwise a no-op.
    fresh_base = ["overwrite=true"] if "pretrain (256 tokens)" in times else []
    for r, path in runs:
        name = r.name
        if fresh_base or not final_dir(REPO / r.run_dir).is_dir():
            times[f"train {name}"] = _run(f"train {name}", _longtune("train", str(path), *fresh_base))
        times[f"export {name}"] = _run(f"export {name}", _longtune("export", r.run_dir, "--force"))
    # One comparison table: the SF-Attn run against base, interpolation-only and the hybrid;
    # the hybrid run's own eval (for its model card) measures only itself.
    compare = [f"eval.compare.interpolation-only={pi_dir}"]
    if not a.skip_hybrid:
        compare.append(f"eval.compare.longgen-hybrid={Path(hyb.run_dir) / 'export'}")
    times[f"eval {ext.name}"] = _run(f"eval {ext.name}", _longtune("eval", ext.run_dir, *compare))
    if not a.skip_hybrid:
        times[f"eval {hyb.name}"] = _run(f"eval {hyb.name}", _longtune("eval", hyb.run_dir, "--no-base"))
    total = time.time() - t_all + reused
    summary = write_summary(runs, times, total)
    write_readme_table(REPO / ext.run_dir / "eval" / "results.json", total,
                       note="; the pretraining timed in its own earlier run" if reused else "")  # fmt: skip
    print("\n" + summary)
    print(f"\nresults: {', '.join(str(Path(r.run_dir) / 'eval') for r, _ in runs)}; summary: docs/demo.md")
    return 0


#: README.md's demo table sits between these markers; `make demo` rewrites it from the run.
README_START, README_END = "<!-- demo:table -->", "<!-- /demo:table -->"
#: Columns of the README table: (results model name, header).
README_MODELS = (("base", "base (trained at 256)"), ("interpolation-only", "interpolation only (x8)"),
                 ("tuned", "SF-Attn + LoRA+"), ("longgen-hybrid", "LongGen hybrid"))  # fmt: skip


def readme_table(results: dict, total: float, note: str = "") -> str:
    """The README's perplexity table (LongLoRA protocol) from the SF-Attn run's eval/results.json."""
    ppl = results["suites"]["perplexity"]["results"]
    models = [(m, h) for m, h in README_MODELS if m in ppl]
    lengths = sorted({int(L) for m, _ in models for L in ppl[m].get("longlora", {})})
    lines = [(f"Measured by `make demo` on {results['created']} ({results['environment']['device']}; "
              f"{total / 60:.1f} min for the demo itself{note}):"), "",
             "| context length | " + " | ".join(h for _, h in models) + " |",
             "| ---: |" + " ---: |" * len(models)]  # fmt: skip
    for L in lengths:
        cells = [ppl[m]["longlora"].get(str(L), {}).get("ppl") for m, _ in models]
        lines.append(f"| {L} | " + " | ".join("n/a" if c is None else f"{c:.2f}" for c in cells) + " |")
    retrieval = retrieval_rows(results, [m for m, _ in models])
    if retrieval:
        lines += ["", "Retrieval (held-out keys; passkey: exact 5-digit key, needle: 7-digit number, mean over depths):",
                  "", "| task, context length | " + " | ".join(h for _, h in models) + " |",
                  "| --- |" + " ---: |" * len(models), *retrieval]  # fmt: skip
    return "\n".join(lines)


def retrieval_rows(results: dict, models: list[str]) -> list[str]:
    """Table rows `| passkey 2048 | 90% | ... |` from the passkey and needle suites (n/a where
    a length cannot hold the prompt or the suite did not run)."""
    suites = results["suites"]
    out = []
    for suite in ("passkey", "needle"):
        res = (suites.get(suite) or {}).get("results") or {}
        if not res:
            continue
        acc: dict[str, dict[str, float | None]] = {}
        for m in models:
            r = res.get(m)
            if r is None:
                continue
            if suite == "passkey":
                acc[m] = {L: v.get("accuracy") for L, v in r.items()}
            else:
                acc[m] = {str(L): (None if any(a is None for a in row) else sum(row) / len(row))
                          for L, row in zip(r["lengths"], r["accuracy"])}  # fmt: skip
        lengths = sorted({L for a in acc.values() for L in a}, key=int)
        for L in lengths:
            cells = [acc.get(m, {}).get(L) for m in models]
            out.append(f"| {suite} {L} | " + " | ".join("n/a" if c is None else f"{c:.0%}" for c in cells) + " |")
    return out


def write_readme_table(results_json: Path, total: float, readme: Path = REPO / "README.md", note: str = "") -> None:
    """Rewrite the README's demo table from the run, so its numbers are never typed by hand."""
    if not results_json.is_file() or not readme.is_file():
        return
    from finetune.rundir import atomic_write_text
    from kernels.benchdoc import replace_marked

    block = f"{README_START}\n{readme_table(json.loads(results_json.read_text()), total, note)}\n{README_END}"
    new = replace_marked(readme.read_text(), README_START, README_END, block)
    if new is not None:
        atomic_write_text(readme, new)


def write_summary(runs, times: dict[str, float], total: float) -> str:
    lines = ["# Demo results (CPU)", "",
             "Produced by `make demo` (finetune/demo.py); numbers are from the last run on this machine.", ""]
    for r, _ in runs:
        res_path = REPO / r.run_dir / "eval" / "results.json"
        summ = REPO / r.run_dir / "eval" / "summary.md"
        lines.append(f"## {r.name}")
        lines.append("")
        if summ.is_file():
            lines.append(summ.read_text().strip())
        elif res_path.is_file():
            lines.append("```json\n" + json.dumps(json.loads(res_path.read_text()), indent=1)[:4000] + "\n```")
        for png in sorted((REPO / r.run_dir / "eval").glob("*.png")):
            dest = REPO / "docs" / "demo" / f"{r.name}-{png.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, dest)
            lines.append(f"\n![{png.stem}](demo/{dest.name})")
        lines.append("")
    lines += ["## Wall time", "", "| step | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += [f"| **total** | **{total:.0f}** |", ""]
    text = "\n".join(lines)
    from finetune.rundir import atomic_write_text

    atomic_write_text(REPO / "docs" / "demo.md", text)
    return text


if __name__ == "__main__":
    sys.exit(main())

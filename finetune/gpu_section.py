"""The GPU section of docs/benchmarks.md, written from what scripts/gpu_check.sh left in its folder.

    python -m finetune.gpu_section DIR [DIR2 ...] [--output docs/benchmarks.md]

DIR holds env.txt, status.txt, gpu_tests.txt, attention.json, train_step.json and kv.json (any may
be missing: a part that did not run is reported as not measured). With several folders (a first
run, then a rerun of some of its parts with PARTS=...) each file is read from the last folder
that has it, and status lines part by part. The section (`bench:gpu`)
states the machine and date, the `pytest -m gpu` result, each measured ratio next to its target
(met or missed, nothing rounded up), then the three tables. It is written with the shared section
writer (kernels/benchdoc.py): the other sections of the file stay as they are.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from kernels import benchdoc

NAME = "gpu"
#: (what, threshold): SF-Attn fwd+bwd vs full causal at 32k; LongGen's hybrid at 32k+ (its
#: figures are at 128K); the SF-Attn training step vs full attention at 16k+.
ATTENTION_TARGET = (32768, 3.5)
PREFILL_TARGET = (32768, 1.67)
DECODE_TARGET = (32768, 1.41)
TRAIN_TARGET = (16384, 1.5)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _env(path: Path) -> dict[str, str]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def _status(path: Path) -> dict[str, str]:
    """part -> 'exit 0, 41 s' / 'timed out after 150 s' / 'skipped (deadline)'."""
    out = {}
    try:
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) == 3:
                name, rc, secs = words
                out[name] = ("skipped (deadline)" if rc == "skipped" else
                             f"timed out after {secs} s" if rc in ("124", "137") else f"exit {rc}, {secs} s")
    except OSError:
        pass
    return out


def _verdict(x: float, target: float) -> str:
    return "met" if x >= target else "**missed**"


def attention_targets(att: dict | None) -> list[str]:
    n, target = ATTENTION_TARGET
    what = f"SF-Attn fwd+bwd vs full causal SDPA at {n // 1024}k"
    rows = [r for r in (att or {}).get("rows", []) if r.get("pattern") == "sf_attn" and r.get("n") == n]
    got = [r for r in rows if r.get("speedup")]
    if not got:
        why = "; ".join(f"{r['backend']}: {r['error']}" for r in rows if "error" in r) or "no row"
        return [f"| {what} | >= {target}x | not measured ({why}) | **not measured** |"]
    best = max(got, key=lambda r: r["speedup"])
    others = ", ".join(f"{r['backend']} {r['speedup']:.2f}x" for r in got if r is not best)
    measured = f"{best['speedup']:.2f}x ({best['backend']}{'; ' + others if others else ''})"
    return [f"| {what} | >= {target}x | {measured} | {_verdict(best['speedup'], target)} |"]


def kv_targets(kv: dict | None) -> list[str]:
    lines = []
    rows = [r for r in (kv or {}).get("rows", []) if r.get("method") == "hybrid"]
    for key, (n0, target), label in (("prefill_x", PREFILL_TARGET, "prefill"),
                                     ("decode_x", DECODE_TARGET, "decode")):
        what = f"hybrid {label} tokens/s vs full, {n0 // 1024}k+"
        got = [r for r in rows if r["T"] >= n0 and r.get(key)]
        if not got:
            lines.append(f"| {what} | >= {target}x | not measured | **not measured** |")
            continue
        measured = ", ".join(f"{r[key]:.2f}x at {r['T']} (batch {r['batch']})" for r in got)
        worst = min(r[key] for r in got)
        lines.append(f"| {what} | >= {target}x | {measured} | {_verdict(worst, target)}"
                     f"{'' if worst >= target or max(r[key] for r in got) < target else ' (some met)'} |")
    return lines


def train_targets(ts: dict | None) -> list[str]:
    n0, target = TRAIN_TARGET
    what = f"training step, SF-Attn vs full attention, {n0 // 1024}k+"
    rows = [r for r in (ts or {}).get("rows", []) if "error" not in r]
    full = {r["length"]: r["seconds"] for r in rows if r["variant"] == "causal"}
    got = [(r, full[r["length"]] / r["seconds"]) for r in rows
           if r["variant"].startswith("sf_attn") and r["length"] >= n0 and r["length"] in full]
    if not got:
        return [f"| {what} | >= {target}x | not measured | **not measured** |"]
    lines = []
    for variant in dict.fromkeys(r["variant"] for r, _ in got):
        mine = [(r, x) for r, x in got if r["variant"] == variant]
        measured = ", ".join(f"{x:.2f}x at {r['length']}" for r, x in mine)
        worst = min(x for _, x in mine)
        lines.append(f"| {what} (`{variant}`) | >= {target}x | {measured} | {_verdict(worst, target)} |")
    return lines


def tests_line(path: Path) -> tuple[str, list[str]]:
    """(pytest's summary, the names of failed/errored tests)."""
    try:
        text = path.read_text()
    except OSError:
        return "not run", []
    summary = ""
    for line in text.splitlines():
        if re.search(r"\d+ (passed|failed|skipped|error)", line) and " in " in line:
            summary = line.strip(" =")
    failed = sorted({m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)}
                    | {m.group(1) for m in re.finditer(r"^(\S+::\S+) (?:FAILED|ERROR)", text, re.MULTILINE)})
    return summary or "no summary (cut short?)", failed


def attention_table(att: dict | None) -> list[str]:
    if not att:
        return ["Not measured (no attention.json)."]
    lines = [(f"Forward + backward of one attention call, batch 1, {att['heads']} heads x {att['head_dim']}, "
              f"{att['dtype']}; best of the timed rounds after a warm-up (which compiles FlexAttention). "
              "`x full`: full causal SDPA time / this time. Peak: CUDA allocator peak over what was allocated "
              "before the step."), "",
             "| N | pattern | backend | attended | fwd+bwd ms | x full | peak MiB |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in sorted(att["rows"], key=lambda r: r["n"]):  # measured 32k first (scripts/gpu_check.sh)
        if "error" in r:
            lines.append(f"| {r['n']} | {r['label']} | {r['backend']} | | failed: {r['error']} | | |")
        else:
            x = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
            lines.append(f"| {r['n']} | {r['label']} | {r['backend']} | {r['fraction']:.3f} | {r['ms']:.1f} | {x} "
                         f"| {r['mib']:.0f} |")
    return lines


def kv_table(kv: dict | None) -> list[str]:
    if not kv:
        return ["Not measured (no kv.json)."]
    lines = [(f"{kv['model']}. Prefill of T random tokens, then {kv['decode']} greedy decode steps timed one by "
              "one (wall clock). `x full`: this method's tokens/s over the full cache's at the same T and batch "
              "(memory: peak prefill bytes, < 1 is smaller)."), "",
             ("| method | T | batch | KV MiB | of full | prefill tok/s | x full | peak prefill MiB | x full "
              "| decode tok/s | x full |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def fx(v):
        return "n/a" if v is None else f"{v:.2f}"

    for r in kv["rows"]:
        peak = "n/a" if r.get("peak_prefill_bytes") is None else f"{r['peak_prefill_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['method']} | {r['T']} | {r['batch']} | {r['nbytes'] / 2**20:.1f} | {r['fraction']:.3f} "
                     f"| {r['prefill_tokens_per_s']:.0f} | {fx(r.get('prefill_x'))} | {peak} "
                     f"| {fx(r.get('memory_x'))} | {r['decode_tokens_per_s']:.1f} | {fx(r.get('decode_x'))} |")
    kernels = {}
    for r in kv["rows"]:
        kernels.setdefault(r["method"], r.get("prefill_kernels"))
    if any(kernels.values()):
        lines += ["", "Prefill attention calls (pattern/backend): " + "; ".join(
            f"{m}: {', '.join(f'{k} {n}' for k, n in ks.items())}" for m, ks in kernels.items() if ks) + "."]
    return lines


def train_table(ts: dict | None) -> list[str]:
    if not ts:
        return ["Not measured (no train_step.json)."]
    from finetune.train_step_bench import table_rows

    c = ts["config"]
    return [(f"{ts['model']} from a LlamaConfig ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, vocabulary "
            f"{c['vocab_size']}), random weights, LoRA r 8 on q/k/v/o with embeddings and norms trained, gradient "
            "checkpointing, batch 1; one forward + backward + AdamW step after a warm-up step. Peak: CUDA "
            "allocator peak during the step (model and optimizer state included). `kernels`: the attention "
            "calls that ran (pattern/backend count)."), "",
            "| tokens | variant | step s | x full | peak GiB | kernels |", "| ---: | --- | ---: | ---: | ---: | --- |",
            *table_rows(ts["rows"])]


def section(folders: Path | list[Path]) -> str:
    folders = [folders] if isinstance(folders, Path) else list(folders)

    def at(name: str) -> Path:
        """The file from the last folder that has it (a rerun's parts replace the first run's)."""
        return next((f / name for f in reversed(folders) if (f / name).exists()), folders[-1] / name)

    env = _env(at("env.txt"))
    status = {}
    for f in folders:  # a rerun's status lines replace the first run's, part by part
        status.update(_status(f / "status.txt"))
    att, kv, ts = (_load(at(f)) for f in ("attention.json", "kv.json", "train_step.json"))
    summary, failed = tests_line(at("gpu_tests.txt"))
    machine = env.get("gpu") or (att or ts or kv or {}).get("machine", "unknown")
    smoke = env.get("mode") == "smoke" or not env.get("cuda", "").startswith("True")
    start, end = benchdoc.markers(NAME)
    flash_note = (" (no wheel exists for this torch and none could travel; its backend and tests were skipped)"
                  if env.get("flash_attn", "absent").startswith("absent") else "")
    lines = [start, "## GPU check (`make gpu-check`: scripts/gpu_check.sh)", ""]
    if smoke:
        lines += ["**Smoke run (no CUDA device): tiny sizes on the CPU; these are not GPU figures.**", ""]
    lines += [
        (f"Machine: {machine}; {env.get('cpus', '?')} CPUs; python {env.get('python', '?')}, torch "
         f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')}, "
         f"peft {env.get('peft', '?')}. Date: {env.get('date', '?')}."),
        f"flash-attn: {env.get('flash_attn', '?')}{flash_note}.",
        ("Parts: " + ", ".join(f"{k} {v}" for k, v in status.items()) + ".") if status else "Parts: no status.",
        "",
        (f"`pytest -m gpu` (tests/test_gpu.py, test_backends.py, test_memory.py): {summary}."
         + (f" Failed: {', '.join(failed)}." if failed else "")),
        "",
        "| target | wanted | measured | verdict |",
        "| --- | ---: | --- | --- |",
        *attention_targets(att),
        *kv_targets(kv),
        *train_targets(ts),
        "",
        "### Attention kernels on the GPU", "", *attention_table(att), "",
        "### One LoRA+ training step, SF-Attn vs full attention", "", *train_table(ts), "",
        "### KV caches on the GPU: LongGen hybrid vs full", "", *kv_table(kv), "",
        end,
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.gpu_section", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+",
                    help="the folder scripts/gpu_check.sh wrote ($OUT); a rerun's folder after it")
    ap.add_argument("--output", type=Path, default=benchdoc.DOC, help="markdown file whose bench:gpu section is rewritten")
    args = ap.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            print(f"error: {folder}: not a folder (the $OUT of scripts/gpu_check.sh)", file=sys.stderr)
            return 2
    text = section(args.folders)
    benchdoc.write_section(text, NAME, args.output)
    print(text)
    print(f"wrote the bench:{NAME} section of {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

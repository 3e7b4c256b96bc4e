"""summary.md (markdown tables) and the console headline, both from the results dict: one
`*_md` (section) and one `*_headline` (columns) function per suite, named in the suite table
(`finetune.eval.suites.SUITES`)."""

from __future__ import annotations

import math


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _lengths(per_model: dict) -> list[str]:
    return sorted({L for rows in per_model.values() for L in rows}, key=int)


def perplexity_md(res: dict) -> str:
    parts = []
    src = res.get("source", {})
    toks = src.get("tokens") or {}
    toks = ", ".join(f"{m}: {n}" for m, n in toks.items()) if isinstance(toks, dict) else toks
    parts.append(
        f"Text: {src.get('description', '?')}; tokens per model's tokenizer (capped to what the "
        f"windows can use): {toks or '?'}."
    )
    if src.get("note"):
        parts.append(f"**Note:** {src['note']}")
    data = res["results"]
    for proto in res.get("protocols", []):
        per = {m: d.get(proto, {}) for m, d in data.items()}
        lengths = _lengths(per)
        rows = []
        for L in lengths:
            row = [L]
            for rows_m in per.values():
                r = rows_m.get(L)
                row.append(f"{r['ppl']:.3f} ({r['windows']}w)" if r else "— (text too short)")
            rows.append(row)
        desc = {
            "longlora": f"LongLoRA protocol: windows every {res.get('stride')} tokens, all tokens scored, "
            "mean of window losses",
            "sliding": f"sliding window: stride {res.get('sliding_stride') or 'length/2'}, new tokens scored",
        }[proto]
        parts.append(f"**{proto}** — {desc}; max windows {res.get('max_windows') or 'all'}.\n")
        parts.append(table(["length"] + list(per), rows))
    return "\n\n".join(parts)


def passkey_md(res: dict) -> str:
    data = res["results"]
    lengths = _lengths(data)
    rows = []
    for L in lengths:
        row = [L]
        for m in data:
            r = data[m].get(L)
            if not r:
                row.append("—")
            elif r.get("error"):
                row.append("not run: " + r["error"])
            else:
                row.append(
                    f"{r['accuracy']:.2f} ({sum(t['correct'] for t in r['trials'])}/{len(r['trials'])})"
                )
        rows.append(row)
    return "Exact match of the 5-digit key, greedy decoding.\n\n" + table(["length"] + list(data), rows)


def needle_md(res: dict) -> str:
    parts = [
        (
            f"Haystack: {res.get('haystack', '?')}. Accuracy per depth (rows) and length (columns); "
            "— = the length cannot hold the prompt."
        )
    ]
    for m, g in res["results"].items():
        rows = [
            [f"{d:.0%}"] + [g["accuracy"][i][j] for i in range(len(g["lengths"]))]
            for j, d in enumerate(g["depths"])
        ]
        parts.append(f"**{m}**\n\n" + table(["depth"] + [str(L) for L in g["lengths"]], rows))
    return "\n\n".join(parts)


def sinks_md(res: dict) -> str:
    data = res["results"]
    if not data:
        return ""
    any_st = next(iter(data.values()))
    q = "queries 1..Q-1" if any_st["exclude_first_query"] else "all queries (incl. query 0)"
    rows = []
    for m, st in data.items():
        layers = ", ".join(f"{v:.2f}" for v in st["per_layer_share_above"])
        rows.append([m, st["mean"], f"{st['share_above']:.1%} ({st['sink_heads']}/{st['heads']})", layers])
    return (
        f"Mean attention on the first token over {q}, {any_st['sequences']} sequence(s) of {any_st['length']} "
        f"tokens; threshold {any_st['threshold']}.\n\n"
        + table(["model", "mean first-token attention", "heads above threshold", "share per layer"], rows)
    )


def _budget(kv: dict) -> str:
    m = kv.get("method")
    if m == "h2o":
        heavy = kv.get("heavy") if kv.get("heavy") is not None else f"{kv.get('heavy_ratio')}×prompt"
        recent = kv.get("recent") if kv.get("recent") is not None else f"{kv.get('recent_ratio')}×prompt"
        return f"heavy {heavy}, recent {recent}"
    if m == "sink":
        return f"{kv.get('num_sink_tokens')} sinks + window {kv.get('window')}"
    if m == "hybrid":
        return "model layout"
    return "all tokens" if m == "full" else "?"


def kv_md(res: dict) -> str:
    rows = []
    for method, per in res["methods"].items():
        for L, r in sorted(per.items(), key=lambda kv: int(kv[0])):
            if "error" in r:
                rows.append(
                    [method, L, _budget(r.get("kv_config") or {}), "error: " + r["error"][:160], "", "", "", "", "", "", ""]
                )
            else:
                peak = r.get("peak_prefill_bytes")
                rows.append(
                    [
                        method,
                        L,
                        _budget(r.get("kv_config") or {}),
                        f"{r['nbytes'] / 2**20:.3f}",
                        r.get("fraction_of_full"),
                        "" if peak is None else f"{peak / 2**20:.1f}",
                        r.get("memory_x"),
                        r["prefill_tokens_per_s"],
                        r.get("prefill_x"),
                        r["decode_tokens_per_s"],
                        r.get("decode_x"),
                    ]
                )
    out = (
        f"Model: {res.get('model')}; {res['decode_tokens']} decode tokens after the prefill; wall clock. "
        "x full: over the full cache at the same length (memory: < 1 is smaller; tok/s: > 1 is faster).\n\n"
        + table(
            [
                "method",
                "length",
                "budget",
                "KV held (MiB)",
                "KV x full",
                "peak prefill (MiB)",
                "peak x full",
                "prefill tok/s",
                "prefill x full",
                "decode tok/s",
                "decode x full",
            ],
            rows,
        )
    )
    if res.get("skipped"):
        out += "\n\n" + "\n".join(f"- `{m}` not measured: {why}" for m, why in res["skipped"].items())
    return out


def ruler_md(res: dict) -> str:
    """Per model: score per task (rows) and length (columns), the RULER average, the speed."""
    parts = [
        (f"Haystack: {res.get('haystack', '?')}. {res.get('samples', '?')} sample(s) per task, length and depth "
        f"(depths {res.get('depths', '?')} for niah_* and vt; seed {res.get('seed', '?')}). "
        "Recall of the expected strings (RULER string_match_all), "
        "mean over samples and depths; — = the length cannot hold the task. Average: mean of the "
        "task scores at that length (RULER calls a length effective at >= 0.856, Llama-2-7B at 4K).")
    ]
    for m, g in res["results"].items():
        lengths = sorted({L for per in g["tasks"].values() for L in per}, key=int)
        rows = [[t] + [g["tasks"][t].get(L, {}).get("score") for L in lengths] for t in g["tasks"]]
        rows.append(["**average**"] + [(g["average"].get(L) or {}).get("score") for L in lengths])
        sp = g.get("speed", {})
        parts.append(
            f"**{m}** — {sp.get('tokens_processed')} tokens processed in {sp.get('model_seconds')} s "
            f"(**{sp.get('tokens_per_s')} tokens/s**; {sp.get('prompt_tokens_per_s')} prompt tokens/s counting "
            f"each question's shared context; prompts built in {sp.get('build_seconds')} s)\n\n"
            + table(["task"] + lengths, rows)
        )
        errs = sorted({f"{t} @ {L}: {r['error']}" for t, per in g["tasks"].items() for L, r in per.items() if r.get("error")})
        if errs:
            parts.append("\n".join(f"- not run: {e}" for e in errs))
    return "\n\n".join(parts)


def lm_eval_md(res: dict) -> str:
    first = next(iter(res["results"].values()), {})
    used = ", ".join(f"{m}: {(r.get('kv_cache') or {}).get('method')}" for m, r in res["results"].items())
    parts = [
        (f"lm-evaluation-harness {first.get('version', '?')}; KV cache setting `{res.get('kv_cache_setting')}` "
        f"({used}); limit {res.get('limit') or 'none'} documents per task.")
    ]
    rows = []
    for m, per in res["results"].items():
        for task, metrics in per.get("tasks", {}).items():
            for k, v in metrics.items():
                rows.append([m, task, k, v])
    parts.append(table(["model", "task", "metric", "value"], rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- headline columns
def perplexity_headline(entry: dict):
    proto = entry["protocols"][0]
    res = entry["results"]
    return [
        (f"ppl {proto} {L}", lambda m, L=L: ((res.get(m, {}).get(proto, {}).get(L)) or {}).get("ppl"))
        for L in _lengths({m: d.get(proto, {}) for m, d in res.items()})
    ]


def passkey_headline(entry: dict):
    res = entry["results"]
    return [(f"passkey {L}", lambda m, L=L: (res.get(m, {}).get(L) or {}).get("accuracy")) for L in _lengths(res)]


def needle_headline(entry: dict):
    def mean(m):
        g = entry["results"].get(m)
        flat = [v for row in (g or {}).get("accuracy", []) for v in row if v is not None]
        return sum(flat) / len(flat) if flat else None

    return [("needle mean", mean)]


def ruler_headline(entry: dict):
    res = entry["results"]
    lengths = sorted({L for g in res.values() for L in g["average"]}, key=int)
    return [(f"ruler {L}", lambda m, L=L: ((res.get(m) or {}).get("average", {}).get(L) or {}).get("score"))
            for L in lengths]  # fmt: skip


def sinks_headline(entry: dict):
    return [("sink heads", lambda m: (entry["results"].get(m) or {}).get("share_above"))]


def lm_eval_headline(entry: dict):
    cols = []
    res = entry["results"]
    names = sorted({(t, k) for per in res.values() for t, ms in per.get("tasks", {}).items() for k in ms})
    for t, k in names[:6]:
        cols.append((f"{t} {k}", lambda m, t=t, k=k: (res.get(m, {}).get("tasks", {}).get(t) or {}).get(k)))
    return cols


def summary_md(results: dict, suites: dict) -> str:
    """``suites``: the suite table (name -> row with ``title`` and ``report``), in report order."""
    lines = [f"# Evaluation of `{results['run_dir']}`", ""]
    lines.append(
        f"{results['created']} · {results['environment']['device']} · torch {results['environment']['torch']}"
        f" · transformers {results['environment']['transformers']}"
    )
    lines.append("")
    lines.append("## Models\n")
    rows = [
        [
            n,
            i.get("source"),
            i.get("loader"),
            i.get("max_position_embeddings"),
            i.get("rope"),
            i.get("attn_implementation"),
            i.get("kv_cache"),
        ]
        for n, i in results["models"].items()
    ]
    lines.append(
        table(["name", "source", "loaded by", "max positions", "rope", "attention", "KV cache"], rows)
    )
    for reason in results.get("model_notes", []):
        lines.append(f"\n- {reason}")
    for name, suite in suites.items():
        res = results["suites"].get(name)
        if res is None:
            continue
        lines.append(f"\n## {suite.title}\n")
        lines.append(suite.report(res))
        for fig in res.get("figures", []):
            lines.append(f"\n![{name}]({fig})")
    if results.get("skipped"):
        lines.append("\n## Skipped\n")
        lines += [f"- **{s}**: {why}" for s, why in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def headline(results: dict, suites: dict) -> str:
    """One row per model: the key number of each suite at each length (printed at the end)."""
    header, cols = ["model"], []
    for name, suite in suites.items():
        entry = results["suites"].get(name)
        if entry is None or suite.headline is None:
            continue
        for h, fn in suite.headline(entry):
            header.append(h)
            cols.append(fn)
    rows = [[m] + [c(m) for c in cols] for m in results["models"]]
    return table(header, rows)

"""PNG figures drawn from the results dict (the same numbers as results.json).

Every function takes the suite's results and an output path, writes one PNG and returns the
path, or None when there is nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker


def _length_axis(ax, lengths) -> None:
    """log2 x axis labelled with the lengths themselves."""
    lengths = sorted(set(lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _grid(ax, grid: list[list[float]], xticks, yticks, xlabel: str, title: str):
    """A 0..1 heatmap with each cell's value written in it (NaN: "n/a"); returns the image."""
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(xticks)), xticks)
    ax.set_yticks(range(len(yticks)), yticks)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    return im


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perplexity(results: dict, path: Path) -> Path | None:
    """``{model: {protocol: {length: {"ppl"}|None}}}`` -> ppl vs length, one panel per protocol."""
    protocols = sorted({p for per in results.values() for p in per})
    if not protocols:
        return None
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.5 * len(protocols), 4), squeeze=False)
    drawn = False
    for ax, proto in zip(axes[0], protocols):
        xs, ys = [], []
        for model, per in results.items():
            pts = sorted((int(L), r["ppl"]) for L, r in per.get(proto, {}).items() if r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
                xs += [p[0] for p in pts]
                ys += [p[1] for p in pts]
                drawn = True
        if xs:
            _length_axis(ax, xs)
            if min(ys) > 0 and max(ys) / min(ys) > 10:  # a collapsing model: log scale keeps both visible
                ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"perplexity ({proto})")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, path)


def passkey(results: dict, path: Path) -> Path | None:
    """``{model: {length: {"accuracy"}}}`` -> accuracy vs length."""
    if not results:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = []
    for model, per in results.items():
        pts = sorted((int(L), r["accuracy"]) for L, r in per.items() if r.get("accuracy") is not None)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        xs += [p[0] for p in pts]
    if xs:
        _length_axis(ax, xs)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("passkey retrieval")
    ax.grid(True, alpha=0.3)
    if not ax.get_legend_handles_labels()[0]:
        plt.close(fig)
        return None
    ax.legend()
    return _save(fig, path)


def needle(results: dict, path: Path) -> Path | None:
    """``{model: {"lengths", "depths", "accuracy"}}`` -> one depth x length heatmap per model."""
    if not results:
        return None
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.5 * len(results) + 1, 3.8), squeeze=False, layout="constrained"
    )
    im = None
    for ax, (model, grid) in zip(axes[0], results.items()):
        nan = float("nan")
        acc = [[nan if v is None else v for v in col] for col in zip(*grid["accuracy"])]  # rows: depth
        im = _grid(ax, acc, [str(L) for L in grid["lengths"]], [f"{d:.0%}" for d in grid["depths"]],
                   "context length", f"needle: {model}")
        ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sinks(results: dict, path: Path) -> Path | None:
    """``{model: sink_stats}`` -> layer x head heatmap of first-token attention per model."""
    if not results:
        return None
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.5 * len(results) + 1, 4), squeeze=False, layout="constrained"
    )
    im = None
    for ax, (model, st) in zip(axes[0], results.items()):
        im = ax.imshow(st["per_head"], vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        n_layers, n_heads = len(st["per_head"]), len(st["per_head"][0])
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
        ax.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{model}: {st['share_above']:.0%} heads > {st['threshold']}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="mean attention on first token")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def kv_cache(results: dict, path: Path) -> Path | None:
    """``{"methods": {method: {length: result}}}`` -> memory and decode speed per method."""
    methods = results.get("methods", {})
    rows = [(m, int(L), r) for m, per in methods.items() for L, r in per.items() if "nbytes" in r]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax in (a1, a2):
        _length_axis(ax, [L for _, L, _ in rows])
    for m in methods:
        pts = sorted((L, r) for mm, L, r in rows if mm == m)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        a1.plot(xs, [p[1]["nbytes"] / 2**20 for p in pts], marker="o", label=m)
        a2.plot(xs, [p[1]["decode_tokens_per_s"] or 0 for p in pts], marker="o", label=m)
    for ax, title, ylabel in ((a1, "KV cache held", "MiB"), (a2, "decode speed", "tokens/s")):
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save(fig, path)


def ruler(results: dict, path: Path) -> Path | None:
    """``{model: {"tasks": {task: {length: {"score"}}}, "average"}}`` -> one task x length
    heatmap per model, the RULER average as the last row."""
    if not results:
        return None
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.5 * len(results) + 1, 4.2), squeeze=False, layout="constrained"
    )
    im = None
    for ax, (model, g) in zip(axes[0], results.items()):
        lengths = sorted({L for per in g["tasks"].values() for L in per}, key=int)
        names = list(g["tasks"]) + ["average"]
        nan = float("nan")
        grid = [[nan if (g["tasks"][t].get(L) or {}).get("score") is None else g["tasks"][t][L]["score"]
                 for L in lengths] for t in g["tasks"]]  # fmt: skip
        grid.append([nan if (g["average"].get(L) or {}).get("score") is None else g["average"][L]["score"]
                     for L in lengths])  # fmt: skip
        im = _grid(ax, grid, lengths, names, "context length", f"RULER: {model}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="recall")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

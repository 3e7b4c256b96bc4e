"""Model card (`README.md`) of an export: Hub metadata + what a user needs to run the model.

Everything comes from the export directory itself (`config.json`, `kv_cache_config.json`,
`longtune_export.json`) plus, when present, the section `longtune eval` rendered from its
results next to them (`eval/card.md`, written by the eval suites' own section writers). The card is written where it is rendered: by
`longtune export` and again by `longtune push` (`refresh_card`), so a pushed card shows the
run's latest evaluation; `longtune eval` writes only under `eval/` and never touches the card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from finetune.rundir import EXPORT_INFO, atomic_write_text, default_export_dir
from kernels.patterns import TRAINING_ONLY

#: The model-card section `longtune eval` writes into eval/ beside results.json.
CARD_SECTION = "card.md"

INFO_FILE = EXPORT_INFO
PATTERN_NAMES = {
    "causal": "full causal attention",
    "sf_attn": "SF-Attn (SinkLoRA: shifted groups with segmentation/reassembly + sink tokens)",
    "s2_attn": "S²-Attn (LongLoRA shifted sparse attention)",
    "sink_window": "sink + sliding window (LongGen sparse layer)",
    "block_sparse": "block-sparse local + strided (LongGen sparse layer)",
}


def _looks_like_hub_id(ref: str | None) -> bool:
    if not ref or ref == "base" or os.path.exists(ref):
        return False
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/"))


def _runs(layers: list[dict]) -> list[tuple[int, int, dict]]:
    """Consecutive layers with identical settings -> (first, last, settings)."""
    out: list[tuple[int, int, dict]] = []
    for i, l in enumerate(layers):
        if out and out[-1][2] == l:
            out[-1] = (out[-1][0], i, l)
        else:
            out.append((i, i, l))
    return out


def _params(l: dict) -> str:
    p = {k: v for k, v in l.items() if k != "pattern"}
    return ", ".join(f"{k}={v}" for k, v in p.items()) if p else ""


def _layout_lines(layout: dict | None) -> list[str]:
    if not layout:
        return ["- all layers: full causal attention"]
    lines = []
    for a, b, l in _runs(layout["layers"]):
        where = f"layer {a}" if a == b else f"layers {a}-{b}"
        extra = _params(l)
        lines.append(f"- {where}: `{l['pattern']}`" + (f" ({extra})" if extra else ""))
    return lines


def _eval_section(eval_dir: Path | None) -> list[str]:
    """The card section `longtune eval` rendered next to its results (`eval/card.md`)."""
    if eval_dir is None or not (eval_dir / "results.json").is_file():
        return []
    section = eval_dir / CARD_SECTION
    if not section.is_file():  # an eval/ from before the section was written
        return ["## Evaluation", "", f"`{eval_dir}/results.json` has no `{CARD_SECTION}`: rerun `longtune eval`.", ""]
    return section.read_text(encoding="utf-8").rstrip("\n").splitlines() + [""]


def _kv_lines(kv: dict | None) -> list[str]:
    if not kv:
        return ["No `kv_cache_config.json`: generation keeps the full cache."]
    m = kv.get("method", "full")
    desc = {
        "full": "full KV cache (nothing evicted)",
        "h2o": "H2O heavy hitters + recent tokens",
        "sink": "StreamingLLM: sink tokens + recent window",
        "hybrid": "LongGen hybrid: full layers keep everything, sparse layers keep sinks + window",
    }[m]
    lines = [f"`kv_cache_config.json` (version {kv.get('version')}): **{m}**: {desc}.", ""]
    keys = {
        "full": ["full_layers", "attn_implementation"],
        "h2o": ["heavy", "recent", "heavy_ratio", "recent_ratio", "num_sink_tokens", "score_normalization",
                "gqa_reduction", "layers", "prefill_chunk", "attn_implementation"],
        "sink": ["window", "num_sink_tokens", "layers", "attn_implementation"],
        "hybrid": ["window", "num_sink_tokens", "layers", "full_layers", "attn_implementation"],
    }[m]  # fmt: skip
    keys = [k for k in keys if kv.get(k) is not None or k == "attn_implementation"]
    lines += ["| key | value |", "| --- | --- |"]
    lines += [f"| {k} | `{json.dumps(kv.get(k))}` |" for k in keys if k in kv]
    return lines


def render(export_dir: str | Path, eval_dir: str | Path | None = None) -> str:
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    info: dict[str, Any] = {}
    if (export_dir / INFO_FILE).is_file():
        info = json.loads((export_dir / INFO_FILE).read_text())
    kv = None
    if (export_dir / "kv_cache_config.json").is_file():
        kv = json.loads((export_dir / "kv_cache_config.json").read_text())
    layout = config.get("longtune_attention")
    train_layout = info.get("train_layout") or layout
    hybrid = config.get("model_type") == "longtune_llama"
    rope = config.get("rope_parameters") or {}
    rope_info = config.get("longtune_rope") or info.get("rope") or {}
    ctx = config.get("max_position_embeddings")

    meta: dict[str, Any] = {}
    if _looks_like_hub_id(info.get("base_model")):
        meta["base_model"] = info["base_model"]
    datasets = [d for d in info.get("datasets", []) if _looks_like_hub_id(d)]
    if datasets:
        meta["datasets"] = datasets
    meta["license"] = info.get("license", "apache-2.0")
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["long-context", "longtune", "llama"]
    patterns = {l["pattern"] for l in (train_layout or {}).get("layers", [])}
    tags += sorted(p.replace("_", "-") for p in patterns if p != "causal")
    if hybrid:
        tags += ["longgen", "custom_code"]
    if info.get("lora_mode") in ("lora", "qlora"):
        tags.append("lora")
    meta["tags"] = tags

    name = info.get("name") or export_dir.parent.name
    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    base = info.get("base_model")
    base_txt = (
        f"`{base}`" if base and base != "base" else "a randomly initialised / pretrained-from-scratch base"
    )
    out += [
        (
            f"Long-context model fine-tuned with longtune from {base_txt}"
            f" ({info.get('lora_mode', 'lora')} training, merged into full weights, exported in "
            f"`{info.get('dtype', config.get('dtype'))}`)."
        ),
        "",
        "## Context length and RoPE",
        "",
        f"- context length: **{ctx}** tokens (`max_position_embeddings`)",
    ]
    if rope_info.get("type") not in (None, "none"):
        out.append(
            f"- RoPE scaling: `{rope_info.get('type')}`, factor {rope_info.get('factor')} "
            f"(original length {rope_info.get('original_length')} -> {rope_info.get('target_length')})"
        )
    out.append(f"- `rope_parameters` in config.json: `{json.dumps(rope, sort_keys=True)}`")
    out += ["", "## Attention layout", ""]
    if hybrid:
        out += [
            (
                "**LongGen hybrid**: the sparse layers stay sparse at inference. The config has "
                "`model_type: longtune_llama` so plain Llama code cannot silently run it with full attention."
            ),
            "",
        ]
    out += ["Inference (`config.longtune_attention`):", ""] + _layout_lines(layout) + [""]
    if train_layout and any(l["pattern"] in TRAINING_ONLY for l in train_layout["layers"]):
        out += (
            [
                "Training used a training-only pattern (full attention at inference, as exported):",
                "",
            ]
            + _layout_lines(train_layout)
            + [""]
        )
        for p in sorted(patterns & set(TRAINING_ONLY)):
            out.append(f"- `{p}`: {PATTERN_NAMES[p]}")
        out.append("")
    if hybrid:
        out += [
            (
                "The sparse layers' window / block / stride values are this recipe's choices: LongGen "
                "(Ge et al. 2024) did not publish its own."
            ),
            "",
        ]
    elif train_layout == layout:
        out += ["Training used the same layout.", ""]
    out += ["## KV cache", ""] + _kv_lines(kv) + [""]
    out += ["## Usage", "", "```python", "import finetune", "", 'model = finetune.load_model("PATH")',
            'tok = finetune.load_tokenizer("PATH")',
            "out = model.generate(**tok(\"...\", return_tensors=\"pt\"), max_new_tokens=64)  # uses kv_cache_config.json",
            "```", ""]  # fmt: skip
    if hybrid:
        out += [
            (
                "With plain transformers (longtune installed): "
                '`AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)`.'
            ),
            "",
        ]
    else:
        out += [
            (
                'This is a plain Llama checkpoint: `AutoModelForCausalLM.from_pretrained("PATH")` works '
                "anywhere (full KV cache unless you use longtune's caches)."
            ),
            "",
        ]
    if info.get("datasets_all"):
        out += ["## Training data", ""] + [f"- `{d}`" for d in info["datasets_all"]] + [""]
    out += _eval_section(Path(eval_dir) if eval_dir else None)
    if info.get("recipe_hash"):
        out += ["## Provenance", "", f"- recipe hash: `{info['recipe_hash']}`",
                f"- exported from: `{info.get('source')}` of the run", ""]  # fmt: skip
    return "\n".join(out).rstrip() + "\n"


def write_card(export_dir: str | Path, eval_dir: str | Path | None = None) -> Path:
    export_dir = Path(export_dir)
    return atomic_write_text(export_dir / "README.md", render(export_dir, eval_dir))


def refresh_card(run_dir: str | Path, export_dir: str | Path | None = None) -> Path | None:
    """Rewrite `<export>/README.md` with `<run_dir>/eval/results.json` (push calls it, so the
    uploaded card shows the latest evaluation).

    Returns the card's path, or None when the run has no export yet.
    """
    run_dir = Path(run_dir)
    export_dir = Path(export_dir) if export_dir else default_export_dir(run_dir)
    if not (export_dir / "config.json").is_file():
        return None
    eval_dir = run_dir / "eval"
    return write_card(export_dir, eval_dir if eval_dir.is_dir() else None)

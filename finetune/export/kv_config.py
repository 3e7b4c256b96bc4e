"""`kv_cache_config.json`: the KV cache an exported model generates with (schema: docs/export.md).

Built from the recipe's `export.kv_cache`, checked against the model it ships with (its layer
count and attention layout), and read back by `finetune.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kernels.layout import is_hybrid, sparse_layer_indices
from kernels.masks import resolve_spec

VERSION = 1
FILE = "kv_cache_config.json"
METHODS = ("full", "h2o", "sink", "hybrid")
#: Default H2O budget when neither tokens nor ratios are given (the reference's 10% + 10%).
DEFAULT_RATIO = 0.1

KEYS = (
    "method", "heavy", "recent", "heavy_ratio", "recent_ratio", "window", "num_sink_tokens",
    "score_normalization", "gqa_reduction", "layers", "prefill_chunk",
)  # fmt: skip


class KVConfigError(ValueError):
    """An invalid KV-cache config; the message names the key (`export.kv_cache.<key>`)."""


def _err(key: str, msg: str, where: str) -> KVConfigError:
    return KVConfigError(f"{where}.{key}: {msg}")


def full_layers(layout: dict | None) -> list[int] | None:
    """LongGen: the layers that keep full attention (None for a non-hybrid model)."""
    if not is_hybrid(layout):
        return None
    sparse = set(sparse_layer_indices(layout))
    return [i for i in range(len(layout["layers"])) if i not in sparse]


def _num_layers(model_config) -> int:
    if isinstance(model_config, dict):
        return int(model_config["num_hidden_layers"])
    return int(model_config.num_hidden_layers)


def _layout(model_config) -> dict | None:
    if isinstance(model_config, dict):
        return model_config.get("longtune_attention")
    return getattr(model_config, "longtune_attention", None)


def build(kv_section, model_config, where: str = "export.kv_cache") -> dict[str, Any]:
    """Recipe `export.kv_cache` (a KVCacheSection or dict) -> validated, versioned config dict."""
    cfg = kv_section.model_dump(mode="json") if hasattr(kv_section, "model_dump") else dict(kv_section)
    return validate({"version": VERSION, **cfg}, model_config, where=where)


def validate(cfg: dict[str, Any], model_config, where: str = "kv_cache") -> dict[str, Any]:
    """Check `cfg` against the model (layers, layout) and fill in derived keys.

    Errors name the key as `<where>.<key>` (`export.kv_cache.method` for a recipe,
    `kv_cache.method` for a user's dict). Returns a new dict.
    """
    if not isinstance(cfg, dict):
        raise KVConfigError(f"{where}: expected a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    version = cfg.setdefault("version", VERSION)
    if version != VERSION:
        raise _err("version", f"unsupported version {version!r} (this longtune reads {VERSION})", where)
    unknown = set(cfg) - set(KEYS) - {"version", "attn_implementation", "full_layers", "num_layers"}
    if unknown:
        raise _err(min(unknown), f"unknown key (valid: {', '.join(KEYS)})", where)
    method = cfg.setdefault("method", "full")
    if method not in METHODS:
        raise _err("method", f"must be one of {', '.join(METHODS)} (got {method!r})", where)
    for k, default in (("num_sink_tokens", 4), ("score_normalization", "none"), ("gqa_reduction", "mean"),
                       ("layers", "all"), ("prefill_chunk", 512)):  # fmt: skip
        if cfg.get(k) is None:
            cfg[k] = default
    for k in ("heavy", "recent", "heavy_ratio", "recent_ratio", "window"):
        cfg.setdefault(k, None)
    if cfg["score_normalization"] not in ("none", "mean"):
        raise _err("score_normalization", f"must be none or mean (got {cfg['score_normalization']!r})", where)
    if cfg["gqa_reduction"] not in ("mean", "sum"):
        raise _err("gqa_reduction", f"must be mean or sum (got {cfg['gqa_reduction']!r})", where)
    for k in ("heavy", "recent", "window", "num_sink_tokens"):
        v = cfg[k]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise _err(k, f"must be a token count >= 0 (got {v!r})", where)
    for k in ("heavy_ratio", "recent_ratio"):
        v = cfg[k]
        if v is not None and not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise _err(k, f"must be a ratio in [0, 1] (got {v!r})", where)

    n = _num_layers(model_config)
    layout = _layout(model_config)
    hybrid = is_hybrid(layout)
    layers = cfg["layers"]
    if isinstance(layers, list):
        bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
        if bad or not layers:
            raise _err("layers", f"layer indices must be in 0..{n - 1} (got {layers!r})", where)
        if len(set(layers)) != len(layers):
            raise _err("layers", f"repeated layer index in {layers!r}", where)
    elif layers not in ("all", "sparse"):
        raise _err("layers", f"must be all, sparse or a list of layer indices (got {layers!r})", where)
    elif layers == "sparse" and not hybrid:
        raise _err("layers", "'sparse' needs a LongGen hybrid model; this model has no sparse layers", where)

    if method == "hybrid":
        if not hybrid:
            raise _err(
                "method",
                "'hybrid' needs a LongGen hybrid model (a recipe with a `hybrid:` section); this model's "
                "layers all use full attention at inference. Use h2o, sink or full.",
                where,
            )
        # The hybrid cache keeps what each sparse layer can see (sinks + window for sink_window,
        # local + strided blocks for block_sparse), read from the layout: record the window.
        specs = [resolve_spec(layout["layers"][i]) for i in sparse_layer_indices(layout)]
        windows = {(s["window"], s["num_sink_tokens"]) for s in specs if s["pattern"] == "sink_window"}
        if len(windows) == 1:
            win, sinks = windows.pop()
            if cfg["window"] not in (None, win):
                raise _err(
                    "window",
                    f"the hybrid cache keeps the layers' own window ({win}), got {cfg['window']}",
                    where,
                )
            cfg["window"], cfg["num_sink_tokens"] = win, sinks
        cfg["layers"] = "sparse"
    elif method == "h2o":
        for part in ("heavy", "recent"):
            if cfg[part] is not None and cfg[f"{part}_ratio"] is not None:
                raise _err(part, f"set {part} (tokens) or {part}_ratio, not both", where)
            if cfg[part] is None and cfg[f"{part}_ratio"] is None:
                cfg[f"{part}_ratio"] = DEFAULT_RATIO
    elif method == "sink" and cfg["window"] is None:
        raise _err(
            "window", "method 'sink' needs window: the number of recent tokens kept after the sinks", where
        )

    cfg["num_layers"] = n
    cfg["full_layers"] = full_layers(layout)
    # What the cache needs from the attention function: longtune's reports positions (sink,
    # hybrid) and attention probabilities (h2o); a hybrid model needs it for its sparse layers.
    cfg["attn_implementation"] = "longtune" if (method != "full" or hybrid) else None

    from finetune.caches import validate_kv_config

    checked = validate_kv_config(cfg, model_config)
    return dict(checked) if checked is not None else cfg


def write(export_dir: str | Path, cfg: dict[str, Any]) -> Path:
    path = Path(export_dir) / FILE
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def read(model_dir: str | Path) -> dict[str, Any] | None:
    """The config beside a checkpoint, or None when there is none."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KVConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise KVConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("version") != VERSION:
        raise KVConfigError(f"{path}: version {cfg.get('version')!r} is not supported (expected {VERSION})")
    return cfg

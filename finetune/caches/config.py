"""The KV-cache config: one type, one validator, one error, one file (`kv_cache_config.json`).

The type is the recipe's `export.kv_cache` section (`KVCacheSection`, finetune/recipe.py: field
types and defaults); `validate` turns it (or a dict, or None) into the normalised, versioned
dict every consumer uses: `make_cache` builds a cache from it, export writes it next to the
checkpoint (`build` + `write`), `finetune.load_model` reads it back (`read` + `validate`).
Errors are `KVConfigError` and name the key as `<where>.<key>`: `export.kv_cache.window` for a
recipe, `kv_cache.window` for a user's dict, the file path for a file.

Schema (docs/kv_caches.md): version 2 added `positions` (sink cache: `absolute` keys at their
true positions, or `cache`, StreamingLLM's contiguous in-cache positions). Version 1 files are
read as version 2 with `positions: absolute`, which is what version 1 meant.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetune.recipe import KVCacheSection
from finetune.rundir import atomic_write_text
from kernels.layout import is_hybrid, sparse_layer_indices
from kernels.masks import resolve_spec

VERSION = 2
#: versions this longtune reads (1: before `positions`)
READABLE = (1, 2)
FILE = "kv_cache_config.json"
#: Keys export derives from the model and writes for information; recomputed when the model
#: config is known, passed through otherwise.
DERIVED_KEYS = ("attn_implementation", "full_layers", "num_layers")
#: H2O budget when neither tokens nor ratios are given (the reference's 10% heavy + 10% recent)
DEFAULT_RATIO = 0.1


class KVConfigError(ValueError):
    """A KV-cache config that cannot be used (with this model); the message names the key."""


def config_value(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _layout(model_config) -> dict | None:
    return config_value(model_config, "longtune_attention")


def full_layers(layout: dict | None) -> list[int] | None:
    """LongGen: the layers that keep full attention (None for a non-hybrid model)."""
    if not is_hybrid(layout):
        return None
    sparse = set(sparse_layer_indices(layout))
    return [i for i in range(len(layout["layers"])) if i not in sparse]


def validate(kv, model_config=None, where: str = "kv_cache") -> dict[str, Any]:
    """Check a KV-cache config (a KVCacheSection, a dict, or None = full) and return it
    normalised: every field present, `"version": VERSION`, H2O ratios defaulted to 0.1 + 0.1
    when no budget is given. With `model_config` (a PretrainedConfig or its dict) also the
    checks against the model (layer indices, hybrid layout, heads) and the derived keys
    (`num_layers`, `full_layers`, `attn_implementation`)."""
    kv = {} if kv is None else kv
    if isinstance(kv, KVCacheSection):
        kv = kv.model_dump(mode="json")
    if not isinstance(kv, dict):
        raise KVConfigError(f"{where}: expected a mapping, got {type(kv).__name__}")
    kv = dict(kv)
    derived = {k: kv.pop(k) for k in DERIVED_KEYS if k in kv}
    version = kv.pop("version", VERSION)
    if version not in READABLE or isinstance(version, bool):
        raise KVConfigError(
            f"{where}.version: unsupported version {version!r} (this longtune reads {', '.join(map(str, READABLE))})"
        )
    if version == 1 and "positions" in kv:
        raise KVConfigError(f"{where}.positions: not part of version 1; write version {VERSION}")
    try:
        out = KVCacheSection.model_validate(kv).model_dump(mode="json")
    except ValidationError as e:
        raise KVConfigError(_pydantic_message(e, where)) from None

    def err(key: str, msg: str) -> KVConfigError:
        return KVConfigError(f"{where}.{key}: {msg}")

    m = out["method"]
    if m == "sink" and out["window"] is None:
        raise err("window", "required for method 'sink' (the number of recent tokens kept after the sinks)")
    if out["positions"] == "cache" and m != "sink":
        raise err("positions", f"'cache' (StreamingLLM's in-cache positions) applies to method 'sink', not {m!r}")
    if m == "h2o":
        for tok, ratio in (("heavy", "heavy_ratio"), ("recent", "recent_ratio")):
            if out[tok] is not None and out[ratio] is not None:
                raise err(tok, f"set {tok} (tokens) or {ratio}, not both")
            if out[tok] is None and out[ratio] is None:
                out[ratio] = DEFAULT_RATIO
    layers = out["layers"]
    if isinstance(layers, list) and (not layers or len(set(layers)) != len(layers)):
        raise err("layers", f"a non-empty list of distinct layer indices (got {layers!r})")
    if model_config is None:
        return {"version": VERSION, **out, **derived}

    n = int(config_value(model_config, "num_hidden_layers"))
    layout = _layout(model_config)
    hybrid = is_hybrid(layout)
    if isinstance(layers, list):
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise err("layers", f"indices {bad} out of range: layer indices must be in 0..{n - 1} (got {layers!r})")
    elif layers == "sparse" and m in ("sink", "h2o") and not hybrid:
        raise err("layers", "'sparse' selects the LongGen sparse layers, but this model has no hybrid layout")
    if m == "hybrid":
        if not hybrid:
            raise err(
                "method",
                "'hybrid' needs a LongGen hybrid model (config.longtune_attention with "
                "sink_window/block_sparse layers; a recipe with a `hybrid:` section); this model's layers all "
                "use full attention at inference. Use method 'full', 'sink' or 'h2o'.",
            )
        # the hybrid cache keeps what each sparse layer can see: record the layers' window
        specs = [resolve_spec(layout["layers"][i]) for i in sparse_layer_indices(layout)]
        windows = {(e["window"], e["num_sink_tokens"]) for e in specs if e["pattern"] == "sink_window"}
        if len(windows) == 1:
            win, sinks = windows.pop()
            if out["window"] not in (None, win):
                raise err("window", f"the hybrid cache keeps the layers' own window ({win}), got {out['window']}")
            out["window"], out["num_sink_tokens"] = win, sinks
        out["layers"] = "sparse"
    if m == "sink" and out["positions"] == "cache" and layout is not None:
        chosen = range(n) if out["layers"] == "all" else [i for i in out["layers"] if isinstance(i, int)]
        if out["layers"] == "sparse" or set(chosen) & set(sparse_layer_indices(layout)):
            raise err(
                "positions",
                "'cache' needs layers with full (causal) attention: a sparse layer's pattern is defined on "
                "true positions; use positions 'absolute' or choose causal layers",
            )
    if m == "h2o":
        heads, kv_heads = config_value(model_config, "num_attention_heads"), config_value(model_config, "num_key_value_heads")
        if kv_heads and heads % kv_heads:
            raise err("method", f"h2o needs heads ({heads}) divisible by KV heads ({kv_heads})")
    out["num_layers"] = n
    out["full_layers"] = full_layers(layout)
    # What the cache needs from the attention function: longtune's reports positions (sink,
    # hybrid) and attention probabilities (h2o); a hybrid model needs it for its sparse layers.
    out["attn_implementation"] = "longtune" if (m != "full" or hybrid) else None
    return {"version": VERSION, **out}


def _pydantic_message(e: ValidationError, where: str) -> str:
    valid = list(KVCacheSection.model_fields) + ["version", *DERIVED_KEYS]
    lines = []
    for item in e.errors():
        key = ".".join(str(p) for p in item["loc"] if not str(p).startswith(("list[", "literal[")))
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{where}.{close[0]}'?" if close else ""
            lines.append(f"{where}.{key}: unknown key{hint} (valid: {', '.join(valid)})")
        else:
            lines.append(f"{where}.{key}: {item['msg']} (got {item.get('input')!r})")
    return "invalid KV-cache config:\n  " + "\n  ".join(dict.fromkeys(lines))


def build(kv_section, model_config, where: str = "export.kv_cache") -> dict[str, Any]:
    """The recipe's `export.kv_cache` checked against the model: what export writes."""
    return validate(kv_section, model_config, where=where)


def write(export_dir: str | Path, cfg: dict[str, Any]) -> Path:
    """Write `kv_cache_config.json` atomically (temp file + rename)."""
    return atomic_write_text(Path(export_dir) / FILE, json.dumps(cfg, indent=2) + "\n")


def read(model_dir: str | Path) -> dict[str, Any] | None:
    """The config beside a checkpoint (not yet checked against the model: `validate` it), or
    None when there is none. Errors name the file (and line for bad JSON)."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise KVConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise KVConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise KVConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("version") not in READABLE:
        raise KVConfigError(
            f"{path}: version {cfg.get('version')!r} is not supported (this longtune reads "
            f"{', '.join(map(str, READABLE))})"
        )
    return cfg

"""KV-cache memory and generation speed for the full, H2O, sink and hybrid caches.

For each method that applies to the model (``hybrid`` only for a LongGen layout) and each
length: a fresh cache from ``finetune.caches.make_cache(model, kv_config)``, a prefill of the
prompt (``length`` tokens, ``logits_to_keep=1`` as generate does) then ``decode_tokens`` greedy
decode steps, one token at a time, timed separately (wall clock, ``time.perf_counter``, CUDA
synchronised, after one warm-up decode step). Reported: ``nbytes`` (``cache.nbytes()`` after
decoding: K/V actually held), prefill and decode tokens/s, the peak memory of the prefill
(finetune/caches/measure.py: CUDA peak allocation, or the growth of the process's peak
resident set on CPU), and, next to the full cache at the same length, what each cache buys:
``fraction_of_full`` (KV bytes), ``prefill_x`` / ``decode_x`` (tokens/s over full's: > 1 is
faster) and ``memory_x`` (peak prefill memory over full's: < 1 is smaller).

Budgets (recorded with each result): H2O 10% heavy + 10% recent (the reference default);
sink 4 sink tokens + a window of 20% of the prompt; hybrid the model's own layout. The
export's ``kv_cache_config.json`` overrides the budgets of its own method.
"""

from __future__ import annotations

import inspect
import time

import torch
from tqdm.auto import tqdm

METHODS = ("full", "h2o", "sink", "hybrid")


def default_kv_config(method: str, length: int, export_config: dict | None = None) -> dict:
    from finetune.recipe import KVCacheSection

    if export_config and export_config.get("method") == method:
        return dict(export_config)  # as written by export; make_cache validates it
    over: dict = {"method": method}
    if method == "h2o":
        over.update(heavy_ratio=0.1, recent_ratio=0.1)
    elif method == "sink":
        over.update(window=max(1, length // 5))
    return KVCacheSection(**over).model_dump(mode="json")


def applicable_methods(model) -> dict[str, str | None]:
    """method -> None when applicable, else the reason it is not."""
    from kernels.layout import is_hybrid

    out: dict[str, str | None] = dict.fromkeys(METHODS)
    if not is_hybrid(getattr(model.config, "longtune_attention", None)):
        out["hybrid"] = "the model has no LongGen sparse layers (config.longtune_attention)"
    return out


def cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _nbytes(cache) -> int:
    from finetune.caches import cache_nbytes

    return int(cache_nbytes(cache))


@torch.no_grad()
def measure(model, prompt: torch.Tensor, kv_config: dict, decode_tokens: int = 32) -> dict:
    """Prefill ``prompt`` (1-D ids) into a fresh cache, decode greedily; sizes and speeds."""
    from finetune.caches import make_cache
    from finetune.caches.measure import sync, timed_peak

    kw = cache_kwarg(model)
    ids = prompt.reshape(1, -1).to(model.device)
    cache = make_cache(model, kv_config)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out, prefill_s, peak = timed_peak(lambda: model(input_ids=ids, use_cache=True, **keep, **{kw: cache}), ids.device)
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    nbytes_prefill = _nbytes(cache)
    decode_s = 0.0
    for step in range(decode_tokens + 1):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{kw: cache})
        sync(ids.device)
        dt = time.perf_counter() - t0
        if step:  # step 0 is a warm-up
            decode_s += dt
        nxt = out.logits[:, -1:].argmax(-1)
    kept = cache.kept_tokens() if hasattr(cache, "kept_tokens") else None
    return {
        "kv_config": kv_config,
        "cache_class": type(cache).__name__,
        "prompt_tokens": int(ids.shape[1]),
        "decode_tokens": decode_tokens,
        "nbytes_after_prefill": nbytes_prefill,
        "nbytes": _nbytes(cache),
        "kept_tokens_per_layer": [int(k) if not isinstance(k, torch.Tensor) else int(k.max()) for k in kept]
        if kept is not None
        else None,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": ids.shape[1] / prefill_s if prefill_s > 0 else None,
        "peak_prefill_bytes": peak,
        "decode_s": decode_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
    }


def run(model, ids: torch.Tensor, cfg, export_config: dict | None = None, progress: bool = True) -> dict:
    """``{"methods": {method: {length: result | {"error"}}}, "skipped": {method: reason}}``."""
    ids = ids.reshape(-1)
    decode_tokens = getattr(cfg, "kv_decode_tokens", 32)
    methods = applicable_methods(model)
    results: dict = {}
    skipped = {m: why for m, why in methods.items() if why}
    todo = [(m, L) for m in methods if not methods[m] for L in cfg.lengths]
    warmed: set[str] = set()
    for method, length in tqdm(todo, desc="kv cache", disable=not progress):
        row = results.setdefault(method, {})
        if method not in warmed and ids.numel() >= 16:  # first-call costs (imports, allocator) untimed
            warmed.add(method)
            try:
                measure(model, ids[:16], default_kv_config(method, 16, export_config), 1)
            except Exception:  # noqa: BLE001, S110 - the timed run below records the error
                pass
        if ids.numel() < length:
            row[str(length)] = {"error": f"evaluation text has {ids.numel()} tokens < {length}"}
            continue
        kv = default_kv_config(method, length, export_config)
        try:
            row[str(length)] = measure(model, ids[:length], kv, decode_tokens)
        except Exception as e:  # noqa: BLE001 - recorded, not hidden: the summary shows it
            row[str(length)] = {"kv_config": kv, "error": f"{type(e).__name__}: {e}"}
    for method, rows in results.items():
        for L, r in rows.items():
            full = results.get("full", {}).get(L, {})
            if "nbytes" in r and full.get("nbytes"):
                r["fraction_of_full"] = r["nbytes"] / full["nbytes"]
            for key, ratio in (("prefill_tokens_per_s", "prefill_x"), ("decode_tokens_per_s", "decode_x"),
                               ("peak_prefill_bytes", "memory_x")):  # fmt: skip
                if r.get(key) is not None and full.get(key):
                    r[ratio] = r[key] / full[key]
    return {"decode_tokens": decode_tokens, "methods": results, "skipped": skipped}

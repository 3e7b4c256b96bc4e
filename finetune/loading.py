"""Load a longtune model for inference: `finetune.load_model(path)`.

`path` is an export directory (`longtune export`), a run directory, or a run's `final/`
(merged in memory). The attention layout comes from the checkpoint's own config
(`config.longtune_attention`), never from a recipe; the KV cache from `kv_cache_config.json`.

Default cache: `model.generate` is replaced on the instance by `generate_with_cache` bound to
the model, exactly what transformers itself does for a repository's `custom_generate/generate.py`
(`from_pretrained(..., trust_remote_code=True)`), which every export also ships. No transformers
class is patched; other instances are untouched. A `kv_cache=` argument (per load or per call,
"full" or a config dict) and an explicit `cache=` win over the file.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from finetune.rundir import MODEL_META, RECIPE_FILE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _register_hybrid_classes() -> None:
    """`longtune_llama` (hybrid exports) resolves to our classes without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.export.longtune_hybrid import LongtuneLlamaConfig, LongtuneLlamaForCausalLM

    AutoConfig.register("longtune_llama", LongtuneLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(LongtuneLlamaConfig, LongtuneLlamaForCausalLM, exist_ok=True)


def _dtype(dtype) -> Any:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
        return _DTYPES[dtype]
    return dtype


def _resolve(path: Path) -> Path:
    if not path.exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        from huggingface_hub import snapshot_download  # a Hub repo id: a pushed export

        try:
            path = Path(snapshot_download(repo_id=str(path)))
        except Exception as e:  # offline, no such repo, no access
            raise FileNotFoundError(
                f"{path}: no such local directory, and not a Hub model that could be fetched "
                f"({type(e).__name__}: {e})"
            ) from e
    from finetune.rundir import model_dir

    return model_dir(path)


def install_attention(model, layout: dict | None = None) -> None:
    """Select longtune's attention for `model` with its config's layout (inference form)."""
    from kernels.layout import inference_layout, install_layout

    layout = layout or getattr(model.config, "longtune_attention", None)
    if layout is None:
        layout = {"version": 1, "layers": [{"pattern": "causal"}] * model.config.num_hidden_layers}
    install_layout(model.config, inference_layout(layout))


def resolve_kv_cache(model, kv_cache) -> dict | None:
    """The KV-cache config a call should use: an override ("full" / dict) or the model's default."""
    from finetune.caches import config as kv_config

    if kv_cache is None:
        return getattr(model, "longtune_kv_cache", None)
    if kv_cache == "full":
        return None
    if isinstance(kv_cache, str):
        raise ValueError(f"kv_cache must be None, 'full' or a KV-cache config dict (got {kv_cache!r})")  # noqa: TRY004
    return kv_config.validate(kv_cache, model.config, where="kv_cache")


def generate_with_cache(model, *args, kv_cache=None, **kwargs):
    """`model.generate(...)` with the model's KV-cache config (or `kv_cache=`) building the cache.

    A `cache=` / `past_key_values=` argument is used as given. Method `full` (or no config) is
    plain `generate`.
    """
    gen = type(model).generate  # the class's method: the instance attribute may be us
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return gen(model, *args, **kwargs)
    cfg = resolve_kv_cache(model, kv_cache)
    if cfg is None and kv_cache is None and not hasattr(model, "longtune_kv_cache"):
        # Loaded by plain transformers (trust_remote_code + custom_generate): read the file.
        from finetune.caches import config as kv_config

        where = _model_dir(model)
        cfg = kv_config.read(where) if where else None
        if cfg is not None:
            cfg = kv_config.validate(cfg, model.config, where="kv_cache_config.json")
    if cfg is None or cfg.get("method", "full") == "full":
        return gen(model, *args, **kwargs)
    if cfg.get("attn_implementation") == "longtune" and model.config._attn_implementation != "longtune":
        install_attention(model)
    from finetune.caches import make_cache

    kwargs["cache"] = make_cache(model, cfg)
    return gen(model, *args, **kwargs)


def _model_dir(model) -> str | None:
    """Where a model loaded by plain transformers came from (a Hub id -> its local snapshot)."""
    name = str(getattr(model, "name_or_path", "") or "")
    if not name:
        return None
    if Path(name).is_dir():
        return name
    try:
        from huggingface_hub import hf_hub_download

        from finetune.caches.config import FILE

        return str(Path(hf_hub_download(name, FILE)).parent)
    except Exception:  # noqa: BLE001  (no such repo / offline / no file: no config)
        return None


def load_model(path, kv_cache=None, dtype=None, device=None):
    """An exported longtune model (or a run's `final/`) ready for inference.

    - attention layout restored from the checkpoint's config (hybrid layers stay sparse;
      training-only sf_attn/s2_attn layers run causal);
    - `model.generate` uses `kv_cache_config.json` by default; `kv_cache="full"` or a config dict
      overrides it (also per call: `model.generate(ids, kv_cache="full")`);
    - `dtype`: "float32" / "bfloat16" / "float16" / a torch dtype; default = the saved dtype;
    - `device`: moved there after loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.caches import config as kv_config

    path = _resolve(Path(path))
    _register_hybrid_classes()
    if (path / MODEL_META).is_file() and (path / "adapter_config.json").is_file():
        model, kv_default = _load_final(path, dtype)
    else:
        config = AutoConfig.from_pretrained(str(path))
        layout = getattr(config, "longtune_attention", None)
        if layout is not None:
            from kernels.layout import inference_layout, install_layout

            install_layout(config, inference_layout(layout))
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=_dtype(dtype))
        kv_default = kv_config.read(path)
        if kv_default is not None:
            kv_default = kv_config.validate(kv_default, model.config, where=str(path / kv_config.FILE))
    if getattr(model.config, "longtune_attention", None) is not None:
        install_attention(model)  # from_pretrained may reset the implementation: the layout wins
    model.longtune_kv_cache = kv_default
    if kv_cache is not None:
        model.longtune_kv_cache = resolve_kv_cache(model, kv_cache)
    if (model.longtune_kv_cache or {}).get("attn_implementation") == "longtune":
        install_attention(model)
    model.config.use_cache = True
    if device is not None:
        model.to(device)
    model.eval()
    model.generate = functools.partial(generate_with_cache, model)
    return model


def _load_final(final: Path, dtype):
    """A run's `final/` (LoRA): merged in memory; KV config from the run's recipe if present."""
    from finetune.caches import config as kv_config
    from finetune.export.merge import load_merged

    run = load_merged(final, dtype=torch.float32)
    model = run.model
    if run.train_layout is not None:
        from kernels.layout import inference_layout

        model.config.longtune_attention = inference_layout(run.train_layout)
    if _dtype(dtype) != "auto":  # "auto" / None: keep the merged float32 weights
        model.to(_dtype(dtype))
    kv = None
    recipe_file = final.parent / RECIPE_FILE
    if recipe_file.is_file():
        from finetune.recipe import load_recipe

        kv = kv_config.build(load_recipe(recipe_file).export.kv_cache, model.config)
    return model, kv


def load_tokenizer(path):
    """The tokenizer saved with an export (or a run's `final/`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_resolve(Path(path))))

"""longtune: `generate` with the KV cache named by `kv_cache_config.json`.

Copied into exports as `custom_generate/generate.py`, transformers' hook for a repository's own
generate function: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` makes
`model.generate` call this. `finetune.load_model(path)` installs the same function without
remote code. Pass `kv_cache="full"` (or a KV-cache config dict) to override per call, or
`cache=` (a transformers Cache) to use your own.
"""


def generate(*args, model, **kwargs):
    # `model` is keyword-only: transformers binds it with functools.partial(generate, model=model),
    # so the caller's positional input_ids must not land on it.
    try:
        from finetune.loading import generate_with_cache
    except ImportError:
        generate_with_cache = None
    if generate_with_cache is None:
        import json
        import os

        path = os.path.join(str(getattr(model, "name_or_path", "")), "kv_cache_config.json")
        method = "full"
        if os.path.isfile(path):
            with open(path) as f:
                method = json.load(f).get("method", "full")
        kv = kwargs.pop("kv_cache", None)
        if method != "full" and kv != "full":
            raise ImportError(
                f"this checkpoint generates with longtune's '{method}' KV cache (kv_cache_config.json); "
                "install longtune, or pass kv_cache='full' for a plain full cache"
            )
        return type(model).generate(model, *args, **kwargs)
    return generate_with_cache(model, *args, **kwargs)

"""longtune: long-context fine-tuning for Llama-family models."""

from finetune.quiet import mute_bnb_hub_kernel_probe

# Before anything imports bitsandbytes (peft, the HF Trainer): see finetune/quiet.py.
mute_bnb_hub_kernel_probe()


def __getattr__(name):
    # Lazy: `import finetune` stays cheap; `finetune.load_model` imports torch/transformers on use.
    if name in ("load_model", "load_tokenizer"):
        from finetune import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")

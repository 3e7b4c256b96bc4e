"""LongGen hybrid Llama (longtune): full-attention layers plus sparse (sink_window / block_sparse)
layers, at training AND inference. Plain Llama code would run every layer with full attention,
which is not the model that was trained, so this checkpoint has its own `model_type`
(`longtune_llama`) and refuses to load as a plain Llama.

How to load it (longtune must be installed: `pip install longtune` or the repository):

    import finetune
    model = finetune.load_model(path)            # layout + KV-cache config restored

    # or, with plain transformers:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

This file is copied into every hybrid export (config.json `auto_map` points here); it only
registers longtune's attention function and selects it through the model config
(`config.longtune_attention`, `_attn_implementation = "longtune"`). The model code is Llama's.
"""

from transformers import LlamaConfig, LlamaForCausalLM

HOW_TO_LOAD = (
    "This is a longtune LongGen hybrid checkpoint: some layers use sparse attention "
    "(sink_window / block_sparse) that plain Llama code would silently replace with full "
    "attention. Install longtune and load it with `finetune.load_model(path)`, or with "
    "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`."
)


def install_longtune_attention(config) -> None:
    """Select longtune's attention for the layout in `config` (training-only patterns -> causal)."""
    try:
        from kernels.layout import inference_layout, install_layout
    except ImportError as e:
        raise ImportError(f"{HOW_TO_LOAD} (could not import longtune's kernels: {e})") from None
    layout = getattr(config, "longtune_attention", None)
    if not layout:
        raise ValueError(f"config.longtune_attention is missing. {HOW_TO_LOAD}")
    install_layout(config, inference_layout(layout))


class LongtuneLlamaConfig(LlamaConfig):
    model_type = "longtune_llama"


class LongtuneLlamaForCausalLM(LlamaForCausalLM):
    config_class = LongtuneLlamaConfig

    def __init__(self, config):
        install_longtune_attention(config)
        super().__init__(config)

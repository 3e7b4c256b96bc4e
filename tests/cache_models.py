"""Tiny float64 Llama models and greedy decoding shared by the cache tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.caches.reference import register

REF = register()


def tiny(layout=None, layers=2, seed=0):
    """A float64 model on the reference attention; `layout` (one layer spec) on every layer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    m = LlamaForCausalLM(cfg).double().eval()
    if layout is not None:
        m.config.longtune_attention = {"version": 1, "layers": [layout] * layers}
    m.config._attn_implementation = REF
    return m


def greedy(model, ids, cache, n, stopping=None):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0, stopping_criteria=stopping,
        )  # fmt: skip

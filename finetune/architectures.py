"""Published architecture numbers of the base models the shipped recipes name.

Used only when the Hugging Face Hub cannot be reached (an offline machine, a cluster login
node): `finetune.model.load_base_config` falls back to this table so `--dry-run` (parameter
count, memory estimate, RoPE scaling, attention layout) works without the Hub, and it says so.
Training never uses it: weights still come from the Hub or a local path.

The numbers are each model's public config.json (hidden size, FFN width, layers, attention
and KV heads, vocabulary, positions, RoPE base and scaling). One table, one entry per model.
"""

from __future__ import annotations

import sys
from typing import Any

_LLAMA_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}

#: Hub id -> LlamaConfig keyword arguments (the model's published config.json).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Llama 2 (Touvron et al., 2023), 7B.
    "meta-llama/Llama-2-7b-hf": {
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Meta Llama 3, 8B: grouped-query attention (8 KV heads), 8k positions, RoPE base 500000.
    # Its published config carries no rope_scaling (the `llama3` rope type came with 3.1).
    "meta-llama/Meta-Llama-3-8B": {
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}

_used: set[str] = set()


def known(name: str | None) -> bool:
    return name in ARCHITECTURES


def config_kwargs(name: str) -> dict[str, Any]:
    """The table entry of `name` (a copy), recording that the fallback was used."""
    _used.add(name)
    kw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ARCHITECTURES[name].items()}
    kw.pop("model_type", None)
    return kw


def used_fallback(name: str | None) -> bool:
    """Whether this process read `name`'s architecture from the table instead of the Hub."""
    return name in _used


def note(name: str) -> str:
    return (
        f"{name}: the Hugging Face Hub is unreachable; using longtune's table of its published "
        "architecture (finetune/architectures.py) for the config. Weights still need the Hub."
    )


def warn(name: str) -> None:
    print(f"[longtune] {note(name)}", file=sys.stderr)

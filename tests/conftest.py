"""Shared fixtures: the tiny Llama (config, models, greedy decoding) and tiny run directories.

Tests never import each other or this file; they ask for these fixtures by name. Factories
are session-scoped fixtures returning a function, so module- and session-scoped fixtures can
use them too.
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Two cores shared by the whole suite: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- tiny Llama
#: LlamaConfig kwargs of every test model (vocabulary = the offline byte tokenizer's 259 ids).
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 259,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: a fresh dict of the tiny Llama's config kwargs, with overrides."""
    return lambda **overrides: {**TINY_LLAMA, **overrides}


@pytest.fixture
def tiny_llama_config(tiny_config):
    return tiny_config()


def _tiny_llama(layers=2, seed=0, dtype=torch.float32, layout=None, attn=None, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(layout, list):
        layers = len(layout)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": layers, **overrides}))
    model = model.to(dtype).eval()
    if layout is not None:
        model.config.longtune_attention = {
            "version": 1, "backend": "auto", "cross_document": False,
            "layers": layout if isinstance(layout, list) else [layout] * layers,
        }  # fmt: skip
    if attn is not None:
        model.config._attn_implementation = attn
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory: ``tiny_llama(layers=2, seed=0, dtype=float32, layout=None, attn=None, **config)``,
    a seeded LlamaForCausalLM in eval mode. ``layout``: one layer spec for every layer or a list
    of specs (one per layer), stored as ``config.longtune_attention`` (not installed);
    ``attn``: the attention implementation to select."""
    return _tiny_llama


@pytest.fixture(scope="session")
def reference_llama():
    """Factory: the tiny Llama in float64 on finetune.caches.reference's plain attention function
    (honours the cache protocol): what the cache tests generate with."""
    from finetune.caches.reference import register

    name = register()
    return lambda layout=None, layers=2, seed=0, dtype=torch.float64, **config: _tiny_llama(
        layers, seed, dtype, layout, name, **config
    )


def _greedy(model, ids, cache, n, stopping=None):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0, stopping_criteria=stopping,
        )  # fmt: skip


@pytest.fixture(scope="session")
def greedy():
    """``greedy(model, ids, cache, n, stopping=None)``: exactly n greedy tokens with ``cache``."""
    return _greedy


# --------------------------------------------------------------------------- tiny runs
# Run directories written the way `finetune.train` writes them (shared by the export tests):
# a recipe, the model of that recipe (finetune.model), random non-zero LoRA B and changed
# embeddings/norms (so merging matters), `final/` saved with `finetune.train.save_final`
# through a stand-in trainer, plus `recipe.yaml`.
def _recipe_dict(run_dir: Path, kind: str = "sf_attn", kv_cache: dict | None = None, layers: int = 2) -> dict:
    d = {
        "name": f"tiny-{kind}",
        "run_dir": str(run_dir),
        "model": {"config": dict(TINY_LLAMA, num_hidden_layers=layers), "tokenizer": "byte"},
        "rope": {"type": "linear", "target_length": 256},
        "attention": {"pattern": "sf_attn" if kind == "sf_attn" else "causal", "num_sink_tokens": 4},
        "lora": {"r": 4, "alpha": 8},
        "data": {"sources": [{"type": "hub", "path": "someone/long-docs"}], "seq_length": 256},
        "deepspeed": {"config": None},
        "export": {"dtype": "float32", "max_shard_size": "40KB", "kv_cache": kv_cache or {"method": "full"}},
    }
    if kind == "hybrid":
        d["hybrid"] = {
            "full_layers": [1, 2],
            "sparse": {"pattern": "sink_window", "window": 16, "num_sink_tokens": 2},
        }
    return d


def _make_run(
    root: Path, kind: str = "sf_attn", kv_cache: dict | None = None, layers: int = 2, seed: int = 0
) -> Path:
    from data_prep.assets import load_tokenizer
    from finetune.model import build_config, build_model
    from finetune.recipe import validate
    from finetune.train import save_final, write_resolved

    run_dir = Path(root) / f"run-{kind}"
    recipe = validate(_recipe_dict(run_dir, kind, kv_cache, layers))
    recipe.training.gradient_checkpointing = False
    torch.manual_seed(seed)
    base_config = build_config(recipe)
    model = build_model(recipe)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    write_resolved(recipe)
    trainer = SimpleNamespace(
        args=SimpleNamespace(should_save=True), save_model=lambda p: model.save_pretrained(p)
    )
    save_final(trainer, model, recipe, load_tokenizer("byte"), base_config)
    return run_dir


def _peft_logits(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from finetune.export.merge import load_peft

    model = load_peft(run_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="session")
def recipe_dict():
    """``recipe_dict(run_dir, kind="sf_attn"|"causal"|"hybrid", kv_cache=None, layers=2)``: a tiny recipe."""
    return _recipe_dict


@pytest.fixture(scope="session")
def make_run():
    """``make_run(root, kind, kv_cache=None, layers=2, seed=0)``: a tiny run directory (see above)."""
    return _make_run


@pytest.fixture(scope="session")
def peft_logits():
    """``peft_logits(run_dir, ids)``: logits of the unmerged peft model (base + adapter of final/)."""
    return _peft_logits


@pytest.fixture(scope="session")
def prompt_ids():
    """(1, 20) byte-tokenizer ids: BOS + "Hello world!\\nThe en"."""
    return torch.tensor([[256, *b"Hello world!\nThe en"]])


@pytest.fixture(scope="session")
def sf_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("sf"), "sf_attn", kv_cache={"method": "sink", "window": 8})


@pytest.fixture(scope="session")
def hybrid_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("hy"), "hybrid", kv_cache={"method": "hybrid"}, layers=4)

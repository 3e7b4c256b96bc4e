"""Tiny run directories, written the way `finetune.train` writes them (shared by the export tests).

`make_run(root, kind)` builds a recipe, the model of that recipe (finetune.model), random
non-zero LoRA B and changed embeddings/norms (so merging matters), and saves `final/` with
`finetune.train.save_final` (through a stand-in trainer) plus `recipe.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import TINY_LLAMA as TINY


def recipe_dict(run_dir: Path, kind: str = "sf_attn", kv_cache: dict | None = None, layers: int = 2) -> dict:
    d = {
        "name": f"tiny-{kind}",
        "run_dir": str(run_dir),
        "model": {"config": dict(TINY, num_hidden_layers=layers), "tokenizer": "byte"},
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


def make_run(
    root: Path, kind: str = "sf_attn", kv_cache: dict | None = None, layers: int = 2, seed: int = 0
) -> Path:
    from data_prep.assets import load_tokenizer
    from finetune.model import build_config, build_model
    from finetune.recipe import validate
    from finetune.train import save_final, write_resolved

    run_dir = Path(root) / f"run-{kind}"
    recipe = validate(recipe_dict(run_dir, kind, kv_cache, layers))
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


def peft_logits(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unmerged peft model (base + adapter from final/), fp32, eval mode."""
    from finetune.export.merge import load_peft

    model = load_peft(run_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor(
    [[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 84, 104, 101, 32, 101, 110]]
)


@pytest.fixture(scope="session")
def sf_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sf"), "sf_attn", kv_cache={"method": "sink", "window": 8})


@pytest.fixture(scope="session")
def hybrid_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("hy"), "hybrid", kv_cache={"method": "hybrid"}, layers=4)


def test_fixture_final_is_as_train_writes_it(sf_run):
    final = sf_run / "final"
    for f in ("adapter_config.json", "adapter_model.safetensors", "longtune_model.json", "base/config.json"):
        assert (final / f).is_file(), f
    assert (sf_run / "recipe.yaml").is_file()

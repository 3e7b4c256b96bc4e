"""Ulysses sequence parallelism end to end: 2 DeepSpeed CPU ranks at degree 2 against 1 rank at
degree 1, on the same packed documents: the same losses, gradient norms and LoRA weights after
3 steps (fp32). Two recipe pairs cover every pattern: a hybrid with SF-Attn full layers and
block_sparse sparse layers (both head-dependent: shifted heads and strides by GLOBAL head
index), and a hybrid with causal full layers and sink_window layers. The SP runs also switch
on the memory features (tiled loss and MLP with several tiles, checkpoint offload), which must
not change the numbers either. GQA: 4 heads, 2 KV heads split over the 2 ranks.

Gradient norms are compared because Adam and clipping hide a scaled gradient from the weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from finetune.recipe import validate
from tests.test_train_deepspeed import adapter, free_port, launch, losses

pytestmark = pytest.mark.slow

MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 259, "max_position_embeddings": 128, "tie_word_embeddings": False,
         "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
SPARSE = {
    "block_sparse": {"pattern": "block_sparse", "block_size": 8, "local_blocks": 2, "stride": 3, "head_step": 1},
    "sink_window": {"pattern": "sink_window", "window": 10, "num_sink_tokens": 2},
}


def short_docs(tmp: Path) -> Path:
    """Documents of 3..30 words: several per 64-token row, so rows are packed."""
    d = tmp / "corpus"
    d.mkdir(exist_ok=True)
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "all", "that", "glitters", "is", "not", "gold"]
    for i in range(40):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + ".")
    return d


def base_model(tmp: Path) -> Path:
    path = tmp / "base"
    if not path.is_dir():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(path)
    return path


def recipe(tmp: Path, run: str, pattern: str, sparse: str, sp: int) -> Path:
    """Degree 1: one process without DeepSpeed (run in the test's process: no launcher start-up);
    degree 2: 2 DeepSpeed CPU ranks, ZeRO-2 (block_sparse pair) or ZeRO-3 (sink_window pair, with
    gradient checkpointing and the checkpoint offload). The base weights are loaded from a saved
    directory: ZeRO-3 initialises a model built from a config differently (zero.Init)."""
    attention = {"pattern": pattern} if pattern == "causal" else {"pattern": pattern, "group_ratio": 0.25,
                                                                    "num_sink_tokens": 3}
    memory = {"sequence_parallel": sp}
    training = {"learning_rate": 5e-3, "warmup_steps": 0, "max_steps": 3, "per_device_batch_size": 1,
                "gradient_accumulation_steps": 1, "save_steps": 100, "logging_steps": 1,
                "gradient_checkpointing": False, "report_to": []}
    if sp > 1:  # several tiles of 12 tokens in a 32-token shard; MLP tiles of 10
        memory.update(tiled_loss=True, tiled_loss_tokens=12, tiled_mlp=True, tiled_mlp_tokens=10)
        if sparse == "sink_window":
            memory["offload_activations"] = True
            training["gradient_checkpointing"] = True
    r = {
        "name": f"sp-{run}",
        "run_dir": str(tmp / run),
        "model": {"name_or_path": str(base_model(tmp)), "tokenizer": "byte"},
        "attention": attention,
        "hybrid": {"full_layers": [1], "sparse": SPARSE[sparse]},
        "lora": {"r": 4, "alpha": 8},
        "data": {"sources": [{"type": "text", "path": str(short_docs(tmp))}], "seq_length": 64,
                 "output_dir": str(tmp / "data")},
        "training": training,
        "deepspeed": {"config": (f"recipes/deepspeed/zero{2 if sparse == 'block_sparse' else 3}.json" if sp > 1 else None),
                      "master_port": free_port()},
        "memory": memory,
    }
    validate(r)
    p = tmp / f"{run}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def grad_norms(run_dir: Path) -> list[float]:
    hist = json.loads((run_dir / "run.json").read_text())["log_history"]
    return [h["grad_norm"] for h in hist if "grad_norm" in h]


@pytest.mark.parametrize("pattern,sparse", [("sf_attn", "block_sparse"), ("causal", "sink_window")])
def test_degree_2_equals_degree_1(tmp_path, pattern, sparse):
    from finetune.recipe import load_recipe
    from finetune.train import train

    train(load_recipe(recipe(tmp_path, "sp1", pattern, sparse, 1)))
    launch(recipe(tmp_path, "sp2", pattern, sparse, 2), "--ngpus", "2")
    one, two = tmp_path / "sp1", tmp_path / "sp2"
    # the data really is packed: some row holds several documents
    from datasets import load_from_disk

    pos = torch.tensor(load_from_disk(str(tmp_path / "data"))["train"]["position_ids"])
    assert ((pos[:, 1:] == 0).sum(dim=1) >= 2).any()
    # degree 2 really ran: rank 0 attended with heads 0..1 of 4 in every layer
    sp_report = json.loads((two / "run.json").read_text())["sequence_parallel"]
    assert sp_report["head_slice_calls"].get("0", 0) >= 3 * 3, sp_report
    assert json.loads((one / "run.json").read_text())["sequence_parallel"]["head_slice_calls"] == {}

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 3
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(grad_norms(two)), torch.tensor(grad_norms(one)), rtol=1e-3, atol=1e-4)
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        # 3 steps at lr 5e-3 move weights by ~1e-2: 1e-5 separates "same run" from "another run".
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k}: max abs diff {diff}")

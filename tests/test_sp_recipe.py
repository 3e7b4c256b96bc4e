"""The `memory` section: validation names the key, the launcher refuses before spawning."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from finetune import launch
from finetune.recipe import RecipeError, validate
from tests.conftest import TINY_LLAMA


def base(**memory) -> dict:
    return {
        "run_dir": "runs/x",
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "byte"},
        "data": {"seq_length": 64},
        "memory": memory,
    }


def test_defaults_change_nothing():
    r = validate(base())
    assert r.memory.sequence_parallel == 1 and not (r.memory.tiled_loss or r.memory.tiled_mlp
                                                      or r.memory.offload_activations)


@pytest.mark.parametrize("recipe,words", [
    (base(sequence_parallel=3), ["memory.sequence_parallel", "sequence length 64"]),
    (base(sequence_parallel=8), ["memory.sequence_parallel", "4 attention heads", "num_attention_heads"]),
    ({**base(sequence_parallel=2), "deepspeed": {"config": None}}, ["memory.sequence_parallel", "deepspeed.config"]),
    ({**base(offload_activations=True), "training": {"gradient_checkpointing": False}},
     ["memory.offload_activations", "training.gradient_checkpointing"]),
    (base(sequence_parallel=0), ["memory.sequence_parallel"]),
])
def test_bad_input_names_the_key(recipe, words):
    with pytest.raises(RecipeError) as e:
        validate(recipe)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_kv_heads_must_divide_or_be_divided():
    r = base(sequence_parallel=4)
    r["model"]["config"].update(num_attention_heads=8, num_key_value_heads=6, hidden_size=48)
    with pytest.raises(RecipeError, match="num_key_value_heads"):
        validate(r)
    r["model"]["config"].update(num_key_value_heads=2)  # replicated: 4 ranks, 2 KV heads
    assert validate(r).memory.sequence_parallel == 4


def test_launcher_refuses_world_size_before_spawning(tmp_path, monkeypatch, capsys):
    r = base(sequence_parallel=2)
    r["run_dir"] = str(tmp_path / "run")
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    spawned = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: spawned.append(a) or 0)
    assert launch.main([str(p), "--ngpus", "3"]) == 2
    err = capsys.readouterr().err
    assert "memory.sequence_parallel" in err and "world size 3" in err
    assert not spawned and not (tmp_path / "run").exists()
    assert launch.main([str(p), "--ngpus", "3", "--dry-run"]) == 2


def test_launcher_checks_the_real_models_heads(tmp_path, monkeypatch, capsys):
    # A model directory (as a Hub download would be) whose heads the recipe cannot see.
    from transformers import LlamaConfig

    LlamaConfig(**{**TINY_LLAMA, "num_attention_heads": 2, "num_key_value_heads": 2}).save_pretrained(tmp_path / "m")
    r = base(sequence_parallel=4)
    r["model"] = {"name_or_path": str(tmp_path / "m"), "tokenizer": "byte"}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("spawned"))
    assert launch.main([str(p), "--ngpus", "4"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err

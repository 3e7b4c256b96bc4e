"""Model building: RoPE scaling written into the config, the trainable parameter set, dry run."""

import math

import pytest
from transformers import LlamaConfig

from finetune.model import apply_rope, build_model, count_parameters, estimate, trainable_names
from finetune.recipe import RecipeError, RopeSection, validate


def rope(**kw):
    return RopeSection(**kw)


def test_linear_factor_is_ceil_of_target_over_original():
    c = LlamaConfig(max_position_embeddings=4096)
    info = apply_rope(c, rope(type="linear", target_length=32768 + 1))
    assert info["factor"] == math.ceil((32768 + 1) / 4096) == 9
    assert c.rope_parameters["rope_type"] == "linear" and c.rope_parameters["factor"] == 9.0
    assert c.max_position_embeddings == 32769
    # Written into the saved config: a checkpoint carries its scaling.
    assert c.to_dict()["rope_parameters"]["factor"] == 9.0


def test_explicit_factor_yarn_and_theta():
    c = LlamaConfig(max_position_embeddings=4096)
    apply_rope(c, rope(type="yarn", target_length=16384, factor=4.5, extra={"beta_fast": 16}))
    p = c.rope_parameters
    assert p["rope_type"] == "yarn" and p["factor"] == 4.5 and p["original_max_position_embeddings"] == 4096
    assert p["beta_fast"] == 16
    c = LlamaConfig(max_position_embeddings=4096)
    apply_rope(c, rope(type="theta", target_length=131072, theta=5e6))
    assert c.rope_parameters["rope_theta"] == 5e6 and c.rope_parameters["rope_type"] == "default"


def test_existing_llama3_scaling_is_combined_not_overwritten():
    base = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    c = LlamaConfig(max_position_embeddings=8192, rope_parameters=dict(base))
    apply_rope(c, rope(type="linear", target_length=65536))
    p = c.rope_parameters
    assert p["rope_type"] == "llama3" and p["factor"] == 8.0 * 8
    assert p["low_freq_factor"] == 1.0 and p["high_freq_factor"] == 4.0 and p["rope_theta"] == 500000.0
    assert p["original_max_position_embeddings"] == 8192
    c = LlamaConfig(max_position_embeddings=8192, rope_parameters=dict(base))
    with pytest.raises(RecipeError, match="rope.type"):
        apply_rope(c, rope(type="yarn", target_length=65536))


def tiny_recipe(tiny_llama_config, **over):
    d = {"model": {"config": tiny_llama_config, "tokenizer": "byte"},
         "rope": {"type": "linear", "target_length": 256},
         "attention": {"pattern": "sf_attn"}, "deepspeed": {"config": None},
         "training": {"gradient_checkpointing": False}}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return validate(d)


def test_lora_plus_trains_lora_embeddings_and_norms_only(tiny_llama_config):
    model = build_model(tiny_recipe(tiny_llama_config))
    names = trainable_names(model)
    assert names, "nothing trainable"
    for n in names:
        assert ("lora_A" in n or "lora_B" in n or ".modules_to_save." in n), n
    lora = [n for n in names if "lora_" in n]
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    saved = {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in names if ".modules_to_save." in n}
    assert saved == {"embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm"}
    # 2 layers x 3 norms-per-layer-ish: every norm of the model is trainable.
    n_norms = sum(1 for n in names if "norm" in n)
    assert n_norms == 2 * 2 + 1
    assert model.config.rope_parameters["factor"] == 2.0
    assert model.config._attn_implementation == "longtune"


def test_plain_lora_and_full(tiny_llama_config):
    r = tiny_recipe(tiny_llama_config, lora={"trainable_embeddings": False, "trainable_norms": False,
                                             "target_modules": ["q_proj", "v_proj"]})
    names = trainable_names(build_model(r))
    assert names and all("lora_" in n for n in names)
    assert not any("k_proj" in n for n in names)
    full = build_model(tiny_recipe(tiny_llama_config, lora={"mode": "full"}))
    t, total = count_parameters(full)
    assert t == total > 0


def test_unknown_target_module_is_an_error(tiny_llama_config):
    with pytest.raises(RecipeError, match="lora.target_modules"):
        build_model(tiny_recipe(tiny_llama_config, lora={"target_modules": ["qkv_proj"]}))


def test_dry_run_estimate_matches_real_count(tiny_llama_config):
    r = tiny_recipe(tiny_llama_config)
    est = estimate(r, num_gpus=2, zero_stage=2)
    real_t, real_total = count_parameters(build_model(r))
    assert (est["trainable_params"], est["total_params"]) == (real_t, real_total)
    assert est["per_gpu_gib"]["total"] > 0


def test_qlora_quantizes_base_and_trains_lora_plus(tiny_llama_config, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the quant extra (pip install 'longtune[quant]')")
    import torch
    from transformers import AutoModelForCausalLM

    cfg = dict(tiny_llama_config, hidden_size=64, intermediate_size=128)
    AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).save_pretrained(tmp_path)
    r = validate({"model": {"name_or_path": str(tmp_path), "tokenizer": "byte"},
                  "rope": {"type": "linear", "target_length": 256}, "attention": {"pattern": "sf_attn"},
                  "lora": {"mode": "qlora"}, "deepspeed": {"config": None},
                  "training": {"gradient_checkpointing": False}})
    model = build_model(r)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj.base_layer")}
    assert kinds == {"Linear4bit"}
    names = trainable_names(model)
    assert all("lora_" in n or ".modules_to_save." in n for n in names)
    x = torch.randint(0, 250, (2, 32))
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_dry_run_cli_prints_estimate(capsys):
    from finetune.launch import main
    from finetune.recipe import RECIPES_DIR

    assert main([str(RECIPES_DIR / "tiny.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "memory estimate" in out and "GiB" in out
    assert "run_dir: runs/tiny" in out


@pytest.mark.parametrize(
    "change,key",
    [({"vocab_size": 200}, "model.config.vocab_size"), ({"bos_token_id": 1}, "model.config.bos_token_id"),
     ({"pad_token_id": None}, "model.config.pad_token_id")],
)  # fmt: skip
def test_a_config_model_must_agree_with_its_tokenizer(tmp_path, tiny_config, change, key):
    from data_prep.assets import byte_tokenizer
    from finetune.launch import preflight
    from finetune.model import check_tokenizer, load_base_config
    from finetune.recipe import RecipeError, validate

    good = validate({"run_dir": str(tmp_path), "model": {"config": tiny_config(), "tokenizer": "byte"}})
    check_tokenizer(good, load_base_config(good), byte_tokenizer())
    bad = validate({"run_dir": str(tmp_path), "model": {"config": tiny_config(**change), "tokenizer": "byte"}})
    with pytest.raises(RecipeError, match=key):
        check_tokenizer(bad, load_base_config(bad), byte_tokenizer())
    with pytest.raises(RecipeError, match=key):  # before any process is spawned
        preflight(bad, None)

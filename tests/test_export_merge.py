"""Export of a LoRA run: merged logits, config carried over, atomicity, --force, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.export import ExportError, export_run, main

# fp32 export: merging W + s*B@A changes only the summation order.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def sf_export(sf_run, tmp_path_factory):
    return export_run(sf_run, tmp_path_factory.mktemp("out") / "export", dtype="float32")


def test_merged_logits_equal_unmerged_peft(sf_run, sf_export, peft_logits, prompt_ids):
    from transformers import AutoModelForCausalLM

    ref = peft_logits(sf_run, prompt_ids)
    merged = AutoModelForCausalLM.from_pretrained(str(sf_export), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=prompt_ids).logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    # Merging mattered: the bare base gives different logits.
    base = AutoModelForCausalLM.from_pretrained(str(sf_run / "final" / "base"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(input_ids=prompt_ids).logits - ref).abs().max() > 1e-2


def test_export_contents_config_and_layout(sf_export):
    names = {p.name for p in sf_export.iterdir()}
    assert {"config.json", "generation_config.json", "kv_cache_config.json", "README.md",
            "model.safetensors.index.json", "tokenizer.json"} <= names  # fmt: skip
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded (max_shard_size)
    assert not [p for p in sf_export.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    assert not [p for p in sf_export.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    cfg = json.loads((sf_export / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg  # plain Llama, loadable anywhere
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 2.0
    assert cfg["max_position_embeddings"] == 256
    assert {l["pattern"] for l in cfg["longtune_attention"]["layers"]} == {"causal"}  # sf_attn -> causal
    assert cfg["use_cache"] is True
    gen = json.loads((sf_export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 257 and gen["bos_token_id"] == 256
    info = json.loads((sf_export / "longtune_export.json").read_text())
    assert {l["pattern"] for l in info["train_layout"]["layers"]} == {"sf_attn"}


def test_reloaded_export_keeps_rope_and_layout(sf_export):
    from transformers import AutoConfig

    import finetune

    cfg = AutoConfig.from_pretrained(str(sf_export))
    assert cfg.rope_parameters["factor"] == 2.0 and cfg.rope_parameters["rope_type"] == "linear"
    model = finetune.load_model(sf_export)
    assert model.config._attn_implementation == "longtune"
    assert [l["pattern"] for l in model.config.longtune_attention["layers"]] == ["causal", "causal"]
    assert model.config.rope_parameters["factor"] == 2.0
    assert model.longtune_kv_cache["method"] == "sink" and model.longtune_kv_cache["window"] == 8


def test_dtype_bf16(sf_run, tmp_path):
    out = export_run(sf_run, tmp_path / "bf16", dtype="bfloat16")
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_force_and_atomicity(sf_run, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / "longtune_export.json").write_text("{}")  # an earlier export: ours to replace with --force
    with pytest.raises(ExportError, match="--force"):
        export_run(sf_run, out)
    assert main([str(sf_run), "--output", str(out)]) == 2  # CLI: clear error, exit 2

    # A failure in the middle (card writing) leaves the old export as it was and no temp dir.
    from finetune.export import card

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card, "write_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(sf_run, out, force=True)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    monkeypatch.undo()

    # Same for a fresh target: nothing at all is left behind.
    monkeypatch.setattr(card, "write_card", boom)
    with pytest.raises(RuntimeError):
        export_run(sf_run, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    monkeypatch.undo()

    assert main([str(sf_run), "--output", str(out), "--force", "--dtype", "float32"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_zero3_empty_weights_refused_real_weights_pass(sf_run, tmp_path):
    run = _copy_run(sf_run, tmp_path / "run")
    f = run / "final" / "adapter_model.safetensors"
    real = load_file(str(f))
    # What ZeRO-3 writes without stage3_gather_16bit_weights_on_model_save: shape-[0] placeholders.
    save_file({k: torch.empty(0) for k in real}, str(f))
    with pytest.raises(ExportError, match="empty .*ZeRO-3") as e:
        export_run(run, tmp_path / "out")
    assert "stage3_gather_16bit_weights_on_model_save" in str(e.value) and "--checkpoint" in str(e.value)
    assert not (tmp_path / "out").exists()
    save_file(real, str(f))
    assert export_run(run, tmp_path / "out", dtype="float32").is_dir()


def test_checkpoint_from_deepspeed_zero3_state(sf_run, tmp_path, monkeypatch):
    """--checkpoint: newest checkpoint-N; empty adapter file -> zero_to_fp32 consolidation."""
    from finetune.export import merge

    run = _copy_run(sf_run, tmp_path / "run")
    real = load_file(str(run / "final" / "adapter_model.safetensors"))
    for step in (3, 12):
        ck = run / f"checkpoint-{step}"
        ck.mkdir()
        shutil.copy(run / "final" / "adapter_config.json", ck)
        save_file({k: torch.empty(0) for k in real}, str(ck / "adapter_model.safetensors"))
        (ck / "latest").write_text(f"global_step{step}")
        (ck / f"global_step{step}").mkdir()
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))  # complete
    seen = []

    def fake_zero(path, tag=None, exclude_frozen_parameters=False, lazy_mode=False):
        seen.append(Path(path).name)
        # DeepSpeed names: the trainer's model parameter names (peft adapter "default").
        out = {}
        for k, v in real.items():
            if ".lora_" in k:
                k = k.replace(".weight", ".default.weight")
            else:  # modules_to_save: base_model.model.X.weight -> X.modules_to_save.default.weight
                mod, _, leaf = k.rpartition(".")
                k = f"{mod}.modules_to_save.default.{leaf}"
            out[k] = v.clone()
        return out

    import deepspeed.utils.zero_to_fp32 as z

    monkeypatch.setattr(z, "get_fp32_state_dict_from_zero_checkpoint", fake_zero)
    out = export_run(run, tmp_path / "ck", dtype="float32", checkpoint=True)
    assert seen == ["checkpoint-12"]
    ref = export_run(run, tmp_path / "fin", dtype="float32")
    a = {}
    b = {}
    for f in out.glob("*.safetensors"):
        a.update(load_file(str(f)))
    for f in ref.glob("*.safetensors"):
        b.update(load_file(str(f)))
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=0, rtol=0)
    with pytest.raises(ExportError, match="no complete checkpoint-N"):
        merge.newest_checkpoint(tmp_path)


def test_mismatched_base_refused(sf_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    run = _copy_run(sf_run, tmp_path / "run")
    base_dir = run / "final" / "base"
    shutil.rmtree(base_dir)
    cfg = LlamaConfig(
        **{**json.loads((sf_run / "final" / "base" / "config.json").read_text()), "hidden_size": 64}
    )
    LlamaForCausalLM(cfg).save_pretrained(str(base_dir))
    with pytest.raises(ExportError) as e:
        export_run(run, tmp_path / "out")
    msg = str(e.value)
    assert "hidden_size" in msg and str(base_dir) in msg and "longtune_model.json" in msg
    assert not (tmp_path / "out").exists()


def test_adapter_shape_mismatch_refused(sf_run, tmp_path):
    run = _copy_run(sf_run, tmp_path / "run")
    f = run / "final" / "adapter_model.safetensors"
    t = load_file(str(f))
    k = next(k for k in t if "q_proj.lora_A" in k)
    t[k] = torch.randn(t[k].shape[0], 48)  # trained on a wider base
    save_file(t, str(f))
    with pytest.raises(ExportError, match=r"adapter .* does not match the base model .*q_proj"):
        export_run(run, tmp_path / "out")


def test_pickled_adapter_refused(sf_run, tmp_path):
    run = _copy_run(sf_run, tmp_path / "run")
    f = run / "final" / "adapter_model.safetensors"
    torch.save(load_file(str(f)), str(run / "final" / "adapter_model.bin"))
    f.unlink()
    with pytest.raises(ExportError, match="pickle"):
        export_run(run, tmp_path / "out")


def test_full_finetune_run_exports_its_weights(tmp_path, recipe_dict, prompt_ids):
    """lora.mode full: final/ holds config.json + model.safetensors; nothing to merge."""
    from types import SimpleNamespace

    import yaml
    from transformers import AutoModelForCausalLM

    from data_prep.assets import load_tokenizer
    from finetune.model import build_config, build_model
    from finetune.recipe import validate
    from finetune.train import save_final, write_resolved

    d = recipe_dict(tmp_path / "full", "sf_attn")
    d["lora"] = {"mode": "full"}
    recipe = validate(d)
    recipe.training.gradient_checkpointing = False
    model = build_model(recipe)
    trainer = SimpleNamespace(
        args=SimpleNamespace(should_save=True), save_model=lambda p: model.save_pretrained(p)
    )
    write_resolved(recipe)
    save_final(trainer, model, recipe, load_tokenizer("byte"), build_config(recipe))
    assert yaml.safe_load((tmp_path / "full" / "recipe.yaml").read_text())["lora"]["mode"] == "full"
    out = export_run(tmp_path / "full", dtype="float32")
    assert out == tmp_path / "full" / "export"
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "final"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=prompt_ids).logits, ref(input_ids=prompt_ids).logits, atol=0, rtol=0
        )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["factor"] == 2.0
    assert {l["pattern"] for l in cfg["longtune_attention"]["layers"]} == {"causal"}
    assert all(f.stat().st_mode & 0o044 for f in out.glob("*.safetensors"))  # not left 0600


def test_checkpoint_of_unfinished_run_with_path_base(tmp_path, recipe_dict, prompt_ids, tiny_llama_config):
    """No final/ yet (stopped early): --checkpoint reads the record train wrote into it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from finetune.model import build_config, build_model
    from finetune.recipe import validate
    from finetune.rundir import write_json
    from finetune.train import model_meta_dict, write_resolved

    base_dir = tmp_path / "base-model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny_llama_config)).save_pretrained(str(base_dir))
    from data_prep.assets import load_tokenizer

    load_tokenizer("byte").save_pretrained(str(base_dir))
    d = recipe_dict(tmp_path / "run", "sf_attn")
    d["model"] = {"name_or_path": str(base_dir), "tokenizer": "byte"}
    recipe = validate(d)
    recipe.training.gradient_checkpointing = False
    model = build_model(recipe)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    write_resolved(recipe)
    ck = tmp_path / "run" / "checkpoint-5"
    model.save_pretrained(str(ck))
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    with pytest.raises(ExportError, match="has no longtune_model.json"):
        export_run(tmp_path / "run", tmp_path / "out", dtype="float32", checkpoint=True)
    # What CheckpointMeta writes into every checkpoint during training.
    write_json(ck / "longtune_model.json", model_meta_dict(recipe, build_config(recipe), 5))
    with pytest.raises(ExportError, match="no final/"):
        export_run(tmp_path / "run", tmp_path / "x")
    out = export_run(tmp_path / "run", tmp_path / "out", dtype="float32", checkpoint=True)
    info = json.loads((out / "longtune_export.json").read_text())
    assert info["source"].endswith("checkpoint-5") and info["base_model"] == str(base_dir)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["factor"] == 2.0 and cfg["max_position_embeddings"] == 256
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=prompt_ids).logits, model(input_ids=prompt_ids).logits, atol=ATOL, rtol=RTOL
        )

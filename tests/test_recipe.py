"""Recipe schema: validation errors people can act on, bases, overrides."""

from pathlib import Path

import pytest

from finetune.recipe import RECIPES_DIR, RecipeError, apply_overrides, load_recipe, validate

MIN = {"model": {"config": {"hidden_size": 32}}}


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_suggests_spelling():
    with pytest.raises(RecipeError) as e:
        validate({**MIN, "lora": {"rnak": 8}})
    msg = str(e.value)
    assert "lora.rnak: unknown key" in msg and "did you mean 'lora.rank'" not in msg
    with pytest.raises(RecipeError, match=r"did you mean 'training.learning_rate'"):
        validate({**MIN, "training": {"learning_rte": 1e-4}})
    with pytest.raises(RecipeError, match=r"did you mean 'attention'"):
        validate({**MIN, "atention": {}})


def test_wrong_type_names_key_and_type():
    with pytest.raises(RecipeError) as e:
        validate({**MIN, "training": {"max_steps": "many"}})
    assert "training.max_steps" in str(e.value) and "integer" in str(e.value)
    with pytest.raises(RecipeError, match="attention.pattern"):
        validate({**MIN, "attention": {"pattern": "s3_attn"}})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "bad.yaml", "model:\n  config: {hidden_size: 32}\ntraining:\n  max_steps: [1, 2\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert f"{p}:" in str(e.value) and "YAML syntax error" in str(e.value)
    line = int(str(e.value).split(f"{p}:")[1].split(":")[0])
    assert 4 <= line <= 5


def test_missing_file_and_model():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("/nonexistent/recipe.yaml")
    with pytest.raises(RecipeError, match="model"):
        validate({})


def test_base_and_overrides(tmp_path):
    write(tmp_path, "parent.yaml", "model:\n  config: {hidden_size: 32}\ntraining:\n  max_steps: 5\n  learning_rate: 0.1\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\ntraining:\n  max_steps: 7\n")
    r = load_recipe(child)
    assert r.training.max_steps == 7 and r.training.learning_rate == 0.1
    r = load_recipe(child, ["training.max_steps=9", "attention.pattern=sf_attn", "lora.target_modules=[q_proj]"])
    assert r.training.max_steps == 9 and r.attention.pattern == "sf_attn" and r.lora.target_modules == ["q_proj"]
    with pytest.raises(RecipeError, match="training.max_stepz: unknown key"):
        load_recipe(child, ["training.max_stepz=3"])
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides({}, ["nonsense"])


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


def test_rope_needs_target():
    with pytest.raises(RecipeError, match="target_length"):
        validate({**MIN, "rope": {"type": "linear"}})


def test_resolved_yaml_round_trips():
    r = load_recipe(RECIPES_DIR / "tiny.yaml")
    import yaml

    again = validate(yaml.safe_load(r.to_yaml()))
    assert again == r


@pytest.mark.parametrize(
    "path", sorted(p for p in RECIPES_DIR.rglob("*.yaml") if not p.name.startswith("_")), ids=lambda p: p.name
)
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.seq_length > 0


def test_cluster_recipes_use_longlora_hyperparameters():
    for name in ("llama2-7b-sfattn-32k.yaml", "llama3-8b-sfattn-64k.yaml", "llama2-7b-longgen-128k.yaml"):
        r = load_recipe(RECIPES_DIR / name)
        t = r.training
        assert (t.learning_rate, t.adam_beta1, t.adam_beta2, t.weight_decay) == (2e-5, 0.9, 0.95, 0.0)
        assert t.warmup_steps == 20 and t.lr_scheduler == "constant_with_warmup" and t.max_steps == 1000
        assert r.deepspeed.num_gpus * t.per_device_batch_size * t.gradient_accumulation_steps == 64
        assert (r.lora.r, r.lora.alpha) == (8, 16) and r.lora.trainable_embeddings and r.lora.trainable_norms


def test_recipe_reference_doc_is_current():
    from finetune.recipe_docs import DOC_PATH, render

    assert DOC_PATH.read_text() == render(), "docs/recipes.md is stale: run python -m finetune.recipe_docs"

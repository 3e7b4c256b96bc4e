"""The `longtune` CLI as a user meets it: overrides anywhere on the line, one-paragraph errors
with exit code 2 and no traceback (`--debug` shows one), tokens never printed, dry-runs of the
shipped Hub recipes offline. (issue 10 items 1, 7, 8)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.recipe import RECIPES_DIR

REPO = RECIPES_DIR.parent


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def one_paragraph_error(text: str) -> None:
    assert "Traceback" not in text, text
    assert text.startswith("error: "), text
    assert "\n\n" not in text.strip(), text


# --------------------------------------------------------------------------- 10.1 intermixed overrides
@pytest.mark.parametrize(
    "args",
    [
        ["recipes/tiny.yaml", "--dry-run", "training.max_steps=5"],
        ["recipes/tiny.yaml", "training.max_steps=5", "--dry-run"],
        ["recipes/tiny.yaml", "--dry-run", "--ngpus", "2", "training.max_steps=5", "lora.r=4"],
        ["recipes/tiny.yaml", "lora.r=4", "--ngpus", "2", "--dry-run", "training.max_steps=5"],
    ],
)
def test_train_overrides_before_or_after_flags(args, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["train", *args]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("# trainable parameters")[0])
    assert resolved["training"]["max_steps"] == 5
    if "lora.r=4" in args:
        assert resolved["lora"]["r"] == 4


# --------------------------------------------------------------------------- 10.7 offline Hub recipes
HUB_RECIPES = sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if "meta-llama/" in p.read_text())
#: Published total parameter counts (embeddings and head included) of the tabled bases.
PUBLISHED_PARAMS = {"meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Meta-Llama-3-8B": 8_030_261_248}


def test_every_hub_recipe_is_covered_by_the_architecture_table():
    from finetune import architectures
    from finetune.recipe import load_recipe

    assert len(HUB_RECIPES) >= 3
    for name in HUB_RECIPES:
        assert architectures.known(load_recipe(RECIPES_DIR / name).model.name_or_path), name


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_architecture_table_gives_the_published_parameter_count(name):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from finetune import architectures

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**architectures.config_kwargs(name)))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_dry_run_of_hub_recipes_works_offline_and_says_so(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    import finetune.model as fm

    def offline(*a, **k):  # what transformers raises without the Hub (HF_HUB_OFFLINE or no network)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(fm.AutoConfig, "from_pretrained", offline)
    assert main(["train", f"recipes/{name}", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "Hub is unreachable" in out.out and "architectures.py" in out.out
    assert "Hub is unreachable" in out.err  # also said where the config is read


def test_unknown_hub_model_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import finetune.model as fm

    monkeypatch.setattr(
        fm.AutoConfig, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))
    )
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"model": {"name_or_path": "someone/unknown-7b"}}))
    assert main(["train", str(p), "--dry-run"]) == 2
    err = capsys.readouterr().err
    one_paragraph_error(err)
    assert "someone/unknown-7b" in err and "model.name_or_path" in err


# --------------------------------------------------------------------------- 10.7 errors, no tracebacks
def test_non_utf8_recipe_names_file_line_and_offset(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"name: x\nrun_dir: r\xe9sum\n")
    assert main(["train", str(p), "--dry-run"]) == 2
    err = capsys.readouterr().err
    one_paragraph_error(err)
    assert f"{p}:2:" in err and "offset 18" in err and "0xe9" in err


def test_max_steps_true_is_rejected_naming_the_key(capsys):
    assert main(["train", str(RECIPES_DIR / "tiny.yaml"), "--dry-run", "training.max_steps=true"]) == 2
    err = capsys.readouterr().err
    assert "training.max_steps" in err and "boolean" in err and "Traceback" not in err


def test_binary_text_source_is_rejected_naming_the_file(tmp_path, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "ok.txt").write_text("some words " * 50)
    (src / "zeros.txt").write_bytes(b"\0" * 4096)
    r = {"model": {"config": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                              "intermediate_size": 8, "vocab_size": 259}, "tokenizer": "byte"},
         "run_dir": str(tmp_path / "run"),
         "data": {"sources": [{"type": "text", "path": str(src)}], "seq_length": 32}}  # fmt: skip
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    assert main(["prepare", str(p)]) == 2
    err = capsys.readouterr().err
    assert "zeros.txt" in err and "NUL" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "data").exists()


def test_invalid_repo_id_is_refused_in_dry_run_and_recipe(tmp_path, capsys):
    assert main(["push", str(tmp_path), "--repo", "user/na me", "--dry-run"]) == 2
    err = capsys.readouterr().err
    one_paragraph_error(err)
    assert "'user/na me'" in err and "repo id" in err
    assert main(["train", str(RECIPES_DIR / "tiny.yaml"), "--dry-run", "export.hub_repo=user/na me"]) == 2
    assert "export.hub_repo" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_run):
    from finetune.export import export_run

    run = make_run(tmp_path_factory.mktemp("cli"), "sf_attn")
    export_run(run, dtype="float32")
    return run


def test_output_under_a_file_is_an_error(exported, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", str(exported), "--output", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    one_paragraph_error(err)
    assert "is a file" in err


def test_push_without_token_is_an_error(exported, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(exported), "--repo", "me/x"]) == 2
    err = capsys.readouterr().err
    one_paragraph_error(err)
    assert "HF_TOKEN" in err


def test_push_without_network_is_one_paragraph_and_hides_the_token(exported):
    secret = "hf_NotARealTokenButSecret123"
    p = cli("push", str(exported), "--repo", "me/x",
            env={"HF_TOKEN": secret, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
                 "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})  # fmt: skip
    assert p.returncode == 2, p.stderr
    one_paragraph_error(p.stderr)
    assert "could not upload to me/x" in p.stderr
    assert secret not in p.stdout + p.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"run_dir: \xff\n")
    plain = cli("train", str(p), "--dry-run")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    dbg = cli("--debug", "train", str(p), "--dry-run")
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr and "RecipeError" in dbg.stderr


def test_unexpected_exception_is_one_paragraph(monkeypatch, capsys):
    from finetune import launch

    def boom(argv):
        raise KeyError("something internal")

    monkeypatch.setattr(launch, "main", boom)
    assert main(["train", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: KeyError:") and "Traceback" not in err and "--debug" in err


def test_readme_cluster_commands_exist_as_recipes():
    text = (REPO / "README.md").read_text()
    for ref in {w for w in text.split() if w.startswith("RECIPE=")}:
        assert (REPO / ref.split("=", 1)[1]).is_file(), ref
    assert Path(REPO / "Makefile").is_file()

"""Model card (Hub metadata, eval refresh) and Hub push (mocked HfApi, dry run)."""

from __future__ import annotations

import io
import json

import pytest
import yaml

from finetune.export import card, export_run
from finetune.export import push as push_mod


@pytest.fixture(scope="module")
def exp(sf_run, tmp_path_factory):
    return export_run(sf_run, tmp_path_factory.mktemp("cp") / "export", dtype="float32")


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_metadata_and_body(exp):
    text = (exp / "README.md").read_text()
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["someone/long-docs"]
    assert {"long-context", "longtune", "sf-attn", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # inline random-init base: no Hub id to point at
    assert "**256** tokens" in text  # context length
    assert "RoPE scaling: `linear`, factor 2.0 (original length 128 -> 256)" in text
    assert "layers 0-1: `causal`" in text  # inference layout
    assert "layers 0-1: `sf_attn` (group_ratio=0.25, shift_fraction=0.5" in text  # training pattern + params
    assert "**sink**" in text and "| window | `8` |" in text
    assert "## Evaluation" not in text


def test_card_hub_base_model(exp, tmp_path):
    import shutil

    d = tmp_path / "e"
    shutil.copytree(exp, d)
    info = json.loads((d / card.INFO_FILE).read_text())
    info["base_model"] = "meta-llama/Llama-2-7b-hf"
    (d / card.INFO_FILE).write_text(json.dumps(info))
    assert front_matter(card.render(d))["base_model"] == "meta-llama/Llama-2-7b-hf"


def test_refresh_card_with_eval_results(exp, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exp, run / "export")
    assert card.refresh_card(run) is not None
    assert "## Evaluation" not in (run / "export" / "README.md").read_text()
    (run / "eval").mkdir()
    results = {
        "created": "2026-01-01 00:00 UTC", "environment": {"device": "CPU"},
        "models": {"tuned": {"source": "export", "max_position_embeddings": 256, "kv_cache": "full"}},
        "model_notes": ["a note from eval"],
        "suites": {"passkey": {"results": {"tuned": {"256": {"accuracy": 0.75, "trials": [
            {"correct": True}, {"correct": True}, {"correct": True}, {"correct": False}]}}}}},
        "skipped": {"needle": "why not"},
    }  # fmt: skip
    (run / "eval" / "results.json").write_text(json.dumps(results))
    (run / "eval" / "summary.md").write_text("# Stale summary\n")  # the card uses eval's card section
    card.refresh_card(run)  # an eval/ without its card section: the card says to rerun eval
    assert "rerun `longtune eval`" in (run / "export" / "README.md").read_text()
    from finetune.eval.output import card_section
    from finetune.eval.suites import SUITES

    (run / "eval" / card.CARD_SECTION).write_text(card_section(results, SUITES))  # what eval writes
    card.refresh_card(run)
    text = (run / "export" / "README.md").read_text()
    assert "## Evaluation" in text and "### Passkey retrieval" in text and "0.75 (3/4)" in text
    assert "a note from eval" in text and "needle skipped: why not" in text and "Stale summary" not in text
    front_matter(text)  # still valid metadata
    assert card.refresh_card(tmp_path / "no-run") is None


def test_dry_run_lists_files_and_sizes(exp, sf_run):
    buf = io.StringIO()
    files = push_mod.push(exp, "me/tiny", dry_run=True, out=buf)
    names = [n for n, _ in files]
    expected = sorted(
        p.relative_to(exp).as_posix() for p in exp.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert names == expected
    assert "custom_generate/generate.py" in names and "kv_cache_config.json" in names
    out = buf.getvalue()
    assert "me/tiny" in out and "private" in out
    for name, size in files:
        assert name in out
    assert dict(files)["config.json"] == (exp / "config.json").stat().st_size


def test_push_calls_hub_with_env_token(exp, monkeypatch, capsys):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None, **kw):
            seen["token"] = token

        def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kw):
            seen["create"] = {
                "repo_id": repo_id,
                "repo_type": repo_type,
                "private": private,
                "exist_ok": exist_ok,
            }
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type=None, allow_patterns=None, **kw):
            seen["upload"] = {
                "folder_path": folder_path,
                "repo_id": repo_id,
                "allow_patterns": allow_patterns,
            }

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert push_mod.main([str(exp.parent / "export"), "--repo", "me/tiny", "--public"]) == 0
    assert seen["token"] == "hf_secret_value"
    assert seen["create"] == {"repo_id": "me/tiny", "repo_type": "model", "private": False, "exist_ok": True}
    assert (
        seen["upload"]["folder_path"] == str(exp)
        and "model.safetensors.index.json" in seen["upload"]["allow_patterns"]
    )
    out = capsys.readouterr()
    assert "hf_secret_value" not in out.out + out.err


def test_push_refuses_bad_input(exp, tmp_path, capsys):
    import shutil

    with pytest.raises(push_mod.PushError, match="user/name"):
        push_mod.push(exp, "no-slash", dry_run=True)
    with pytest.raises(push_mod.PushError, match="longtune export"):
        push_mod.push(tmp_path, "me/x", dry_run=True)
    d = tmp_path / "e"
    shutil.copytree(exp, d)
    (d / "extra.bin").write_bytes(b"\x80pickle")
    with pytest.raises(push_mod.PushError, match="pickle"):
        push_mod.push(d, "me/x", dry_run=True)
    (d / "extra.bin").unlink()
    (d / "README.md").unlink()
    assert push_mod.main([str(d), "--repo", "me/x", "--dry-run"]) == 2
    assert "README.md" in capsys.readouterr().err


def test_push_run_dir_finds_the_recipes_export_output_dir(exp, sf_run, tmp_path, capsys):
    # `longtune export RUN` writes to the recipe's export.output_dir: `longtune push RUN` must find it there
    run = tmp_path / "run"
    run.mkdir()
    raw = yaml.safe_load((sf_run / "recipe.yaml").read_text())
    raw.setdefault("export", {})["output_dir"] = str(exp)
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert push_mod.resolve_export_dir(run) == (exp, run)
    assert push_mod.main([str(run), "--repo", "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert str(exp) in out and "kv_cache_config.json" in out
    (run / "recipe.yaml").write_text(
        yaml.safe_dump({**raw, "export": {**raw["export"], "output_dir": str(tmp_path / "none")}})
    )
    with pytest.raises(push_mod.PushError, match="longtune export"):
        push_mod.resolve_export_dir(run)

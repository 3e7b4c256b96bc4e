"""The run directory's owner (finetune/rundir.py) and the stages that go through it:
export never deletes what it did not write, stale exports are refused, push reads its own
directory, checkpoints are listed complete vs incomplete, train_loss of a resumed run.
(issue 10 items 2, 3, 5, 6, 8, 12; issue 11 items 3, 4)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import rundir
from finetune.export import ExportError, export_run
from finetune.export import push as push_mod

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_run):
    return make_run(tmp_path_factory.mktemp("rd"), "sf_attn")


@pytest.fixture
def run_copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


# --------------------------------------------------------------------------- atomic writes
def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), rundir.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").is_file()
    with rundir.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert out.stat().st_mode & 0o055  # not left 0700 by mkdtemp
    rundir.atomic_write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").read_text() == "x" and len(list(tmp_path.iterdir())) == 2


def test_clean_leftovers_removes_only_hidden_temp_of_that_name(tmp_path):
    for name in (".export.tmp-1234", ".export.old-ab12", ".other.tmp-1", "export-keep"):
        (tmp_path / name).mkdir()
    gone = rundir.clean_leftovers(tmp_path / "export")
    assert sorted(p.name for p in gone) == [".export.old-ab12", ".export.tmp-1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "export-keep"]


# --------------------------------------------------------------------------- checkpoints
def _ckpt(run_dir: Path, step: int, complete: bool) -> Path:
    ck = run_dir / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    if complete:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


def test_resume_point_skips_incomplete_newest(tmp_path):
    _ckpt(tmp_path, 4, True)
    _ckpt(tmp_path, 8, True)
    _ckpt(tmp_path, 12, False)  # killed before trainer_state.json
    (tmp_path / "checkpoint-x").mkdir()
    last, incomplete = rundir.resume_point(tmp_path)
    assert last.name == "checkpoint-8" and [p.name for p in incomplete] == ["checkpoint-12"]
    assert [p.name for p in rundir.checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text("{trunc")  # a torn write
    assert rundir.resume_point(tmp_path)[0].name == "checkpoint-4"
    from finetune.export.merge import newest_checkpoint

    assert newest_checkpoint(tmp_path).name == "checkpoint-4"


def test_run_train_loss_covers_steps_before_the_resume():
    from finetune.train import run_train_loss

    # 8 steps of losses 8..1; logged every 2 steps (each log the mean since the previous one).
    per_step = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    logs = [{"step": s, "loss": sum(per_step[s - 2 : s]) / 2} for s in (2, 4, 6, 8)]
    # Resumed at step 4: the Trainer's own training_loss is the mean of steps 5..8 only.
    session = sum(per_step[4:]) / 4
    assert run_train_loss(logs, 4, session, 8) == pytest.approx(sum(per_step) / 8)
    assert run_train_loss(logs, 0, 4.5, 8) == 4.5  # not resumed: the Trainer's number


# --------------------------------------------------------------------------- export output (10.2)
def test_export_never_deletes_what_it_did_not_write(run_copy, tmp_path):
    run = run_copy
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for out in (run, run / "final", run / "sub"):
        with pytest.raises(ExportError, match="run directory"):
            export_run(run, out, force=True)
    with pytest.raises(ExportError, match="contains the run directory"):
        export_run(run, tmp_path, force=True)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(ExportError, match="did not write"):
        export_run(run, user, force=True)
    assert (user / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_run(run, tmp_path / "file" / "sub")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    # Its own export is replaced with --force; an empty folder is fine; a killed export's
    # hidden temp folder is cleaned.
    (run / ".export.tmp-dead").mkdir()
    out = export_run(run, dtype="float32")
    assert out == run / "export" and (out / rundir.EXPORT_INFO).is_file()
    assert not (run / ".export.tmp-dead").exists()
    export_run(run, force=True, dtype="float32")
    (tmp_path / "empty").mkdir()
    assert (export_run(run, tmp_path / "empty", dtype="float32") / "config.json").is_file()


def test_export_overrides_before_or_after_flags(run_copy, tmp_path):
    from finetune.export import main

    assert main([str(run_copy), "export.dtype=bfloat16", "--output", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main([str(run_copy), "--output", str(tmp_path / "b"), "export.dtype=float16"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float16"
    assert main([str(run_copy), "lora.r=2", "--output", str(tmp_path / "c")]) == 2  # not an export key
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- staleness (10.5, 10.6)
def test_export_records_its_source_and_goes_stale_when_final_is_rewritten(run_copy, tmp_path, capsys):
    run = run_copy
    out = export_run(run, dtype="float32")
    info = json.loads((out / rundir.EXPORT_INFO).read_text())
    meta = json.loads((run / "final" / rundir.MODEL_META).read_text())
    assert info["source"] == "final" and info["source_kind"] == "final"
    assert info["source_id"] == meta["model_id"]
    assert rundir.export_staleness(out) is None and rundir.model_dir(run) == out
    assert push_mod.main([str(run), "--repo", "me/x", "--dry-run"]) == 0
    # Trained again (final/ rewritten with a new id): the export no longer is the model.
    meta["model_id"] = rundir.new_model_id()
    (run / "final" / rundir.MODEL_META).write_text(json.dumps(meta))
    assert "earlier" in rundir.export_staleness(out)
    capsys.readouterr()
    assert push_mod.main([str(run), "--repo", "me/x", "--dry-run"]) == 2
    assert "longtune export" in capsys.readouterr().err
    # Loading the run picks the current final/, not the stale export.
    assert rundir.model_dir(run) == run / "final"
    from finetune.eval.runner import EvalError, tuned_path

    with pytest.raises(EvalError, match="earlier"):
        tuned_path(run, rundir.saved_recipe(run))


def test_checkpoint_export_goes_stale_when_the_checkpoint_or_final_changes(run_copy):
    run = run_copy
    ck = _ckpt(run, 3, True)
    for f in (run / "final").iterdir():
        if f.is_file() and f.name != "trainer_state.json":
            shutil.copy(f, ck)
    out = export_run(run, dtype="float32", checkpoint=True)
    info = json.loads((out / rundir.EXPORT_INFO).read_text())
    assert (
        info["source"] == "checkpoint-3" and info["source_step"] == 3 and info["source_kind"] == "checkpoint"
    )
    assert rundir.export_staleness(out) is None
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 3, "rewritten": True}))
    assert "has changed" in rundir.export_staleness(out)
    export_run(run, dtype="float32", checkpoint=True, force=True)
    assert rundir.export_staleness(out) is None
    meta = json.loads((run / "final" / rundir.MODEL_META).read_text())
    meta["model_id"] = rundir.new_model_id()  # the run went on and wrote a new final/
    (run / "final" / rundir.MODEL_META).write_text(json.dumps(meta))
    assert "since finished" in rundir.export_staleness(out)


def test_push_reads_the_export_of_the_directory_it_is_given(run, tmp_path, capsys):
    a = Path(shutil.copytree(run, tmp_path / "A"))
    export_run(a, dtype="float32")
    b = Path(shutil.copytree(a, tmp_path / "B"))  # a copied run: recipe.yaml still names A
    (b / "export" / "marker.txt").write_text("B's own")
    assert push_mod.resolve_export_dir(b) == (b / "export", b)
    assert push_mod.main([str(b), "--repo", "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert str(b / "export") in out and "marker.txt" in out


def test_overwrite_clears_everything_derived(run_copy):
    from finetune.recipe import validate

    run = run_copy
    export_run(run, dtype="float32")
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text("{}")
    (run / "logs").mkdir()
    (run / "run.json").write_text(json.dumps({"status": "done", "global_step": 1}))
    _ckpt(run, 2, True)
    (run / "data").mkdir()  # prepared data is keyed by its own hash: kept
    raw = rundir.saved_recipe(run).model_dump(mode="json")
    raw["run_dir"] = str(run)  # recipe.yaml names the run it was copied from
    raw["lora"]["r"] = 2
    other = validate(raw)
    from finetune.recipe import RecipeError

    with pytest.raises(RecipeError, match="another recipe"):
        rundir.check_run_dir(other)
    gone = {p.name for p in rundir.check_run_dir(other, overwrite=True)}
    assert gone == {"checkpoint-2", "final", "export", "eval", "logs", "run.json"}
    assert sorted(p.name for p in run.iterdir()) == ["data", "recipe.yaml"]


def test_finished_run_and_base_fingerprint(run_copy, tmp_path):
    run = run_copy
    recipe = rundir.saved_recipe(run)
    recipe.run_dir = str(run)  # recipe.yaml names the run it was copied from
    assert rundir.already_finished(recipe) is None  # no run.json, no step in final/'s record
    meta = json.loads((run / "final" / rundir.MODEL_META).read_text())
    rundir.write_json(run / "final" / rundir.MODEL_META, {**meta, "global_step": recipe.training.max_steps})
    assert rundir.already_finished(recipe) == recipe.training.max_steps  # killed before run.json
    rundir.write_json(run / "final" / rundir.MODEL_META, meta)
    (run / "run.json").write_text(json.dumps({"status": "done", "global_step": recipe.training.max_steps}))
    assert rundir.already_finished(recipe) == recipe.training.max_steps
    assert "already finished" in rundir.finished_message(recipe, recipe.training.max_steps)
    longer = recipe.model_copy(deep=True)
    longer.training.max_steps += 10
    assert rundir.already_finished(longer) is None  # max_steps grew: train on
    # A run on a local base folder records the base's id: a retrained base is another run.
    from finetune.recipe import validate

    raw = recipe.model_dump(mode="json")
    raw["model"] = {"name_or_path": str(run / "final"), "tokenizer": "byte"}
    raw["run_dir"] = str(tmp_path / "ext")
    ext = validate(raw)
    fp = rundir.base_fingerprint(ext)
    assert fp == json.loads((run / "final" / rundir.MODEL_META).read_text())["model_id"]
    ck = _ckpt(tmp_path / "ext", 2, True)
    rundir.write_resolved(ext)
    rundir.write_json(ck / rundir.MODEL_META, {"base_fingerprint": fp})
    assert rundir.check_run_dir(ext) == []
    rundir.write_json(ck / rundir.MODEL_META, {"base_fingerprint": "another-base"})
    from finetune.recipe import RecipeError

    with pytest.raises(RecipeError, match="base folder was rewritten"):
        rundir.check_run_dir(ext)


# --------------------------------------------------------------------------- module structure (11.3, 11.4)
def test_launcher_and_trainer_do_not_import_each_other():
    code = "import sys, finetune.launch; assert 'finetune.train' not in sys.modules, 'launch imports train'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    import re

    for f, other in (("finetune/launch.py", "finetune.train"), ("finetune/train.py", "finetune.launch")):
        imports = re.findall(rf"(?:from {other} import|import {other}\b)", (REPO / f).read_text())
        assert not imports, f"{f} imports {other} (even inside a function)"


def test_model_meta_name_is_spelled_once():
    hits = []
    for f in sorted((REPO / "finetune").rglob("*.py")) + sorted((REPO / "data_prep").rglob("*.py")):
        rel = f.relative_to(REPO).as_posix()
        if rel.startswith("finetune/eval/"):
            continue  # owned by the eval stage (it reads the name through rundir in a later change)
        code = [ln for ln in f.read_text().splitlines() if not ln.lstrip().startswith(("#", '"', "`"))]
        if any('"longtune_model.json"' in ln or "'longtune_model.json'" in ln for ln in code):
            hits.append(rel)
    assert hits == ["finetune/rundir.py"], hits


def test_export_reads_the_runs_record_not_the_recipe():
    text = (REPO / "finetune" / "export" / "merge.py").read_text()
    assert "finetune.train" not in text and "build_config" not in text


# --------------------------------------------------------------------------- warnings (10.13)
def test_training_arguments_raise_no_future_warning(tmp_path, monkeypatch):
    import warnings

    from finetune.recipe import load_recipe
    from finetune.train import training_arguments

    recipe = load_recipe(
        REPO / "recipes" / "tiny.yaml", [f"run_dir={tmp_path / 'r'}", "deepspeed.config=null"]
    )
    # training_arguments sets it for the rank process; undone here so later launches don't inherit it
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "r" / "logs"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        args = training_arguments(recipe, has_eval=True)
    assert args.activation_checkpointing is False and args.seed == recipe.seed


def test_building_a_checkpointed_lora_model_raises_no_future_warning(tiny_llama_config):
    import warnings

    from finetune.model import build_model
    from finetune.recipe import validate

    recipe = validate({"model": {"config": tiny_llama_config}, "training": {"gradient_checkpointing": True},
                       "lora": {"r": 2}})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = build_model(recipe)
    assert model.base_model.model.model.gradient_checkpointing
    out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    out.loss.backward()

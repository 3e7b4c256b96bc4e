"""Real multi-process training: 2 DeepSpeed ranks on the CPU accelerator, ZeRO-2 and ZeRO-3.

Slow by nature (each launch ~20-40 s on 2 cores), so the runs are shared by module fixtures.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.deepspeed_config import cpu_comm_buffers, release_cpu_comm_buffers
from finetune.recipe import RecipeError, validate
from finetune.train import check_run_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

TEXT = (
    "the quick brown fox jumps over the lazy dog. "
    "a stitch in time saves nine. all that glitters is not gold. "
    "to be or not to be, that is the question. "
)


def corpus(tmp: Path) -> Path:
    d = tmp / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(6):
        (d / f"doc{i}.txt").write_text(TEXT * (8 + i))
    return d


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def recipe_file(tiny_config):
    """``recipe_file(tmp, run, stage, **training)``: a tiny 2-rank DeepSpeed recipe file."""
    return functools.partial(_recipe_file, tiny_config())


def _recipe_file(model_config: dict, tmp: Path, run: str, stage: int, **training) -> Path:
    r = {
        "name": f"ds-test-{run}",
        "run_dir": str(tmp / run),
        "model": {"config": model_config, "tokenizer": "byte"},
        "rope": {"type": "linear", "target_length": 256},
        "attention": {"pattern": "sf_attn", "group_ratio": 0.25, "num_sink_tokens": 4},
        "lora": {"r": 4, "alpha": 8},
        "data": {"sources": [{"type": "text", "path": str(corpus(tmp))}], "seq_length": 64,
                 "output_dir": str(tmp / f"data-{run}")},
        "training": {"learning_rate": 5e-3, "warmup_steps": 0, "max_steps": 8, "per_device_batch_size": 2,
                     "gradient_accumulation_steps": 1, "save_steps": 4, "save_total_limit": None,
                     "logging_steps": 1, "gradient_checkpointing": False, "report_to": ["tensorboard"],
                     **training},
        "deepspeed": {"config": f"recipes/deepspeed/zero{stage}.json", "master_port": free_port()},
    }
    validate(r)
    p = tmp / f"{run}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def launch(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "finetune.cli", "train", str(recipe), *args]
    p = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and "address already in use" in (p.stdout + p.stderr).lower():
        # The free port picked for the rendezvous was taken in between: pick another, once.
        r = yaml.safe_load(recipe.read_text())
        r["deepspeed"]["master_port"] = free_port()
        recipe.write_text(yaml.safe_dump(r))
        p = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    port = yaml.safe_load(recipe.read_text())["deepspeed"].get("master_port")
    if port is not None:  # DeepSpeed's CPU all-reduce segments in /dev/shm (RAM) are gone with the run
        assert not cpu_comm_buffers(port), f"leftover shared memory: {cpu_comm_buffers(port)}"
    return p


def losses(run_dir: Path) -> list[float]:
    hist = json.loads((run_dir / "run.json").read_text())["log_history"]
    return [h["loss"] for h in hist if "loss" in h]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, recipe_file):
    tmp = tmp_path_factory.mktemp("z2")
    launch(recipe_file(tmp, "full", 2))
    return tmp


def test_zero2_two_ranks_loss_falls_and_kernel_ran(zero2_run):
    run = zero2_run / "full"
    ls = losses(run)
    assert len(ls) >= 8
    assert sum(ls[-3:]) / 3 < ls[0] * 0.9, ls
    final = run / "final"
    meta = json.loads((final / "longtune_model.json").read_text())
    assert meta["base_model"] == "base" and (final / "base" / "config.json").is_file()
    assert meta["model_config"]["rope_parameters"]["factor"] == 2.0
    assert {l["pattern"] for l in meta["model_config"]["longtune_attention"]["layers"]} == {"sf_attn"}
    assert (run / "recipe.yaml").is_file() and list((run / "logs").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_resume_matches_uninterrupted(zero2_run, tmp_path, recipe_file):
    # Stopped after its first checkpoint (max_steps=4), then restarted with the full length.
    first = recipe_file(zero2_run, "resumed", 2, max_steps=4)
    launch(first)
    assert (zero2_run / "resumed" / "checkpoint-4").is_dir()
    # Then killed while saving a later checkpoint: its folder exists without trainer_state.json.
    run = zero2_run / "resumed"
    torn = run / "checkpoint-6"
    torn.mkdir()
    (torn / "adapter_config.json").write_text("{}")
    # Finished at 4 steps; max_steps grown to 8: not "already finished", it trains on.
    second = recipe_file(zero2_run, "resumed", 2, max_steps=8)
    out = launch(second)
    text = out.stdout + out.stderr
    assert "already finished" not in text
    assert f"skipping incomplete checkpoint {torn}" in text and f"resuming from {run / 'checkpoint-4'}" in text
    a, b = adapter(zero2_run / "full"), adapter(run)
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        # One optimizer step at lr 5e-3 moves weights by ~1e-3: 1e-5 separates "same run" from "resumed wrong".
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k}: max abs diff {diff}")
    # train_loss covers steps 1..8, not only the 4 after the resume (what the Trainer reports).
    ref = json.loads((zero2_run / "full" / "run.json").read_text())["train_loss"]
    got = json.loads((run / "run.json").read_text())["train_loss"]
    after_resume = sum(losses(run)[4:8]) / 4
    assert got == pytest.approx(ref, rel=1e-3) and abs(got - after_resume) > 0.01, (got, ref, after_resume)


def test_zero3_saves_real_gathered_weights(tmp_path, recipe_file):
    recipe = recipe_file(tmp_path, "z3", 3, max_steps=4)
    launch(recipe)
    run = tmp_path / "z3"
    sd = adapter(run)
    names = list(sd)
    assert any("embed_tokens" in n for n in names) and any("norm" in n for n in names)
    assert any("lora_B" in n for n in names)
    for n, t in sd.items():
        assert t.numel() > 0, f"{n} came out empty (ZeRO-3 partition not gathered)"
    # LoRA B starts at zero: trained, it must not be.
    assert any(t.abs().sum() > 0 for n, t in sd.items() if "lora_B" in n)
    base = load_file(str(run / "final" / "base" / "model.safetensors"))
    assert all(t.numel() > 0 for t in base.values())
    ls = losses(run)
    assert ls[-1] < ls[0]
    # The gathered adapter exports and the merged model runs.
    from finetune import load_model
    from finetune.export import export_run

    out = export_run(run)
    model = load_model(out)
    ids = torch.tensor([[256, 1, 2, 3, 4, 5]])
    assert torch.isfinite(model(ids).logits).all()


def test_rerun_of_a_finished_run_is_a_no_op(zero2_run):
    run = zero2_run / "full"
    files = [run / "final" / "longtune_model.json", run / "final" / "adapter_model.safetensors", run / "run.json"]
    before = [f.stat().st_mtime_ns for f in files]
    ckpts = sorted(p.name for p in run.glob("checkpoint-*"))
    out = launch(zero2_run / "full.yaml")
    assert "already finished at step 8" in out.stdout
    assert [f.stat().st_mtime_ns for f in files] == before
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ckpts


def test_run_dir_of_another_recipe_is_refused(zero2_run):
    other = yaml.safe_load((zero2_run / "full.yaml").read_text())
    other["lora"]["r"] = 16
    other_recipe = validate(other)
    with pytest.raises(RecipeError, match=r"another recipe \(differs in: lora.r\)"):
        check_run_dir(other_recipe)
    p = zero2_run / "other.yaml"
    p.write_text(yaml.safe_dump(other))
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "train", str(p)], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "overwrite" in proc.stderr
    # Same recipe, different training length: not another run, resumable.
    same = yaml.safe_load((zero2_run / "full.yaml").read_text())
    same["training"]["max_steps"] = 100
    check_run_dir(validate(same))
    (zero2_run / "full" / "export").mkdir()
    (zero2_run / "full" / "export" / "longtune_export.json").write_text("{}")
    (zero2_run / "full" / "eval").mkdir()
    check_run_dir(other_recipe, overwrite=True)
    assert not list((zero2_run / "full").glob("checkpoint-*"))
    for gone in ("final", "export", "eval", "run.json", "logs"):
        assert not (zero2_run / "full" / gone).exists(), gone


def test_release_cpu_comm_buffers_only_this_runs(monkeypatch, tmp_path):
    """Only the segments of this port (and rank, for a rank) go; another run's stay."""
    import finetune.deepspeed_config as dc

    monkeypatch.setattr(dc, "SHM_DIR", tmp_path)
    uid = os.getuid()
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_{rank}" for port in (29500, 29501) for rank in (0, 1)]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "1")
    assert [p.name for p in release_cpu_comm_buffers()] == [names[1]]
    assert [p.name for p in release_cpu_comm_buffers(port=29500, rank="*")] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == names[2:]

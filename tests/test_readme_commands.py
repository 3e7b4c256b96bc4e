"""Every `make` command in README.md, run verbatim (issue 10 item 1).

Each README line goes through `make -n` with this checkout's Makefile (VENV = the running
interpreter's environment; STAMP = an up-to-date file, so no install step is planned), and
the `python -m finetune.cli ...` lines make prints are run in a scratch folder, in order:
- `train` of a cluster recipe (a Hub model on 8 GPUs) runs as its `--dry-run` (offline: the
  architecture table stands in for the Hub);
- `train` of recipes/tiny.yaml trains for real (2 DeepSpeed CPU ranks, 2 steps), as the
  command line; the other commands go through `finetune.cli.main` with the same arguments
  in-process (the same code, without importing torch again for each);
- export / eval / push of runs/llama2-7b-sfattn-32k act on a copy of that tiny run placed
  there (a copied run directory, as a user would move one; its recipe.yaml still names
  runs/tiny), push with the README's own --dry-run.
Not run: `make demo` (12 minutes, the lead reruns it), `make ablation` (its sequel) and `make test`
(this suite).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
NOT_RUN = {"demo", "ablation", "test"}


def readme_make_lines() -> list[str]:
    lines, in_code = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code and line.startswith("make "):
            lines.append(line.split("  #", 1)[0].strip())
    return lines


def planned(line: str, stamp: Path) -> list[str]:
    """The commands `make` would run for `line` (dry run), with this environment."""
    args = shlex.split(line)[1:]
    venv = Path(sys.executable).parent.parent
    p = subprocess.run(["make", "-s", "-n", "-C", str(REPO), *args, f"VENV={venv}", f"STAMP={stamp}"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    cmds = [c for c in p.stdout.splitlines() if "-m finetune.cli" in c]
    assert cmds, f"{line}: make planned no longtune command:\n{p.stdout}"
    return cmds


def is_cluster_train(cmd: str) -> bool:
    words = shlex.split(cmd)
    return words[words.index("finetune.cli") + 1] == "train" and "recipes/tiny.yaml" not in words


def run_cmd(cmd: str, work: Path, env: dict, capfd) -> tuple[int, str, str]:
    """A real training launch runs as the command line; the rest through `finetune.cli.main`
    with the same arguments in-process (the same code path, without re-importing torch)."""
    words = shlex.split(cmd)
    argv = words[words.index("finetune.cli") + 1 :]
    if argv[0] == "train" and "--dry-run" not in argv:
        p = subprocess.run(
            cmd, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        return p.returncode, p.stdout, p.stderr
    from finetune.cli import main

    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc = main(argv)
    finally:
        os.chdir(cwd)
    out = capfd.readouterr()
    return rc, out.out, out.err


def test_readme_commands_run_verbatim(tmp_path, capfd):
    lines = readme_make_lines()
    targets = [shlex.split(x)[1] for x in lines]
    assert {"train", "dry-run", "export", "eval", "push"} <= set(targets) and NOT_RUN <= set(targets)
    stamp = tmp_path / "stamp"
    stamp.write_text("")
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for line in lines:
        if shlex.split(line)[1] in NOT_RUN:
            continue
        for cmd in planned(line, stamp):
            if is_cluster_train(cmd) and "--dry-run" not in cmd:
                cmd += " --dry-run"
            if "RUN=runs/llama2-7b-sfattn-32k" in line and not (work / "runs/llama2-7b-sfattn-32k").exists():
                shutil.copytree(work / "runs/tiny", work / "runs/llama2-7b-sfattn-32k")
            rc, out, err = run_cmd(cmd, work, env, capfd)
            assert rc == 0, f"{line}\n-> {cmd}\n{out[-3000:]}\n{err[-3000:]}"
            assert "Traceback" not in err, f"{line}\n{err[-3000:]}"
            words = shlex.split(line)
            if "training.max_steps=5" in line:
                assert "max_steps: 5" in out
            if "training.max_steps=500" in line:
                assert "max_steps: 500" in out and "8 ranks" in out
            if words[1] == "push":
                assert str(Path("runs/llama2-7b-sfattn-32k/export")) in out  # its own export
    tiny = work / "runs" / "tiny"
    assert (tiny / "final" / "longtune_model.json").is_file()
    import json

    assert json.loads((tiny / "run.json").read_text())["global_step"] == 2
    copied = work / "runs" / "llama2-7b-sfattn-32k"
    assert (copied / "export" / "longtune_export.json").is_file() and (copied / "eval").is_dir()
    assert not (tiny / "export").exists()  # the copy's export went to the copy

"""The recipe's DeepSpeed JSON: found, parsed and read in one place.

Shared by the launcher (how many ranks, which ZeRO stage for the dry-run estimate) and the
trainer (TrainingArguments), which must not import each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.recipe import RECIPES_DIR, Recipe, RecipeError

REPO_ROOT = RECIPES_DIR.parent


def find_file(ref: str, key: str) -> Path:
    for cand in (Path(ref), REPO_ROOT / ref, RECIPES_DIR / ref):
        if cand.is_file():
            return cand
    raise RecipeError(f"{key}: file '{ref}' not found (looked in ., {REPO_ROOT}, {RECIPES_DIR})")


def deepspeed_config(recipe: Recipe) -> dict | None:
    """The recipe's DeepSpeed JSON, parsed; None without DeepSpeed."""
    if not recipe.deepspeed.config:
        return None
    path = find_file(recipe.deepspeed.config, "deepspeed.config")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}:{e.lineno}: invalid DeepSpeed JSON: {e.msg}") from None


def zero_stage(recipe: Recipe) -> int | None:
    cfg = deepspeed_config(recipe)
    return None if cfg is None else int(cfg.get("zero_optimization", {}).get("stage", 0))


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def cpu_comm_buffers(port: int | str, rank: int | str = "*", addr: str = "*") -> list[Path]:
    """The shared-memory segments DeepSpeed's CPU collectives create per rank.

    Its shm all-reduce (`shm_initialize`, named after uid, MASTER_ADDR, MASTER_PORT and rank)
    never unlinks them: every CPU launch would leave 66 MB per rank in /dev/shm, which is RAM,
    until the box ran out of memory. Whoever knows the run ended removes them."""
    return sorted(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"))


def release_cpu_comm_buffers(port: int | str | None = None, rank: int | str | None = None) -> list[Path]:
    """Unlink this run's segments (by default this rank's, from the launcher's environment).

    Safe once every rank has mapped its peers' segments (after any collective): a mapping
    outlives the unlink."""
    port = port if port is not None else os.environ.get("MASTER_PORT")
    if port is None:
        return []
    rank = rank if rank is not None else os.environ.get("RANK", "*")
    gone = []
    for path in cpu_comm_buffers(port, rank):
        try:
            path.unlink()
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone

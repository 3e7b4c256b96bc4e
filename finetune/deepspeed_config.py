"""The recipe's DeepSpeed JSON: found, parsed and read in one place.

Shared by the launcher (how many ranks, which ZeRO stage for the dry-run estimate) and the
trainer (TrainingArguments), which must not import each other.
"""

from __future__ import annotations

import json
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

"""Attention pattern names, their groups and their parameter defaults, declared once.

Plain data without torch, so the recipe schema (finetune/recipe.py) can take its choices and
defaults from here without importing the kernels. kernels/masks.py turns a layer spec into a
mask predicate; kernels/layout.py, the caches, export and eval ask these groups which patterns
stay at inference. Definitions and figures: docs/algorithms.md section 1.
"""

from __future__ import annotations

#: Patterns used only while training (LongLoRA's S2-Attn, SinkLoRA's SF-Attn): the trained model
#: evaluates, generates and exports with full causal attention.
TRAINING_ONLY = ("s2_attn", "sf_attn")
#: Sparse patterns that stay at inference (LongGen's hybrid layers): their caches may evict.
PERSISTENT = ("sink_window", "block_sparse")
#: Patterns of a full (non-sparse) layer: the choices of the recipe's `attention.pattern`.
FULL = ("causal",) + TRAINING_ONLY
PATTERNS = FULL + PERSISTENT

#: Keys each pattern accepts, with their defaults. The recipe sections (AttentionSection,
#: SparseSection) take their defaults from here; a hand-written layout may omit any of them.
PATTERN_DEFAULTS: dict[str, dict] = {
    "causal": {},
    "s2_attn": {"group_ratio": 0.25, "shift_fraction": 0.5, "wrap": "none", "num_sink_tokens": 0},
    "sf_attn": {"group_ratio": 0.25, "shift_fraction": 0.5, "wrap": "none", "num_sink_tokens": 4},
    "sink_window": {"window": 2048, "num_sink_tokens": 4},
    # head_step None = max(1, stride // heads) (kernels.masks.head_step); 0 = same in every head.
    "block_sparse": {"block_size": 64, "local_blocks": 4, "stride": 8, "head_step": None},
}
#: Keys any layer may carry besides its pattern's own.
COMMON_KEYS = ("pattern", "backend", "cross_document")
#: `wrap` values of S2/SF-Attn: `none` (offset groups, causal-safe) or `roll` (LongLoRA's leak).
WRAPS = ("none", "roll")

"""LongGen hybrid cache: each layer keeps what its attention pattern can still reach.

The layout is read from `model.config.longtune_attention` (docs/design.md):
- full layers (`causal`; training-only `s2_attn`/`sf_attn`, which run causal at inference)
  keep every token;
- `sink_window` layers keep the `num_sink_tokens` first tokens plus a ring buffer of the last
  `window` tokens (`SinkWindowLayer`);
- `block_sparse` layers keep the local blocks any future query can still reach plus the
  strided key blocks (`BlockSparseLayer`).

Keys are cached after RoPE at their absolute positions; the attention function masks with
`kwargs["longtune_kv_positions"]`, so it computes exactly what it would compute on a full
cache with the same sparse pattern.

KV kept with F full layers of L, window W + sinks s, context T >= W + s:
F/L + (L-F)/L * (W+s)/T of the full cache (block_sparse layers: local_blocks * block_size
plus the strided blocks, see `BlockSparseLayer`).
"""

from __future__ import annotations

import torch

from .base import CompactLayer, FullLayer, PositionedCache
from .sink_window import SinkWindowLayer

FULL_PATTERNS = ("causal", "s2_attn", "sf_attn")
SPARSE_PATTERNS = ("sink_window", "block_sparse")


def strided_residues(stride: int, num_heads: int, head_step: int | None) -> set[int]:
    """Key-block residues kb % stride that some head keeps as a strided column:
    (kb + 1 + h * head_step) % stride == 0 for some h."""
    step = max(1, stride // num_heads) if head_step is None else head_step
    return {(-1 - h * step) % stride for h in range(num_heads)}


class BlockSparseLayer(CompactLayer):
    """Keeps key j (block kb = j // block_size) while some future query can see it:
    kb > qb_next - local_blocks (local), or kb is a strided column of *some* query head.
    Rows of a batch keep the union of their needs (they differ only under left padding).

    The strided columns differ per head; the cache keeps their union over heads (one set of
    positions for every KV head), so when the heads' columns cover every residue mod stride
    (e.g. head_step=1 with heads >= stride) the layer keeps everything — which is then exactly
    what the pattern can reach.
    """

    def __init__(self, block_size: int, local_blocks: int, stride: int, num_heads: int, head_step=None, **kw):
        super().__init__()
        self.block_size, self.local_blocks, self.stride = int(block_size), int(local_blocks), int(stride)
        self.residues = strided_residues(self.stride, num_heads, head_step)
        self.keeps_all = len(self.residues) == self.stride
        self._residue_mask = torch.zeros(self.stride, dtype=torch.bool)
        self._residue_mask[list(self.residues)] = True

    def update(self, key_states, value_states, positions, *args, **kwargs):
        keys, values, pos = super().update(key_states, value_states, positions)
        if self.keeps_all:
            return keys, values, pos
        # per row (positions differ under left padding): is the key reachable by a future query?
        # The kept slots are the union over rows, so storage stays rectangular.
        pos = self.positions
        kb = pos.clamp_min(0) // self.block_size
        next_qb = (pos.amax(dim=-1, keepdim=True) + 1) // self.block_size
        needed = (kb > next_qb - self.local_blocks) | self._residue_mask.to(kb.device)[kb % self.stride]
        keep = (needed & (pos >= 0)).any(dim=0)
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(-1)
            self.keys = self.keys.index_select(-2, idx)
            self.values = self.values.index_select(-2, idx)
            self.positions = self.positions.index_select(-1, idx)
        return keys, values, pos


def layer_for(entry: dict, num_heads: int):
    """Cache layer for one entry of `config.longtune_attention["layers"]`."""
    pattern = entry.get("pattern", "causal")
    if pattern in FULL_PATTERNS:
        return FullLayer()
    if pattern == "sink_window":
        return SinkWindowLayer(entry["window"], entry.get("num_sink_tokens", 0))
    if pattern == "block_sparse":
        return BlockSparseLayer(
            entry["block_size"], entry["local_blocks"], entry["stride"], num_heads, entry.get("head_step")
        )
    raise ValueError(
        f"longtune_attention: unknown pattern '{pattern}' (valid: {FULL_PATTERNS + SPARSE_PATTERNS})"
    )


def layout_of(config) -> dict | None:
    layout = getattr(config, "longtune_attention", None)
    if layout is None and isinstance(config, dict):
        layout = config.get("longtune_attention")
    return layout


def is_hybrid_layout(layout: dict | None) -> bool:
    return bool(layout) and any(e.get("pattern") in SPARSE_PATTERNS for e in layout.get("layers", []))


class HybridCache(PositionedCache):
    """`method: hybrid`: per-layer cache following the model's LongGen layout."""

    def __init__(self, config):
        layout = layout_of(config)
        if not is_hybrid_layout(layout):
            raise ValueError(
                "HybridCache needs a LongGen hybrid layout: config.longtune_attention with at least one "
                "sink_window or block_sparse layer (build one from the recipe's `hybrid` section)"
            )
        entries = layout["layers"]
        if len(entries) != config.num_hidden_layers:
            raise ValueError(
                f"config.longtune_attention has {len(entries)} layers, the model {config.num_hidden_layers}"
            )
        super().__init__([layer_for(e, config.num_attention_heads) for e in entries])
        self.patterns = [e.get("pattern", "causal") for e in entries]

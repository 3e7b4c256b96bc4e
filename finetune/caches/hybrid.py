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

from kernels.layout import is_hybrid
from kernels.masks import inference_spec, resolve_spec, still_visible
from kernels.patterns import FULL

from .base import CompactLayer, FullLayer, PositionedCache
from .sink_window import SinkWindowLayer


class BlockSparseLayer(CompactLayer):
    """Keeps key j while some future query can see it in some head (kernels.masks.still_visible
    on the layer's block_sparse spec): the local blocks of the next query plus the strided
    columns of all heads. Rows of a batch keep the union of their needs (they differ only
    under left padding).

    The strided columns differ per head; the cache keeps their union over heads (one set of
    positions for every KV head), so when the heads' columns cover every residue mod stride
    (e.g. head_step=1 with heads >= stride) the layer keeps everything — which is then exactly
    what the pattern can reach.
    """

    def __init__(self, block_size: int, local_blocks: int, stride: int, num_heads: int, head_step=None, **kw):
        super().__init__()
        self.spec = resolve_spec({"pattern": "block_sparse", "block_size": int(block_size), "head_step": head_step,
                                  "local_blocks": int(local_blocks), "stride": int(stride)})
        self.num_heads = int(num_heads)
        # Beyond the local blocks, whether a key block is visible repeats with period `stride`:
        # one period of key blocks seen from a query past its local blocks decides.
        period = torch.arange(self.spec["stride"] * self.spec["block_size"]).unsqueeze(0)
        past = (self.spec["stride"] + self.spec["local_blocks"]) * self.spec["block_size"]
        self.keeps_all = bool(still_visible(self.spec, period, self.num_heads, past).all())

    def update(self, key_states, value_states, positions, *args, **kwargs):
        keys, values, pos = super().update(key_states, value_states, positions)
        if self.keeps_all:
            return keys, values, pos
        # The kept slots are the union over rows, so storage stays rectangular.
        keep = still_visible(self.spec, self.positions, self.num_heads).any(dim=0)
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(-1)
            self.keys = self.keys.index_select(-2, idx)
            self.values = self.values.index_select(-2, idx)
            self.positions = self.positions.index_select(-1, idx)
        return keys, values, pos


def layer_for(entry: dict, num_heads: int, where: str = "config.longtune_attention.layers[]"):
    """Cache layer for one entry of `config.longtune_attention["layers"]` (defaults and errors
    naming `where`: kernels.masks.resolve_spec)."""
    spec = inference_spec(resolve_spec({"pattern": "causal", **entry}, where))
    if spec["pattern"] in FULL:
        return FullLayer()
    if spec["pattern"] == "sink_window":
        return SinkWindowLayer(spec["window"], spec["num_sink_tokens"])
    return BlockSparseLayer(spec["block_size"], spec["local_blocks"], spec["stride"], num_heads,
                            spec["head_step"])


def layout_of(config) -> dict | None:
    layout = getattr(config, "longtune_attention", None)
    if layout is None and isinstance(config, dict):
        layout = config.get("longtune_attention")
    return layout


class HybridCache(PositionedCache):
    """`method: hybrid`: per-layer cache following the model's LongGen layout."""

    def __init__(self, config):
        layout = layout_of(config)
        if not is_hybrid(layout):
            raise ValueError(
                "HybridCache needs a LongGen hybrid layout: config.longtune_attention with at least one "
                "sink_window or block_sparse layer (build one from the recipe's `hybrid` section)"
            )
        entries = layout["layers"]
        if len(entries) != config.num_hidden_layers:
            raise ValueError(
                f"config.longtune_attention has {len(entries)} layers, the model {config.num_hidden_layers}"
            )
        heads = config.num_attention_heads
        super().__init__([layer_for(e, heads, f"config.longtune_attention.layers[{i}]") for i, e in enumerate(entries)])
        self.patterns = [e.get("pattern", "causal") for e in entries]

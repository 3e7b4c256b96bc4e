"""What every longtune cache shares: keys carried with their absolute positions.

A longtune cache is a `transformers.Cache` whose layers remember, next to each cached key and
value, the absolute position of the token (`positions`, LongTensor (batch, n), or
(batch, kv_heads, n) when the choice differs per head as in H2O). In `update` the cache writes
those positions into the live kwargs dict that the attention module then unpacks into the
attention function (see docs/design.md, "How a cache talks to the attention function"):

- `kwargs["longtune_kv_positions"]`: (batch, k_len) absolute position of every returned key;
- `kwargs["longtune_kv_head_positions"]`: (batch, kv_heads, k_len), only for caches whose kept
  keys differ per KV head (H2O);
- `kwargs["longtune_attention_observer"]`: the cache, for layers that need the attention
  probabilities (H2O).

`get_seq_length()` is the number of tokens *seen* (so position ids stay right), not the number
kept; `nbytes()` is the bytes of K/V actually held.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

POSITIONS_KEY = "longtune_kv_positions"
HEAD_POSITIONS_KEY = "longtune_kv_head_positions"
OBSERVER_KEY = "longtune_attention_observer"


class FullLayer(CacheLayerMixin):
    """Keeps every token (a DynamicLayer that also tracks positions)."""

    is_sliding = False
    is_croppable = True
    #: tensors whose dim 0 is the batch (reordered by beam search, expanded by generate)
    batch_tensors = ("keys", "values", "positions")

    def __init__(self, **kwargs):
        super().__init__()
        self.positions: torch.Tensor | None = None
        self.seen = 0

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, positions, *args, **kwargs):
        """Append; return (keys, values, positions) the attention function sees."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, positions], dim=-1)
        self.seen += key_states.shape[-2]
        return self.keys, self.values, self.positions

    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # ------------------------------------------------------------------ Cache layer API
    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # keys returned by the next update: what is held + the new tokens; the held keys of a
        # compact layer are the *last* ones only approximately (sinks, strided columns), so
        # the longtune attention function masks from `longtune_kv_positions`, not from this.
        held = self.kept()
        return held + query_length, self.seen - held

    def reset(self) -> None:
        for name in self.batch_tensors:
            setattr(self, name, None)
        self.is_initialized = False
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number: the count of tokens to remove")
        n = abs(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        if self.kept() != self.seen:
            raise RuntimeError(f"{type(self).__name__} evicted tokens: it cannot be cropped back")
        self.keys = self.keys[..., :-n, :]
        self.values = self.values[..., :-n, :]
        self.positions = self.positions[..., :-n]
        self.seen -= n

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self.batch_tensors:
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices, ...])


class CompactLayer(FullLayer):
    """A layer that evicts: not croppable; `is_sliding` so transformers sizes its one mask
    against a full layer when the cache has one."""

    is_sliding = True
    is_croppable = False


class PositionedCache(Cache):
    """A Cache of FullLayer-like layers that annotates the attention kwargs with positions."""

    def __init__(self, layers: list[FullLayer]):
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx: int, *args, kwargs: dict | None = None, **extra):
        layer = self.layers[layer_idx]
        positions = new_positions(key_states, kwargs, layer.seen)
        keys, values, pos = layer.update(key_states, value_states, positions)
        if kwargs is not None:
            if pos.dim() == 3 and keys.shape[-2] == key_states.shape[-2]:
                pos = pos[:, 0]  # nothing held before this step: every head has the same keys
            if pos.dim() == 3:  # per-KV-head choice (H2O): slot-wise max is causally exact
                kwargs[HEAD_POSITIONS_KEY] = pos
                kwargs[POSITIONS_KEY] = pos.amax(dim=1)
            else:
                kwargs.pop(HEAD_POSITIONS_KEY, None)
                kwargs[POSITIONS_KEY] = pos
                if keys.shape[-2] == key_states.shape[-2] and _is_arange(pos):
                    # first prefill, nothing held, no padding: the keys are the queries at
                    # 0..q-1, exactly what the attention function assumes without positions;
                    # leaving them out lets it take its self-attention fast path
                    del kwargs[POSITIONS_KEY]
            if getattr(layer, "observes_attention", False):
                kwargs[OBSERVER_KEY] = self
            else:
                kwargs.pop(OBSERVER_KEY, None)
        return keys, values

    def nbytes(self) -> int:
        """Bytes of K/V held by every layer (positions and scores not counted)."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept_tokens(self) -> list[int]:
        """Tokens held per layer (per row and head)."""
        return [layer.kept() for layer in self.layers]


def _is_arange(pos: torch.Tensor) -> bool:
    return bool((pos == torch.arange(pos.shape[-1], device=pos.device)).all())


def new_positions(key_states: torch.Tensor, kwargs: dict | None, seen: int) -> torch.Tensor:
    """Absolute positions (batch, q) of the new keys: the model's position_ids when it passes
    them (Llama does, through kwargs), else seen .. seen + q - 1."""
    b, q = key_states.shape[0], key_states.shape[-2]
    pos = kwargs.get("position_ids") if kwargs else None
    if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == q:
        pos = pos.to(device=key_states.device, dtype=torch.long).expand(b, q)
        if q > 1 and seen == 0:
            # left padding: generate gives pads position 0 (cumsum(mask) - 1, pads filled with 0),
            # so a 0 followed by another 0 is a pad; -1 marks it as an empty slot (never attended)
            pad = torch.zeros_like(pos, dtype=torch.bool)
            pad[:, :-1] = (pos[:, :-1] == 0) & (pos[:, 1:] == 0)
            if bool(pad.any()):
                pos = pos.masked_fill(pad, -1)
        return pos
    return torch.arange(seen, seen + q, device=key_states.device).unsqueeze(0).expand(b, q)

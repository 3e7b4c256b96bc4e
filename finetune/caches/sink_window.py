"""StreamingLLM-style sink + window cache (the LongGen variant: no re-rotation).

Per layer: the first `num_sink_tokens` tokens (pinned slots) plus a ring buffer of the last
`window` tokens. Keys are cached *after* RoPE, at their absolute positions, and are never
re-rotated: the model sees the real distance to every kept key. (The original StreamingLLM
stores keys before RoPE and re-rotates them to contiguous positions inside the cache so a
model trained at 4K can stream past its context; that variant is not implemented.)

`update` returns sinks + window in position order followed by the new tokens, with their
positions in `kwargs["longtune_kv_positions"]`; the attention function decides what each
query may see (plain causal for `method: sink`, the layer's pattern for the LongGen hybrid).
"""

from __future__ import annotations

import torch

from .base import CompactLayer, FullLayer, PositionedCache


class SinkWindowLayer(CompactLayer):
    """Sinks + ring buffer of the last `window` tokens.

    Storage is position-ordered until the layer has seen more than sinks + window tokens;
    from then on it is `num_sink_tokens` pinned slots followed by `window` ring slots, the
    token with cache index i (i >= sinks) living in slot sinks + (i - sinks) % window.
    """

    def __init__(self, window: int, num_sink_tokens: int = 4, **kwargs):
        super().__init__()
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = int(window)
        self.num_sink_tokens = int(num_sink_tokens)
        self.ring = False  # storage is in ring layout

    @property
    def capacity(self) -> int:
        return self.num_sink_tokens + self.window

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        super().reset()
        self.ring = False

    def _ring_order(self) -> torch.Tensor:
        """Slot indices of the held tokens in position order (ring layout)."""
        s, w = self.num_sink_tokens, self.window
        oldest = self.seen - w  # cache index of the oldest window token
        ring = s + (torch.arange(w, device=self.device) + (oldest - s)) % w
        return torch.cat([torch.arange(s, device=self.device), ring])

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held keys, values, positions in position order."""
        if not self.ring:
            return self.keys, self.values, self.positions
        order = self._ring_order()
        return (
            self.keys.index_select(-2, order),
            self.values.index_select(-2, order),
            self.positions.index_select(-1, order),
        )

    def update(self, key_states, value_states, positions, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s, w = self.num_sink_tokens, self.window
        q = key_states.shape[-2]
        old_k, old_v, old_p = self.ordered()
        keys = torch.cat([old_k, key_states], dim=-2)
        values = torch.cat([old_v, value_states], dim=-2)
        pos = torch.cat([old_p, positions], dim=-1)
        start, self.seen = self.seen, self.seen + q

        if self.seen <= self.capacity:  # nothing to evict yet
            self.keys, self.values, self.positions = keys, values, pos
        elif self.ring and q < w:  # write the new tokens into their ring slots, in place
            slots = s + (torch.arange(start, self.seen, device=self.device) - s) % w
            self.keys.index_copy_(-2, slots, key_states)
            self.values.index_copy_(-2, slots, value_states)
            self.positions.index_copy_(-1, slots, positions.contiguous())
        else:  # (re)build the ring from the sinks and the last `window` tokens
            n = keys.shape[-2]
            idx = torch.arange(self.seen - w, self.seen, device=self.device)
            slots = s + (idx - s) % w
            tail = torch.arange(n - w, n, device=self.device)
            if self.ring:  # the sink slots were chosen already
                sink_idx = torch.arange(s, device=self.device).expand(keys.shape[0], s)
                sink_pos = pos[:, :s]
            else:
                sink_idx, sink_pos = self._first_real_tokens(pos, n - w)
            self.keys = self._build(keys, sink_idx, tail, slots)
            self.values = self._build(values, sink_idx, tail, slots)
            self.positions = torch.cat([sink_pos, pos.new_empty(pos.shape[0], w)], dim=-1)
            self.positions.index_copy_(-1, slots, pos.index_select(-1, tail))
            self.ring = True
        return keys, values, pos

    def _first_real_tokens(self, pos: torch.Tensor, tail_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the slots of the first `num_sink_tokens` real tokens (left padding has
        position -1) and their positions; -1 where a row has fewer, or where the token is in
        the window anyway (it must not be attended twice)."""
        s, n = self.num_sink_tokens, pos.shape[-1]
        ar = torch.arange(n, device=pos.device)
        real = pos >= 0
        order = torch.argsort(torch.where(real, ar, ar + n), dim=-1, stable=True)[:, :s]
        ok = real.gather(1, order) & (order < tail_start)
        return order, torch.where(ok, pos.gather(1, order), torch.full_like(order, -1))

    def _build(self, full, sink_idx, tail, slots) -> torch.Tensor:
        b, h, _, d = full.shape
        s = self.num_sink_tokens
        out = full.new_empty(b, h, self.capacity, d)
        out[..., :s, :] = full.gather(-2, sink_idx.view(b, 1, s, 1).expand(b, h, s, d))
        out.index_copy_(-2, slots, full.index_select(-2, tail))
        return out


class SinkWindowCache(PositionedCache):
    """`method: sink`: sink + window layers (the chosen `layers`), full layers elsewhere."""

    def __init__(self, num_layers: int, window: int, num_sink_tokens: int = 4, layers=None):
        chosen = set(range(num_layers)) if layers is None else set(layers)
        super().__init__(
            [
                SinkWindowLayer(window, num_sink_tokens) if i in chosen else FullLayer()
                for i in range(num_layers)
            ]
        )
        self.window, self.num_sink_tokens = window, num_sink_tokens

"""StreamingLLM-style sink + window cache, with absolute or in-cache positions.

Per layer: the first `num_sink_tokens` tokens (pinned slots) plus a ring buffer of the last
`window` tokens. Two ways to place the kept keys (`positions` in the KV-cache config):

- `absolute` (default, the LongGen variant): keys are cached *after* RoPE at their absolute
  positions and never re-rotated: the model sees the real distance to every kept key, as
  LongGen's sink_window layers do; positions past the trained length stay out of distribution.
- `cache` (StreamingLLM, Xiao et al. 2023): keys are cached *before* RoPE (the layer undoes
  the rotation the attention module applied) and, at every step, rotated to contiguous
  positions inside the cache: the kept keys of a row get 0, 1, ..., m-1 in position order and
  the new tokens m, m+1, ... So the distance between a query and any kept key is at most
  sinks + window, whatever the stream length. The queries are rotated by the model at their
  absolute position p; RoPE depends only on the difference, so the held keys are rotated to
  p0 - m + c (c: in-cache index, p0: the first new token's position) and the new keys keep
  theirs, which gives exactly the in-cache distances (the positions reported to the attention
  function are these shifted ones, so masks stay causal). Causal layers only.

`update` returns sinks + window followed by the new tokens, with their positions in
`kwargs["longtune_kv_positions"]`; the attention function decides what each query may see
(plain causal for `method: sink`, the layer's pattern for the LongGen hybrid) from those
positions. With absolute positions, once the ring is full a decode step returns the held slots
in ring order (no reordering copy); otherwise they come in position order.
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

    def __init__(self, window: int, num_sink_tokens: int = 4, rope=None, **kwargs):
        super().__init__()
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = int(window)
        self.num_sink_tokens = int(num_sink_tokens)
        self.ring = False  # storage is in ring layout
        #: the model's rotary embedding ((x, position_ids) -> (cos, sin)) for in-cache
        #: positions (`positions: cache`); None: absolute positions, keys stored after RoPE
        self.rope = rope

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
        stored = key_states if self.rope is None else self._rotate(key_states, positions, inverse=True)
        if self.rope is None and self.ring and q < w:
            # decode with absolute positions: the attention function masks from the positions,
            # so the held slots go out in ring order (no reordering gather per layer and step)
            keys = torch.cat([self.keys, stored], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            pos = torch.cat([self.positions, positions], dim=-1)
            start, self.seen = self.seen, self.seen + q
            slots = s + (torch.arange(start, self.seen, device=self.device) - s) % w
            self.keys.index_copy_(-2, slots, stored)
            self.values.index_copy_(-2, slots, value_states)
            self.positions.index_copy_(-1, slots, positions.contiguous())
            return keys, values, pos
        old_k, old_v, old_p = self.ordered()
        keys = torch.cat([old_k, stored], dim=-2)
        values = torch.cat([old_v, value_states], dim=-2)
        pos = torch.cat([old_p, positions], dim=-1)
        start, self.seen = self.seen, self.seen + q

        if self.seen <= self.capacity:  # nothing to evict yet
            self.keys, self.values, self.positions = keys, values, pos
        elif self.ring and q < w:  # write the new tokens into their ring slots, in place
            slots = s + (torch.arange(start, self.seen, device=self.device) - s) % w
            self.keys.index_copy_(-2, slots, stored)
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
        if self.rope is None:
            return keys, values, pos
        # in-cache positions: a row's held keys at p0 - m + 0..m-1, the new keys at their own
        real = old_p >= 0
        held = real.sum(dim=-1, keepdim=True)
        shifted = positions[:, :1] - held + torch.cumsum(real.long(), dim=-1) - 1
        held_pos = torch.where(real, shifted, torch.full_like(old_p, -1))
        held_k = self._rotate(old_k, held_pos)
        return torch.cat([held_k, key_states], dim=-2), values, torch.cat([held_pos, positions], dim=-1)

    def _rotate(self, k: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """RoPE of keys k (b, h, n, d) at positions pos (b, n) with the model's rotary embedding;
        `inverse` undoes it (divided by cos^2 + sin^2, the square of any attention scaling)."""
        from transformers.models.llama.modeling_llama import rotate_half

        if k.shape[-2] == 0:
            return k
        cos, sin = self.rope(k, pos.clamp_min(0))
        cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
        if inverse:
            return (k * cos - rotate_half(k) * sin) / (cos * cos + sin * sin)
        return k * cos + rotate_half(k) * sin

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

    def __init__(self, num_layers: int, window: int, num_sink_tokens: int = 4, layers=None, rope=None):
        """`rope`: the model's rotary embedding for StreamingLLM's in-cache positions (None:
        absolute positions)."""
        chosen = set(range(num_layers)) if layers is None else set(layers)
        super().__init__(
            [
                SinkWindowLayer(window, num_sink_tokens, rope=rope) if i in chosen else FullLayer()
                for i in range(num_layers)
            ]
        )
        self.window, self.num_sink_tokens = window, num_sink_tokens

"""H2O (Heavy-Hitter Oracle) cache.

Per layer, per KV head and per sequence: keep the `num_sink_tokens` first tokens, the `recent`
most recent tokens, and the `heavy` older tokens with the highest accumulated attention
score; evict the rest. Kept keys differ per KV head and per row, so a layer stores gathered
tensors (batch, kv_heads, kept, head_dim) with positions (batch, kv_heads, kept); every
(row, head) keeps the same count, so the tensors stay rectangular.

Scores come from the attention function (docs/design.md): `update` puts the cache in
`kwargs["longtune_attention_observer"]`; the attention function computes the probabilities
explicitly, in query chunks, and calls `observe_attention(layer_idx, probs)` with probs
(batch, heads, q_chunk, k_len) *in query order*. Once all queries of the step were observed,
the layer adds them to the scores and evicts down to its budget. Score of key j:
- `score_normalization: none`: sum over every query so far of its probability on j;
- `mean`: that sum divided by the number of queries that could see j (those at positions >= j),
  which removes the bias towards early tokens.
GQA: per-query-head scores are reduced over each KV group (`gqa_reduction`: mean or sum).
The attention function may instead report, for a whole step at once, the probabilities already
summed over the queries (`observe_attention_sums(layer_idx, sums, queries)`, sums
(batch, heads, k_len)): the "longtune_h2o" function (h2o_attention.py) does so for the prefill,
from the row log-sum-exp of its fused attention pass.
Budgets in tokens (`heavy`, `recent`) or ratios of the prompt length (`heavy_ratio`,
`recent_ratio`, resolved at the first update of each layer, per row from that row's real
prompt length: int(ratio * real_tokens)). Rows with smaller budgets than the batch's largest
fill their remaining slots with empty entries (position -1, never attended, evicted first), so
a left-padded row keeps what it keeps alone. Ties go to the older token (stable sort). Left
padding (position -1) is evicted first and a padded row's sinks are its first real tokens
(positions 0..num_sink_tokens-1).
"""

from __future__ import annotations

import torch

from .base import CompactLayer, FullLayer, PositionedCache


class H2OLayer(CompactLayer):
    observes_attention = True
    batch_tensors = ("keys", "values", "positions", "scores", "heavy_rows", "recent_rows")

    def __init__(
        self,
        num_kv_groups: int,
        heavy: int | None = None,
        recent: int | None = None,
        heavy_ratio: float | None = None,
        recent_ratio: float | None = None,
        num_sink_tokens: int = 4,
        score_normalization: str = "none",
        gqa_reduction: str = "mean",
        **kwargs,
    ):
        super().__init__()
        if heavy is None and heavy_ratio is None or recent is None and recent_ratio is None:
            raise ValueError("H2O needs heavy or heavy_ratio, and recent or recent_ratio")
        if score_normalization not in ("none", "mean"):
            raise ValueError(f"score_normalization must be none|mean, got {score_normalization!r}")
        if gqa_reduction not in ("mean", "sum"):
            raise ValueError(f"gqa_reduction must be mean|sum, got {gqa_reduction!r}")
        self.groups = int(num_kv_groups)
        self.heavy_tokens, self.recent_tokens = heavy, recent
        #: storage budget (the largest row's) once the prompt is seen; per-row budgets (batch,)
        self.heavy, self.recent = heavy, recent
        self.heavy_rows: torch.Tensor | None = None
        self.recent_rows: torch.Tensor | None = None
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio
        self.num_sink_tokens = int(num_sink_tokens)
        self.score_normalization, self.gqa_reduction = score_normalization, gqa_reduction
        self.scores: torch.Tensor | None = None  # (b, hkv, n) float32, summed probabilities
        self.pending = 0  # queries of the last update not yet observed
        self._acc: torch.Tensor | None = None  # this step's observed scores
        self._q_real: torch.Tensor | None = None  # (b, q) this step's queries that are not padding

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.positions = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self.scores = torch.zeros(b, h, 0, dtype=torch.float32, device=self.device)

    def reset(self):
        super().reset()
        self.pending, self._acc = 0, None
        self.heavy, self.recent = self.heavy_tokens, self.recent_tokens

    @property
    def budget(self) -> int | None:
        """Tokens kept per (row, KV head) after an eviction; None before the first update."""
        if self.heavy is None or self.recent is None:
            return None
        return self.num_sink_tokens + self.heavy + self.recent

    def update(self, key_states, value_states, positions, *args, **kwargs):
        if self.pending:
            raise RuntimeError(
                "H2O cache: the attention function did not report the attention probabilities of the "
                "previous step (observe_attention). Run the model with attn_implementation='longtune' "
                "(kernels.layout.install_layout) — make_cache does this."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        b, h = key_states.shape[:2]
        if self.seen == 0:  # prompt: resolve the budgets, ratios per row from its real tokens
            real = (positions >= 0).sum(dim=-1).to(torch.float64)
            self.heavy_rows = self._row_budget(self.heavy_tokens, self.heavy_ratio, real)
            self.recent_rows = self._row_budget(self.recent_tokens, self.recent_ratio, real)
            self.heavy, self.recent = int(self.heavy_rows.max()), int(self.recent_rows.max())
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, positions.unsqueeze(1).expand(b, h, q)], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, q)], dim=-1)
        self.seen += q
        self.pending, self._acc = q, torch.zeros_like(self.scores)
        self._q_real = positions >= 0  # left-padding queries add no score
        return self.keys, self.values, self.positions

    @staticmethod
    def _row_budget(tokens: int | None, ratio: float | None, real: torch.Tensor) -> torch.Tensor:
        if tokens is not None:
            return torch.full(real.shape, int(tokens), dtype=torch.long, device=real.device)
        return (float(ratio) * real).long()  # int(ratio * n) per row, float64 as Python does

    def observe_sums(self, sums: torch.Tensor, queries: int) -> None:
        """sums (batch, heads, k_len): probabilities of all `queries` queries of this step
        (none of them padding) already summed over the queries."""
        b, hq, k = sums.shape
        hkv = self.keys.shape[1]
        if k != self.keys.shape[-2] or hq != hkv * self.groups or queries != self.pending:
            raise ValueError(
                f"observe_attention_sums: sums {tuple(sums.shape)} for {queries} queries do not match the layer "
                f"(batch {b}, {hkv * self.groups} heads, {self.pending} pending queries, {self.keys.shape[-2]} keys)"
            )
        self._accumulate(sums.float().view(b, hkv, self.groups, k), queries)

    def observe(self, probs: torch.Tensor) -> None:
        """probs (batch, heads, q_chunk, k_len) for the next q_chunk queries of this step."""
        b, hq, qc, k = probs.shape
        hkv = self.keys.shape[1]
        if k != self.keys.shape[-2] or hq != hkv * self.groups or qc > self.pending:
            raise ValueError(
                f"observe_attention: probs {tuple(probs.shape)} do not match the layer (batch {b}, "
                f"{hkv * self.groups} heads, <= {self.pending} pending queries, {self.keys.shape[-2]} keys)"
            )
        done = self._acc_rows()
        pad_rows = ~self._q_real[:, done : done + qc].view(b, 1, qc, 1)
        per_head = probs.float().masked_fill(pad_rows, 0.0).sum(dim=2).view(b, hkv, self.groups, k)
        self._accumulate(per_head, qc)

    def _accumulate(self, per_head: torch.Tensor, queries: int) -> None:
        per_kv = per_head.mean(dim=2) if self.gqa_reduction == "mean" else per_head.sum(dim=2)
        self._acc += per_kv
        self.pending -= queries
        if self.pending == 0:
            self.scores += self._acc
            self._acc = None
            self.evict()

    def _acc_rows(self) -> int:
        """Queries of the current step already observed."""
        return self._q_real.shape[1] - self.pending

    def ranking_scores(self) -> torch.Tensor:
        if self.score_normalization == "none":
            return self.scores
        # queries that could see key j: every token seen at position >= pos(j)
        last = self.positions.amax(dim=-1, keepdim=True)
        return self.scores / (last - self.positions + 1).clamp_min(1).float()

    def evict(self) -> None:
        n, s = self.keys.shape[-2], self.num_sink_tokens
        row_budget = (s + self.heavy_rows + self.recent_rows).view(-1, 1, 1)
        if n <= int(row_budget.min()):
            return
        budget = min(n, s + self.heavy + self.recent)  # storage: the largest row's budget
        # keep priority: sinks (positions 0..s-1: a padded row's first real tokens) and the
        # `recent` last slots first, then the heavy hitters, left padding (position -1) last
        pos = self.positions
        rank = self.ranking_scores().masked_fill(pos < 0, float("-inf"))
        recent = self.recent_rows.view(-1, 1, 1)
        must = ((pos >= 0) & (pos < s)) | (torch.arange(n, device=self.device) >= n - recent)
        rank = rank.masked_fill(must, float("inf"))
        uneven = bool((row_budget < budget).any())
        if n == budget + 1 and not uneven:
            # one token over (a decode step): drop the slot the stable sort below would put
            # last (the newest of the lowest-ranked) and shift the later slots down by one,
            # a vectorised select instead of a gather of the whole cache
            slots = torch.arange(n, device=self.device)
            is_min = rank == rank.amin(dim=-1, keepdim=True)
            victim = torch.where(is_min, slots, -1).argmax(dim=-1, keepdim=True)
            later = slots[:-1] >= victim  # (b, h, n - 1): slot i takes slot i + 1
            # keys/values: one row gather over the flattened (b * h * n, d) storage (a
            # broadcast-mask where over (b, h, n, d) measured ~1.6x slower at batch 4)
            b, h = later.shape[:2]
            rows = (slots[:-1] + later).add_(torch.arange(0, b * h * n, n, device=self.device).view(b, h, 1)).view(-1)
            for name in ("keys", "values"):
                t = getattr(self, name)
                flat = t.reshape(b * h * n, t.shape[-1])
                setattr(self, name, flat.index_select(0, rows).view(b, h, n - 1, t.shape[-1]))
            self.positions = torch.where(later, self.positions[:, :, 1:], self.positions[:, :, :-1])
            self.scores = torch.where(later, self.scores[:, :, 1:], self.scores[:, :, :-1])
            return
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :budget]
        if uneven:  # a row's slots past its own budget become empty entries
            dropped = torch.zeros_like(pos, dtype=torch.bool).scatter_(
                -1, order, (torch.arange(budget, device=self.device) >= row_budget).expand_as(order)
            )
        idx = order.sort(dim=-1).values  # position order
        d = self.keys.shape[-1]
        self.keys = self.keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
        self.values = self.values.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.gather(2, idx)
        self.scores = self.scores.gather(2, idx)
        if uneven:
            gone = dropped.gather(2, idx)
            self.positions.masked_fill_(gone, -1)
            self.scores.masked_fill_(gone, 0.0)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise RuntimeError("H2O cache cannot be cropped")


class H2OCache(PositionedCache):
    """`method: h2o`: H2O layers on the chosen `layers`, full layers elsewhere."""

    def __init__(self, num_layers: int, num_kv_groups: int, layers=None, prefill_chunk: int = 512, **h2o):
        chosen = set(range(num_layers)) if layers is None else set(layers)
        super().__init__(
            [H2OLayer(num_kv_groups, **h2o) if i in chosen else FullLayer() for i in range(num_layers)]
        )
        #: query rows per chunk the attention function should use when it computes the
        #: probabilities of a long step (prefill) for `observe_attention`
        self.prefill_chunk = int(prefill_chunk)

    def observe_attention(self, layer_idx: int, probs: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        if isinstance(layer, H2OLayer):
            layer.observe(probs)

    def observe_attention_sums(self, layer_idx: int, sums: torch.Tensor, queries: int) -> None:
        """The whole step's probabilities summed over its `queries` queries: (batch, heads, k_len)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, H2OLayer):
            layer.observe_sums(sums, queries)

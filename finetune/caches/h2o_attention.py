"""The attention function an H2O cache runs with: kernels' "longtune" plus the heavy-hitter
scores taken from the same pass.

H2O needs, for every key, the attention it received. kernels' "longtune" function serves any
observer by computing the probabilities explicitly (backends/dense.py, query chunks over the
whole prompt, per-KV-head masks): exact, but several times a plain prefill. This function is
registered (transformers `AttentionInterface`) as "longtune_h2o"; `make_cache` selects it for
`method: h2o`. It hands every call to kernels' "longtune" unchanged except two, for layers whose
pattern is causal at inference:

- the prefill (queries == keys at 0..L-1, rows left-padded at most, as generate pads them), when
  no gradient is wanted: one pass that computes the attention and each key's summed
  probability together (kernels/backends/column_sums.py: per block of query rows, one q.k
  matmul over the visible keys, an exact in-place softmax, P.v and the column sums), the
  scores reported with `observe_attention_sums`;
- decode steps (keys kept per KV head, `longtune_kv_head_positions`): one mask for all KV heads
  from kernels.masks (heads folded into the batch) and one small explicit softmax whose
  probabilities go to `observe_attention`.

The masks come from kernels.masks (`build_context`, `dense_mask`); the prefill uses causality and
each row's first real token only. Packed documents, sparse patterns, training and anything else
go to kernels' "longtune".
"""

from __future__ import annotations

import torch

from .base import HEAD_POSITIONS_KEY, OBSERVER_KEY, POSITIONS_KEY

NAME = "longtune_h2o"


def _inference_spec(module) -> dict | None:
    """The layer's resolved pattern at inference, or None when the layout is unusable (kernels'
    function then raises its own error)."""
    from kernels.masks import TRAINING_ONLY, resolve_spec

    layout = getattr(module.config, "longtune_attention", None)
    idx = getattr(module, "layer_idx", None)
    if not isinstance(layout, dict) or idx is None or not 0 <= idx < len(layout.get("layers", [])):
        return None
    spec = resolve_spec(layout["layers"][idx])
    return {"pattern": "causal"} if spec["pattern"] in TRAINING_ONLY else spec


def _left_padding(ctx) -> torch.Tensor | None:
    """(B,) index of each row's first real token when the prefill is causal self-attention over
    left-padded rows, one document each (what generate passes); None for anything else."""
    valid = ctx.valid_q
    starts = valid.shape[1] - valid.sum(dim=1)
    suffix = torch.arange(valid.shape[1], device=valid.device) >= starts[:, None]
    if not torch.equal(valid, suffix) or bool((ctx.doc_q[valid] != 0).any()):
        return None
    return starts


def _prefill(module, query, key, value, scale, observer, starts):
    from kernels.backends.column_sums import causal_attention_with_column_sums

    out, sums = causal_attention_with_column_sums(query, key, value, scale, starts)
    observer.observe_attention_sums(module.layer_idx, sums, query.shape[2])
    return out


def _decode(module, query, key, value, attention_mask, kwargs, spec, scale, observer):
    """Per-KV-head key positions: one mask for every head (heads folded into the batch)."""
    from kernels.backends.dense import attention_with_lse
    from kernels.masks import build_context, dense_mask

    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    rep = H // Hkv
    if Lq == 1:  # a decode step: the query sees its own key at least, no empty row to guard
        # kernels.masks' causal mask for one query, spelled directly (building the general
        # context per layer and step cost more than the attention at small budgets): a kept
        # key is visible when it is a real slot at or before the query's position
        kpos = kwargs[HEAD_POSITIONS_KEY]  # (B, Hkv, Lk), -1: empty
        qpos = kwargs.get("position_ids")
        qpos = kpos[..., -1:] if qpos is None else qpos.to(query.device).long().expand(B, 1).view(B, 1, 1)
        visible = (kpos >= 0) & (kpos <= qpos)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == Lk:
            visible &= attention_mask.to(device=query.device, dtype=torch.bool).view(B, 1, Lk)
        work = torch.float64 if query.dtype == torch.float64 else torch.float32
        q = query.reshape(B, Hkv, rep, D).to(work)
        scores = torch.matmul(q, key.to(work).transpose(-1, -2)).mul_(scale)  # (B, Hkv, rep, Lk)
        probs = torch.softmax(scores.masked_fill_(~visible.view(B, Hkv, 1, Lk), float("-inf")), dim=-1)
        out = torch.matmul(probs, value.to(work)).to(query.dtype).view(B, H, 1, value.shape[-1])
        observer.observe_attention(module.layer_idx, probs.view(B, H, 1, Lk))
        return out
    pos = kwargs[HEAD_POSITIONS_KEY].reshape(B * Hkv, Lk)
    qpos = kwargs.get("position_ids")
    if qpos is not None:
        qpos = qpos.to(query.device).long().expand(B, Lq).repeat_interleave(Hkv, dim=0)
    pad = attention_mask.repeat_interleave(Hkv, dim=0) if attention_mask is not None else None
    ctx = build_context(B * Hkv, Lq, Lk, query.device, attention_mask=pad, position_ids=qpos, kv_positions=pos)
    mask = dense_mask(spec, ctx, 1).view(B, Hkv, 1, Lq, Lk)
    mask = mask.expand(B, Hkv, rep, Lq, Lk).reshape(B, H, Lq, Lk)
    chunk = int(getattr(observer, "prefill_chunk", 512) or Lq)
    outs = []
    for start in range(0, Lq, chunk):
        sl = slice(start, min(Lq, start + chunk))
        o, _, p = attention_with_lse(query[:, :, sl], key, value, mask[:, :, sl], scale)
        observer.observe_attention(module.layer_idx, p.detach())
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def h2o_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """AttentionInterface entry point; same contract as kernels.registry.longtune_attention_forward."""
    from kernels.masks import build_context, head_dependent
    from kernels.registry import longtune_attention_forward

    observer = kwargs.get(OBSERVER_KEY)
    spec = _inference_spec(module) if observer is not None else None
    if (
        spec is None
        or spec["pattern"] != "causal"
        or module.training
        or kwargs.get("cu_seq_lens_q") is not None
        or not hasattr(observer, "observe_attention_sums")
    ):
        return longtune_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)  # fmt: skip
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    scale = scaling if scaling is not None else D**-0.5
    if kwargs.get(HEAD_POSITIONS_KEY) is not None and not head_dependent(spec, H):
        out = _decode(module, query, key, value, attention_mask, kwargs, spec, scale, observer)
        return out.transpose(1, 2).contiguous(), None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if Lq == Lk and kwargs.get(HEAD_POSITIONS_KEY) is None and not grad:
        ctx = build_context(B, Lq, Lk, query.device, attention_mask=attention_mask,
                            position_ids=kwargs.get("position_ids"))  # fmt: skip
        starts = None if ctx.trivial else _left_padding(ctx)
        kpos = kwargs.get(POSITIONS_KEY)
        if kpos is not None:  # the cache's key positions: a first prefill's, left padding -1
            want = torch.arange(Lk, device=query.device).expand(B, Lk)
            if starts is not None:
                want = torch.where(want >= starts[:, None], want - starts[:, None], -1)
            if not torch.equal(kpos.to(want.device).expand(B, Lk), want):
                starts, ctx = None, None
        if (ctx is not None and ctx.trivial) or starts is not None:
            out = _prefill(module, query, key, value, scale, observer, starts)
            return out.transpose(1, 2).contiguous(), None
    return longtune_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)  # fmt: skip


def register() -> str:
    """Register "longtune_h2o" (and kernels' "longtune", whose mask function it shares); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from kernels.registry import longtune_mask
    from kernels.registry import register as register_longtune

    register_longtune()
    AttentionInterface.register(NAME, h2o_attention_forward)
    AttentionMaskInterface.register(NAME, longtune_mask)
    return NAME

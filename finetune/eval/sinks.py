"""Attention-sink statistics ("When Attention Sink Emerges in Language Models", Gu et al.).

For every layer l and head h: the mean attention probability that query tokens give to the
first token, alpha[l][h] = mean_i A[l,h][i, 0], averaged over the evaluated sequences.
A head is a sink head when alpha > threshold (0.3 in the paper); ``share_above`` is the
fraction of (layer, head) pairs above it (the paper's "sink rate").

Query 0 can only attend to token 0 (A[0, 0] = 1 under causality), so including it adds
1/Q to every head. The paper's definition averages over all queries, which is our default;
``exclude_first_query=True`` (recipe ``eval.sink_exclude_first_query``) averages over
queries 1..Q-1 instead.

The probabilities are computed explicitly from the model's own queries and keys: the
attention implementation is swapped for a probe (registered in transformers'
``AttentionInterface``) that returns the normal output (the ``longtune`` function for a
longtune model, SDPA otherwise) and computes softmax(q k^T * scale) row by row in query
chunks, with the mask of the layer: causal, plus the LongGen ``sink_window`` /
``block_sparse`` pattern for hybrid layers (``config.longtune_attention``; training-only
``s2_attn``/``sf_attn`` layers are causal at evaluation). Only column 0 is kept, so memory is
O(heads x length) per layer, not O(length^2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from kernels.masks import build_context, dense_mask, inference_spec

PROBE_NAME = "longtune_sink_probe"
QUERY_CHUNK = 512


# --------------------------------------------------------------------------- statistics
def sink_stats(
    first_token_probs: Sequence[torch.Tensor], threshold: float = 0.3, exclude_first_query: bool = False
) -> dict:
    """Statistics from per-layer tensors ``(heads, queries)`` of the attention each query gives
    to the first token (query index = position)."""
    per_head = []
    for p in first_token_probs:
        p = p.float()
        if p.dim() != 2:
            raise ValueError(f"expected (heads, queries), got shape {tuple(p.shape)}")
        if exclude_first_query:
            if p.shape[1] < 2:
                raise ValueError("exclude_first_query needs at least 2 queries")
            p = p[:, 1:]
        per_head.append(p.mean(dim=1).tolist())
    flat = [v for row in per_head for v in row]
    above = [[v > threshold for v in row] for row in per_head]
    return {
        "threshold": threshold,
        "exclude_first_query": exclude_first_query,
        "per_head": per_head,
        "per_layer_mean": [sum(r) / len(r) for r in per_head],
        "per_layer_share_above": [sum(r) / len(r) for r in above],
        "mean": sum(flat) / len(flat),
        "share_above": sum(v > threshold for v in flat) / len(flat),
        "sink_heads": sum(v > threshold for v in flat),
        "heads": len(flat),
    }


def sink_stats_from_attentions(
    attentions: Sequence[torch.Tensor], threshold: float = 0.3, exclude_first_query: bool = False
) -> dict:
    """Same from full attention tensors, one per layer, ``(batch, heads, q, k)`` or
    ``(heads, q, k)`` (e.g. ``output_attentions=True`` under eager attention); batch is averaged."""
    probs = []
    for a in attentions:
        a = a.float()
        if a.dim() == 4:
            a = a.mean(dim=0)
        probs.append(a[..., 0])
    return sink_stats(probs, threshold, exclude_first_query)


# --------------------------------------------------------------------------- masks
def allowed_mask(
    layer_cfg: dict | None, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Bool ``(heads or 1, Q, K)``: key visible from query in this layer at evaluation time
    (kernels/masks.py's definition; training-only patterns are causal at evaluation)."""
    spec = inference_spec(layer_cfg or {"pattern": "causal"})
    ctx = build_context(1, q_pos.numel(), k_pos.numel(), q_pos.device, position_ids=q_pos.view(1, -1),
                        kv_positions=k_pos.view(1, -1))
    return dense_mask(spec, ctx, num_heads)[0]


def first_key_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    layer_cfg: dict | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """Attention probability on key 0, ``(batch, heads, Q)``, from ``query (B, H, Q, d)`` and
    ``key (B, Hkv, K, d)``."""
    _, H, Q, _ = query.shape
    K = key.shape[2]
    if key.shape[1] != H:
        key = key.repeat_interleave(H // key.shape[1], dim=1)
    k_pos = torch.arange(K, device=query.device) if k_pos is None else k_pos.to(query.device)
    q_pos = torch.arange(K - Q, K, device=query.device) if q_pos is None else q_pos.to(query.device)
    kf = key.float()
    out = []
    for s in range(0, Q, chunk):
        scores = torch.matmul(query[:, :, s : s + chunk].float(), kf.transpose(-1, -2)) * scaling
        allow = allowed_mask(layer_cfg, q_pos[s : s + chunk], k_pos, H).to(scores.device)
        scores = scores.masked_fill(~allow.unsqueeze(0), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out.append(torch.exp(scores[..., 0] - lse))
    return torch.cat(out, dim=-1)


# --------------------------------------------------------------------------- probe
class _ProbeState:
    inner = None
    layers: list | None = None
    records: dict | None = None


_STATE = _ProbeState()


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    out = _STATE.inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer_idx = getattr(module, "layer_idx", 0)
    layers = _STATE.layers
    layer_cfg = layers[layer_idx] if layers and layer_idx < len(layers) else None
    q_pos = kwargs.get("position_ids")
    q_pos = q_pos[0] if q_pos is not None and q_pos.dim() == 2 else None
    k_pos = kwargs.get("longtune_kv_positions")
    k_pos = k_pos[0] if k_pos is not None else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    p0 = first_key_probs(query, key, scale, layer_cfg, q_pos, k_pos)
    _STATE.records.setdefault(layer_idx, []).append(p0.mean(dim=0).cpu())
    return out


@contextlib.contextmanager
def _probed(model):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(PROBE_NAME, _probe_attention)
    config = model.config
    orig = config._attn_implementation
    layout = getattr(config, "longtune_attention", None) or {}
    _STATE.inner = ALL_ATTENTION_FUNCTIONS[orig] if orig == "longtune" else sdpa_attention_forward
    _STATE.layers = layout.get("layers")
    _STATE.records = {}
    config._attn_implementation = PROBE_NAME
    try:
        yield _STATE.records
    finally:
        config._attn_implementation = orig
        _STATE.inner = _STATE.layers = _STATE.records = None


@torch.no_grad()
def model_sink_stats(
    model,
    sequences: Sequence[torch.Tensor],
    threshold: float = 0.3,
    exclude_first_query: bool = False,
    progress: bool = True,
) -> dict:
    """Sink statistics of a Hugging Face causal LM over token sequences (1-D, equal length)."""
    was_training = model.training
    model.eval()
    try:
        with _probed(model) as records:
            for ids in tqdm(sequences, desc="attention sinks", leave=False, disable=not progress):
                ids = ids.reshape(1, -1).to(model.device)
                model(input_ids=ids, use_cache=False)
            per_layer = [torch.stack(records[k]).mean(dim=0) for k in sorted(records)]
    finally:
        model.train(was_training)
    if not per_layer:
        raise RuntimeError("the sink probe saw no attention call (model does not use AttentionInterface)")
    stats = sink_stats(per_layer, threshold, exclude_first_query)
    stats["length"] = int(sequences[0].numel())
    stats["sequences"] = len(sequences)
    return stats


def windows(ids: torch.Tensor, length: int, samples: int, bos_id: int | None = None) -> list[torch.Tensor]:
    """Up to ``samples`` windows of ``length`` tokens spread over ``ids``; each starts with
    ``bos_id`` when given (as every prompt does), followed by ``length - 1`` text tokens."""
    ids = ids.reshape(-1)
    if bos_id is not None:
        ids = ids[ids != bos_id]
    body = length - (bos_id is not None)
    n_avail = max(1, ids.numel() // body)
    n = min(samples, n_avail)
    step = (n_avail - 1) // (n - 1) if n > 1 else 1
    out = []
    for k in range(n):
        w = ids[k * step * body : k * step * body + body]
        if bos_id is not None:
            w = torch.cat([torch.tensor([bos_id], dtype=w.dtype), w])
        out.append(w)
    return out


def run(models: dict, ids: torch.Tensor, cfg, samples: int = 4, progress: bool = True) -> dict:
    """Sink statistics of each model on ``samples`` windows of the smallest eval length (or the
    whole text when shorter), each starting with the model tokenizer's BOS when it has one."""
    exclude = getattr(cfg, "sink_exclude_first_query", False)
    out = {}
    for name, (model, tok) in models.items():
        bos_id = getattr(tok, "bos_token_id", None)
        length = min(min(cfg.lengths), ids.numel())
        seqs = windows(ids, length, samples, bos_id)
        out[name] = model_sink_stats(model, seqs, cfg.sink_threshold, exclude, progress)
    return out

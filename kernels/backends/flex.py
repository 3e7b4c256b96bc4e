"""FlexAttention: the predicate compiled into a BlockMask; fully masked blocks are skipped.

Compiled with torch.compile on GPU and CPU. PyTorch has no FlexAttention backward on CPU, so on
CPU this backend serves inference/forward only (``auto`` never picks it for CPU training).
Compiling costs ~20 s per shape on CPU: set LONGTUNE_FLEX_COMPILE=0 (tests do) for the eager
path, which materialises the scores but checks the same block mask.
Block masks are cached per (pattern, shape, device) when the context is trivial (no padding,
one document); otherwise they depend on the batch and are rebuilt per call. On CUDA (compile on)
``create_block_mask`` itself is compiled: eager, it materialises the (B, H, Lq, Lk) mask and the
mask function's intermediates (int64, Lq x Lk per head), tens of GiB at 32k with SF-Attn's
head-dependent shift; compiled, the mask is reduced to blocks without being written out.
"""

from __future__ import annotations

import os

import torch

from kernels.masks import MaskContext, head_dependent, mask_mod

_BLOCK_MASKS: dict = {}
_COMPILED = None
_COMPILED_BLOCK_MASK = None


def compile_enabled() -> bool:
    return os.environ.get("LONGTUNE_FLEX_COMPILE", "1") != "0"


def _flex():
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not compile_enabled():
        return flex_attention
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention)  # dynamic after a recompile: varlen SFT
        _raise_recompile_limit(64)
    return _COMPILED


def _raise_recompile_limit(n: int) -> None:
    """Each pattern's mask function (and its captured sizes) is a new guard of the one compiled
    flex_attention: past dynamo's limit (8) it silently runs flex eagerly, which materialises the
    (H, Lq, Lk) scores (137 GB at 32 heads x 32k). Raise the limit; never lower it."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


def _create_block_mask(device):
    """``create_block_mask``, compiled on CUDA when compiling is on (see the module docstring)."""
    global _COMPILED_BLOCK_MASK
    from torch.nn.attention.flex_attention import create_block_mask

    if torch.device(device).type != "cuda" or not compile_enabled():
        return create_block_mask
    if _COMPILED_BLOCK_MASK is None:
        _COMPILED_BLOCK_MASK = torch.compile(create_block_mask)
        _raise_recompile_limit(64)  # one compile per pattern and length (the same limit as flex's)
    return _COMPILED_BLOCK_MASK


def block_mask(spec: dict, ctx: MaskContext, num_heads: int, q_len: int, k_len: int, device, head_slice=None):
    """``head_slice``: a kernels.heads.HeadSlice when the call holds a slice of the model's heads."""
    if head_slice is None:
        heads = num_heads if head_dependent(spec, num_heads) else None
        mod = mask_mod(spec, ctx, num_heads)
    else:
        from kernels.heads import mask_mod_at

        heads = head_slice.local if head_dependent(spec, head_slice.total) else None
        mod = mask_mod_at(spec, ctx, head_slice)
    key = None
    if ctx.trivial:
        key = (tuple(sorted((k, str(v)) for k, v in spec.items())), heads, q_len, k_len, str(device), head_slice)
        if key in _BLOCK_MASKS:
            return _BLOCK_MASKS[key]
    bm = _create_block_mask(device)(mod, None if ctx.trivial else ctx.batch, heads, q_len, k_len, device=device)
    if key is not None:
        _BLOCK_MASKS[key] = bm
    return bm


def clear_cache() -> None:
    _BLOCK_MASKS.clear()


def forward(q, k, v, spec: dict, ctx: MaskContext, scale: float, heads=None) -> torch.Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "FlexAttention has no backward on CPU: set the layout's backend to 'sdpa_groups', 'sdpa' "
            "or 'dense' (or 'auto') for CPU training"
        )
    if q.device.type == "cpu":  # forward only on CPU; flex refuses tensors that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    bm = block_mask(spec, ctx, q.shape[1], q.shape[2], k.shape[2], q.device, head_slice=heads)
    out = _flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if not ctx.trivial:
        out = out * ctx.valid_q[:, None, :, None].to(out.dtype)
    return out

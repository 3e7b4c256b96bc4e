"""The "longtune" attention implementation, registered with transformers' AttentionInterface.

``register()`` adds (idempotently) the attention function and a mask function to transformers'
registries; the model selects it with ``config._attn_implementation = "longtune"`` and the
per-layer pattern comes from ``config.longtune_attention["layers"][layer_idx]`` (docs/design.md).
Nothing in transformers is patched.

The mask function hands the attention function the raw 2D padding mask (or None) rather than a
4D causal mask: the pattern, documents and positions are rebuilt here from ``position_ids``,
``longtune_kv_positions`` (compact caches) and the padding mask.

``kernel_calls()`` counts (pattern, backend) per call, so training can assert the kernel it
asked for actually ran (SinkLoRA's only public run silently trained with SDPA).
"""

from __future__ import annotations

from collections import Counter

import torch

from kernels.masks import build_context, head_positions_mask, inference_spec, resolve_spec

NAME = "longtune"
BACKENDS = ("auto", "dense", "sdpa", "sdpa_groups", "flex", "flash")

_CALLS: Counter = Counter()


def kernel_calls() -> dict[tuple[str, str], int]:
    """Calls per (pattern, backend) since the last reset, e.g. {("sf_attn", "sdpa_groups"): 4}."""
    return dict(_CALLS)


def reset_kernel_calls() -> None:
    _CALLS.clear()


def _layer_spec(module) -> tuple[dict, dict]:
    config = module.config
    layout = getattr(config, "longtune_attention", None)
    if not isinstance(layout, dict) or "layers" not in layout:
        raise KeyError(
            "config.longtune_attention['layers'] is missing: the model runs with "
            "_attn_implementation='longtune' but has no layout; call kernels.layout.install_layout(config, layout)"
        )
    idx = getattr(module, "layer_idx", None)
    layers = layout["layers"]
    if idx is None or not 0 <= idx < len(layers):
        raise KeyError(
            f"config.longtune_attention['layers'][{idx}]: layer index out of range "
            f"({len(layers)} layer specs); the layout must have one entry per decoder layer"
        )
    # Resolved per call (a few dict operations): a layout edited in place takes effect at once.
    return resolve_spec(layers[idx], f"config.longtune_attention['layers'][{idx}]"), layout


def _flash_usable(q) -> bool:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        return False
    from kernels.backends import flash

    return flash.available()


def choose_backend(spec: dict, requested: str, q: torch.Tensor, ctx, observer) -> str:
    """The backend that runs this call. ``auto``: flash-attn (CUDA + installed) for S2/SF,
    sink_window and causal with packed documents/padding; grouped SDPA for S2/SF and
    sink_window on CPU; FlexAttention on GPU for the rest; SDPA for plain causal, decode steps
    and everything else on CPU. A requested backend that cannot serve the call (decode step, roll mode, flex
    backward on CPU) falls back to ``sdpa``; the counters record what really ran."""
    from kernels.backends import flash, sdpa_groups

    if observer is not None:
        return "dense"
    pattern = spec["pattern"]
    if requested not in BACKENDS:
        raise ValueError(f"config.longtune_attention backend: unknown {requested!r} (valid: {', '.join(BACKENDS)})")
    if requested == "dense":
        return "dense"
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    if requested == "flash":
        return "flash" if _flash_usable(q) and flash.supports(spec, ctx) else "sdpa"
    if requested == "sdpa_groups":
        return "sdpa_groups" if sdpa_groups.supports(spec, ctx) else "sdpa"
    if requested == "flex":
        return "flex" if ctx.self_attention and not (q.device.type == "cpu" and needs_grad) else "sdpa"
    if requested == "sdpa" or (pattern == "causal" and (ctx.trivial or not ctx.self_attention)):
        return "sdpa"
    # auto (causal here: packed documents or padding, where a dense mask would be (L, L))
    if _flash_usable(q) and flash.supports(spec, ctx):
        return "flash"
    if q.device.type == "cpu" and sdpa_groups.supports(spec, ctx):
        return "sdpa_groups"
    if q.device.type == "cuda" and ctx.self_attention:
        return "flex"
    return "sdpa"  # CPU causal with documents/padding: masked SDPA


def run_backend(name: str, q, k, v, spec, ctx, scale, observer=None, layer_idx=None, chunk=None):
    """Dispatch to one backend; (B, H, Lq, D) out. Public so tests and the bench call the same path."""
    if name == "dense":
        from kernels.backends import dense

        return dense.forward(q, k, v, spec, ctx, scale, observer=observer, layer_idx=layer_idx, chunk=chunk)
    if name == "sdpa":
        from kernels.backends import sdpa

        return sdpa.forward(q, k, v, spec, ctx, scale)
    if name == "sdpa_groups":
        from kernels.backends import sdpa_groups

        return sdpa_groups.forward(q, k, v, spec, ctx, scale)
    if name == "flex":
        from kernels.backends import flex

        return flex.forward(q, k, v, spec, ctx, scale)
    if name == "flash":
        from kernels.backends import flash

        return flash.forward(q, k, v, spec, ctx, scale)
    raise ValueError(f"backend: unknown {name!r} (valid: {', '.join(BACKENDS)})")


def longtune_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs):
    """AttentionInterface entry point: (B, H, Lq, D) q and (B, Hkv, Lk, D) k/v -> ((B, Lq, H, D), None)."""
    spec, layout = _layer_spec(module)
    if not module.training:
        spec = inference_spec(spec)
    if dropout and module.training:
        raise ValueError("config.attention_dropout > 0 is not supported by longtune attention; set it to 0.0")
    cross = spec.get("cross_document", layout.get("cross_document", False))
    B, _, Lq, D = query.shape
    Lk = key.shape[2]
    cu = kwargs.get("cu_seq_lens_q") if Lq == Lk else None
    ctx = build_context(
        B, Lq, Lk, query.device,
        attention_mask=attention_mask,
        position_ids=kwargs.get("position_ids"),
        kv_positions=kwargs.get("longtune_kv_positions"),
        cu_seqlens=cu,
        cross_document=bool(cross),
    )
    observer = kwargs.get("longtune_attention_observer")
    head_positions = kwargs.get("longtune_kv_head_positions")
    if head_positions is not None:
        out, backend = _per_head_positions(module, query, key, value, spec, attention_mask, kwargs, observer,
                                           scaling if scaling is not None else D ** -0.5, bool(cross))
        _CALLS[(spec["pattern"], backend)] += 1
        return out.transpose(1, 2).contiguous(), None
    requested = spec.get("backend", layout.get("backend", "auto"))
    backend = choose_backend(spec, requested, query, ctx, observer)
    scale = scaling if scaling is not None else D ** -0.5
    chunk = getattr(observer, "prefill_chunk", 512) if observer is not None else None
    out = run_backend(backend, query, key, value, spec, ctx, scale, observer=observer,
                      layer_idx=getattr(module, "layer_idx", None), chunk=chunk)
    _CALLS[(spec["pattern"], backend)] += 1
    return out.transpose(1, 2).contiguous(), None


def _per_head_positions(module, q, k, v, spec, attention_mask, kwargs, observer, scale, cross):
    """Caches whose kept keys differ per KV head (H2O) pass (B, Hkv, k_len) positions in
    ``kwargs["longtune_kv_head_positions"]``: the mask is built per KV head, then one masked
    SDPA (or the dense path with probabilities for the observer) runs over all heads."""
    from kernels.backends import dense

    B, H, Lq, _ = q.shape
    rep = H // k.shape[1]
    mask = head_positions_mask(spec, B, Lq, kwargs["longtune_kv_head_positions"], H,
                               attention_mask=attention_mask, position_ids=kwargs.get("position_ids"),
                               cross_document=cross)
    if observer is None:
        safe = mask | ~mask.any(dim=-1, keepdim=True)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale,
                                                               enable_gqa=rep > 1)
        return out, "sdpa"
    chunk = int(getattr(observer, "prefill_chunk", 512))
    outs = []
    for start in range(0, Lq, chunk):
        sl = slice(start, min(Lq, start + chunk))
        o, _, p = dense.attention_with_lse(q[:, :, sl], k, v, mask[:, :, sl], scale)
        observer.observe_attention(module.layer_idx, p.detach())
        outs.append(o)
    return torch.cat(outs, dim=2), "dense"


def longtune_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """AttentionMaskInterface entry: the 2D padding mask as bool (None when nothing is padded).

    Not sliced to kv_length: a compact cache's keys are not the last kv_length tokens, and the
    attention function maps padding through the key positions itself."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask.to(torch.bool)
    if attention_mask.dim() == 2 and bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register "longtune" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not is_registered():
        AttentionInterface.register(NAME, longtune_attention_forward)
        AttentionMaskInterface.register(NAME, longtune_mask)


def is_registered() -> bool:
    """Whether both registries hold our functions (read through their public global instances)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return (ALL_ATTENTION_FUNCTIONS.get(NAME) is longtune_attention_forward
            and ALL_MASK_ATTENTION_FUNCTIONS.get(NAME) is longtune_mask)

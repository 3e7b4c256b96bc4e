"""How the decoder layers are checkpointed (``training.gradient_checkpointing``).

Stock gradient checkpointing (what transformers' ``gradient_checkpointing_enable`` gives) keeps
each layer's input and recomputes the whole layer in backward, the attention kernel included.
Here the layers always use torch's *non-reentrant* checkpoint: it stops the recomputation as
soon as backward has what it needs, and (torch >= 2.13) it keeps each layer's input as a saved
tensor, so the offload's saved-tensor hooks (``memory.offload_activations``, finetune/memory.py)
move it to host memory like any other saved tensor. (Until this change the offload switched to
the reentrant form, which recomputes every layer to its end.)

``memory.save_attention`` makes it *selective* (torch's ``create_selective_checkpoint_contexts``):
the outputs of the attention kernels (the ops in ``ATTENTION_OPS``: the attention output and its
log-sum-exp, tokens x (hidden + heads) per layer) are kept from the forward and the
recomputation reuses them instead of running the kernel again; everything else is recomputed
as before. Backward needs q, k, v and that output either way, so the gradients are the same
numbers. Our CPU block kernels (kernels/backends/cpu_blocks.py) call the CPU flash op once per
block inside one autograd Function: the policy sees those calls and keeps their outputs (the
sink merge around them is recomputed: a few small matmuls). What is kept stays where it was
made: the offload does not move it.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _ops(*names: str) -> frozenset:
    """The aten overloads of these names that this torch build has."""
    found = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            found.append(packet.default)
    return frozenset(found)


#: Attention kernels whose outputs ``memory.save_attention`` keeps: the CPU flash op (our block
#: kernels and SDPA on CPU) and the CUDA SDPA kernels.
ATTENTION_OPS = _ops(
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _save_attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def save_attention_context():
    """``context_fn`` of torch.utils.checkpoint that keeps the attention kernels' outputs."""
    return create_selective_checkpoint_contexts(_save_attention_policy)


def checkpoint_kwargs(memory) -> dict:
    """Keyword arguments of torch.utils.checkpoint.checkpoint for the decoder layers."""
    kwargs: dict = {"use_reentrant": False}
    if memory.save_attention:
        kwargs["context_fn"] = save_attention_context
    return kwargs


def enable(model: torch.nn.Module, memory) -> None:
    """Gradient checkpointing of every decoder layer, as the recipe's ``memory`` section asks."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(memory))

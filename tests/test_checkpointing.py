"""Selective checkpointing (``memory.save_attention``, finetune/checkpointing.py): the same loss
and gradients as stock checkpointing (float64), with the attention kernels run once per layer
instead of twice."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune import checkpointing
from finetune.memory import loss_sum_and_outputs, shift_labels
from finetune.model import build_model
from finetune.recipe import RecipeError, validate
from tests.conftest import TINY_LLAMA

T = 96


def recipe(**memory):
    return validate({
        "run_dir": "runs/x", "seed": 5,
        "model": {"config": {**TINY_LLAMA, "num_hidden_layers": 3}, "tokenizer": "byte", "dtype": "float32"},
        "attention": {"pattern": "sf_attn", "num_sink_tokens": 2},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "data": {"seq_length": T},
        "deepspeed": {"config": None},
        "training": {"gradient_checkpointing": True},
        "memory": memory,
    })


class KernelCalls(TorchDispatchMode):
    """Calls of the attention kernels whose outputs save_attention keeps."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in checkpointing.ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def step(r, packed: bool):
    torch.manual_seed(0)
    model = build_model(r).double().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, T), generator=g)
    # one document per row: the CPU block kernels; two packed documents: the masked SDPA path
    pos = torch.cat([torch.arange(40), torch.arange(T - 40)]) if packed else torch.arange(T)
    inputs = {"input_ids": ids, "position_ids": pos.expand(2, -1)}
    with KernelCalls() as calls:
        loss, _ = loss_sum_and_outputs(model, inputs, shift_labels(ids), r.memory)
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls.n


@pytest.mark.parametrize("packed", [False, True])
def test_save_attention_same_gradients_kernel_run_once(packed):
    ref_loss, ref_grads, ref_calls = step(recipe(), packed)
    loss, grads, calls = step(recipe(save_attention=True), packed)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)
    # stock checkpointing runs every kernel call twice (forward, recomputation); saved: once
    assert ref_calls > 0 and ref_calls % 2 == 0
    assert calls == ref_calls // 2, (calls, ref_calls)


def test_offload_keeps_non_reentrant_and_saved_attention():
    """The offload's hooks reach the layer inputs of torch's non-reentrant checkpoint (tests/
    test_memory.py counts them), so it no longer forces the reentrant form."""
    kw = checkpointing.checkpoint_kwargs(recipe(offload_activations=True, save_attention=True).memory)
    assert kw == {"use_reentrant": False, "context_fn": checkpointing.save_attention_context}
    assert checkpointing.checkpoint_kwargs(recipe().memory) == {"use_reentrant": False}


def test_save_attention_needs_checkpointing():
    r = recipe(save_attention=True).model_dump()
    r["training"]["gradient_checkpointing"] = False
    with pytest.raises((RecipeError, ValueError), match="memory.save_attention"):
        validate(r)


def test_tiled_mlp_under_checkpointing_same_gradients_no_wasted_forward():
    """Checkpointed + tiled MLP: the gradients of the untiled model, and the MLP runs twice per
    tile (forward, the tile's recomputation in backward), not a third time in the layer's
    recomputation just to reach its saved input."""
    def gate_calls(r):
        torch.manual_seed(0)
        model = build_model(r).double().train()
        calls = []
        for m in model.modules():
            if type(m).__name__.startswith("Tiled") or m.__class__.__name__.endswith("MLP"):
                m.gate_proj.register_forward_hook(lambda _m, i, _o: calls.append(i[0].shape[-2]))
        ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
        loss, _ = loss_sum_and_outputs(model, {"input_ids": ids}, shift_labels(ids), r.memory)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls

    ref_loss, ref_grads, ref_calls = gate_calls(recipe())
    loss, grads, calls = gate_calls(recipe(tiled_mlp=True, tiled_mlp_tokens=32, save_attention=True))
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12, msg=k)
    layers, tiles = 3, T // 32
    assert ref_calls == [T] * (2 * layers)  # untiled: forward + the layer's recomputation
    # each tile twice: forward and backward's recomputation, both over the flattened rows (2 rows
    # x 32 tokens = 64 of 192 tokens, as DeepSpeed's backward cuts them); nothing runs in the
    # layers' recomputation
    assert calls == [64] * (2 * tiles * layers), calls


def test_offload_hooks_reach_every_layer_input():
    """The offload (outer saved-tensor hooks) sees each checkpointed layer's input: what it moves
    to host memory on an accelerator is exactly what checkpointing keeps."""
    r = recipe(offload_activations=True, save_attention=True)
    model = build_model(r).train()
    inputs_seen, packed = [], set()
    for layer in model.get_base_model().model.layers:
        layer.register_forward_pre_hook(lambda _m, args: inputs_seen.append(args[0].data_ptr()))
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))

    def pack(t):
        packed.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_sum_and_outputs(model, {"input_ids": ids}, shift_labels(ids),
                                       r.memory.model_copy(update={"offload_activations": False}))
    assert len(inputs_seen) == 3 and set(inputs_seen) <= packed
    loss.backward()

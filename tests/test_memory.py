"""Tiled logits + loss, tiled MLP and checkpoint offload (finetune/memory.py) on a tiny model:
the same loss and gradients as the plain model, and the memory they exist to save is gone.

Memory is measured two ways on CPU: the largest tensor any op produces (the full logits are
[tokens, vocab]) and the bytes autograd holds between forward and backward (saved tensors),
which is where tiled MLP's [tokens, FFN] activations and the checkpoints live. A GPU test
measures the allocator's peak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.memory import OffloadCheckpoints, loss_sum_and_outputs, shift_labels
from finetune.model import build_model
from finetune.recipe import validate
from tests.conftest import TINY_LLAMA

T, V = 96, 259


def recipe(**memory):
    checkpointing = memory.pop("checkpointing", False)
    return validate({
        "run_dir": "runs/x", "seed": 3,
        "model": {"config": {**TINY_LLAMA, "num_hidden_layers": 3}, "tokenizer": "byte", "dtype": "float32"},
        "attention": {"pattern": "sf_attn", "num_sink_tokens": 2},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"]},
        "data": {"seq_length": T},
        "deepspeed": {"config": None},
        "training": {"gradient_checkpointing": checkpointing},
        "memory": memory,
    })


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, T), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    pos = torch.cat([torch.arange(40), torch.arange(T - 40)]).expand(2, -1)  # two packed documents
    return {"input_ids": ids, "position_ids": pos}, shift_labels(labels)


def run(r, model=None, count_saved=False):
    """(loss, {name: grad}, largest rows of any [*, vocab] tensor, saved bytes, offloaded bytes)."""
    model = model or build_model(r)
    model.train()
    inputs, targets = batch()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if not isinstance(t, torch.nn.Parameter) else 0)
        return t

    off = OffloadCheckpoints(min_bytes=1024) if r.memory.offload_activations else None
    with VocabRows() as rows:
        # what the forward leaves for backward (saved tensors), counted during the forward only
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if off is not None:  # innermost hooks win: the offload sees the tensors, then counts
                with off:
                    loss_sum, _ = loss_sum_and_outputs(model, inputs, targets,
                                                       r.memory.model_copy(update={"offload_activations": False}))
            else:
                loss_sum, _ = loss_sum_and_outputs(model, inputs, targets, r.memory)
        loss = loss_sum / (targets != -100).sum()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, rows.max_rows, sum(saved), off.offloaded_shapes if off else []


class VocabRows(TorchDispatchMode):
    """Largest number of rows of any op output whose last dimension is the vocabulary."""

    def __init__(self):
        super().__init__()
        self.max_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V:
                self.max_rows = max(self.max_rows, t.numel() // V)
        return out


@pytest.fixture(scope="module")
def plain():
    return run(recipe())


def assert_same(a, b):
    assert abs(a[0] - b[0]) < 1e-5, (a[0], b[0])
    assert a[1].keys() == b[1].keys() and len(a[1]) > 10
    for k in a[1]:
        torch.testing.assert_close(b[1][k], a[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_tiled_loss_never_holds_full_logits(plain):
    tiled = run(recipe(tiled_loss=True, tiled_loss_tokens=16))
    assert_same(plain, tiled)
    assert plain[2] >= 2 * T  # the plain model's logits: every token of both rows
    assert tiled[2] <= 2 * 16  # one tile (2 rows x 16 tokens) at a time
    assert tiled[3] < plain[3]  # and the saved logits are gone from what backward holds


def test_tiled_mlp_same_numbers_less_saved(plain):
    tiled = run(recipe(tiled_mlp=True, tiled_mlp_tokens=20))
    assert_same(plain, tiled)
    ffn, layers = TINY_LLAMA["intermediate_size"], 3
    # the plain MLP saves at least 3 [tokens, FFN] fp32 activations per layer (gate, up, act*up)
    assert plain[3] - tiled[3] >= layers * 3 * 2 * T * ffn * 4 * 0.9, (plain[3], tiled[3])


def test_offload_moves_the_checkpoints():
    ref = run(recipe(checkpointing=True))
    off = run(recipe(checkpointing=True, offload_activations=True))
    assert_same(ref, off)
    h, layers = TINY_LLAMA["hidden_size"], 3
    # every layer's input (2 x T x hidden) went through the offload hooks (plus the final norm's)
    assert off[4].count((2, T, h)) >= layers, off[4]
    assert ref[4] == []


def test_tiled_mlp_is_per_instance():
    from transformers.models.llama.modeling_llama import LlamaMLP

    r = recipe(tiled_mlp=True)
    model = build_model(r)
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    assert mlps and all(type(m) is not LlamaMLP for m in mlps)
    assert LlamaMLP.forward is not type(mlps[0]).forward  # the transformers class is untouched
    # state-dict names are the plain model's
    assert set(model.state_dict()) == set(build_model(recipe()).state_dict())
    # eval: the whole MLP, same output as untiled
    plain = build_model(recipe())
    inputs, _ = batch()
    with torch.no_grad():
        a = model.eval()(**inputs).logits
        b = plain.eval()(**inputs).logits
    torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_peak_memory_drops():
    """Allocator peak of one forward+backward on CUDA, plain vs all features (bf16-free fp32)."""
    cfg = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000}

    def peak(**memory):
        ck = memory.pop("checkpointing", True)
        r = validate({"run_dir": "runs/x", "model": {"config": cfg, "tokenizer": "byte", "dtype": "float32"},
                      "attention": {"pattern": "sf_attn", "backend": "sdpa"}, "data": {"seq_length": 8192},
                      "deepspeed": {"config": None}, "training": {"gradient_checkpointing": ck},
                      "memory": memory})
        model = build_model(r).cuda().train()
        ids = torch.randint(0, 32000, (1, 8192), device="cuda")
        inputs = {"input_ids": ids, "position_ids": torch.arange(8192, device="cuda")[None]}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_sum, _ = loss_sum_and_outputs(model, inputs, shift_labels(ids), r.memory)
        loss_sum.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain = peak()
    loss_tiled = peak(tiled_loss=True, tiled_loss_tokens=1024)
    all_on = peak(tiled_loss=True, tiled_loss_tokens=1024, tiled_mlp=True, offload_activations=True)
    print(f"peak MiB: plain {plain / 2**20:.0f}, tiled loss {loss_tiled / 2**20:.0f}, all {all_on / 2**20:.0f}")
    assert loss_tiled < 0.6 * plain
    assert all_on < loss_tiled


# --------------------------------------------------------------------------- fused linear + loss
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_equals_untiled_float64(bias):
    """Loss and every gradient (hidden, weight, bias) of the tiled fused loss equal autograd's
    through the whole logits, in float64, with ignored labels, tiles that do not divide the
    tokens, and an upstream gradient that is not 1 (gradient accumulation / SP scaling)."""
    from finetune.memory import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    B, L, h, vocab = 2, 37, 8, 23
    hidden = torch.randn(B, L, h, dtype=torch.float64, generator=g)
    weight = torch.randn(vocab, h, dtype=torch.float64, generator=g)
    b = torch.randn(vocab, dtype=torch.float64, generator=g) if bias else None
    labels = torch.randint(0, vocab, (B, L), generator=g)
    labels[0, :5] = -100
    labels[1, -1] = -100

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
        loss = fn(*leaves)
        (loss * 2.5).backward()
        return [loss.detach()] + [t.grad for t in leaves]

    ref = grads(lambda x, w, *bb: F.cross_entropy(F.linear(x, w, bb[0] if bb else None).reshape(-1, vocab),
                                                    labels.reshape(-1), ignore_index=-100, reduction="sum"))
    for tile in (5, 16, 1000):
        got = grads(lambda x, w, *bb, tile=tile: fused_linear_cross_entropy(x, w, bb[0] if bb else None, labels, tile))
        for a, e in zip(got, ref):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_fused_loss_tied_weight_float64():
    """A head tied to the input embedding: the weight's gradient sums both uses, as untiled."""
    from finetune.memory import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(2)
    vocab, h = 19, 6
    ids = torch.randint(0, vocab, (2, 21), generator=g)
    labels = shift_labels(ids)
    w0 = torch.randn(vocab, h, dtype=torch.float64, generator=g)
    mix = torch.randn(h, h, dtype=torch.float64, generator=g)

    def run_with(loss_fn):
        w = w0.clone().requires_grad_(True)
        hidden = torch.tanh(F.embedding(ids, w) @ mix)
        loss = loss_fn(hidden, w)
        loss.backward()
        return loss.detach(), w.grad

    ref = run_with(lambda x, w: F.cross_entropy(F.linear(x, w).reshape(-1, vocab), labels.reshape(-1),
                                                ignore_index=-100, reduction="sum"))
    got = run_with(lambda x, w: fused_linear_cross_entropy(x, w, None, labels, 8))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)


def test_tiled_loss_tied_embeddings():
    """The model path with tied embeddings (the head is the frozen tied weight under peft) and with
    untied ones (peft's trainable copy of lm_head): both take the fused path, same numbers."""
    from finetune.memory import plain_linear, unwrap

    for tied in (True, False):
        def tied_recipe(tied=tied, **memory):
            r = recipe(**memory)
            return r.model_copy(update={"model": r.model.model_copy(update={
                "config": {**r.model.config, "tie_word_embeddings": tied}})})

        plain_r, tiled_r = tied_recipe(), tied_recipe(tiled_loss=True, tiled_loss_tokens=16)
        model = build_model(tiled_r)
        head = unwrap(model).get_output_embeddings()
        assert plain_linear(head) is not None
        emb = unwrap(model).get_input_embeddings().original_module  # peft's frozen original
        assert (emb.weight is head.weight) == tied
        a, b = run(plain_r), run(tiled_r, model=model)
        assert_same(a, b)
        assert b[2] <= 2 * 16
        assert any("lm_head" in k for k in b[1]) != tied  # untied: lm_head's copy is trained


def test_fused_loss_without_grad_computes_only_the_loss():
    """Evaluation (no_grad): the same loss, and no gradient matmuls (one mm per tile, not three)."""
    from finetune.memory import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 30, 8, requires_grad=True, generator=g)
    w = torch.randn(11, 8, requires_grad=True, generator=g)
    labels = torch.randint(0, 11, (1, 30), generator=g)
    ref = F.cross_entropy(F.linear(x, w).reshape(-1, 11), labels.reshape(-1), reduction="sum")

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMM.n += func.__name__.startswith(("mm", "addmm"))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), CountMM():
        loss = fused_linear_cross_entropy(x, w, None, labels, 10)
    assert loss.grad_fn is None and CountMM.n == 3
    torch.testing.assert_close(loss, ref.detach())

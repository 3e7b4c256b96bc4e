"""The CUDA paths themselves (marked gpu: skipped without a CUDA device; `pytest -m gpu` on a GPU).

Every other test checks these backends against CPU stand-ins; here the real kernels run in bf16
with their backward and are compared with the float64 dense reference (relative error of the
output and of the q/k/v gradients, bf16 operands: ~1e-2 at most): compiled FlexAttention (and
its compiled block-mask builder), the grouped-SDPA GPU path, the `auto` backend choice inside a
bf16 model's training step, and a few bf16 LoRA+ training steps that must lower the loss.
"""

from __future__ import annotations

import pytest
import torch

from kernels.masks import build_context, head_dependent, mask_mod, resolve_spec
from kernels.registry import run_backend

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
H, HKV, D = 4, 2, 64
REL = 2e-2  # bf16 operands against float64

SPECS = {
    "s2": {"pattern": "s2_attn", "group_ratio": 0.25},
    "sf4": {"pattern": "sf_attn", "group_ratio": 0.25, "num_sink_tokens": 4},
    "win4": {"pattern": "sink_window", "window": 96, "num_sink_tokens": 4},
    "block": {"pattern": "block_sparse", "block_size": 64, "local_blocks": 2, "stride": 3},
    "causal": {"pattern": "causal"},
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def _context(name: str):
    """(B, L, kwargs) on CUDA: one long row not a multiple of 128, or two rows with padding and
    packed documents."""
    if name == "odd":
        return 1, 700, {}
    pos = torch.stack([torch.cat([torch.arange(300), torch.arange(212)]), torch.arange(512)])
    am = torch.ones(2, 512, dtype=torch.bool)
    am[1, 450:] = False
    return 2, 512, {"position_ids": pos.cuda(), "attention_mask": am.cuda()}


def _check(backend: str, spec_name: str, ctx_name: str, hkv: int = HKV):
    B, L, kw = _context(ctx_name)
    spec = resolve_spec(SPECS[spec_name])
    ctx = build_context(B, L, L, "cuda", **kw)
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(B, h, L, D, device="cuda", generator=g) for h in (H, hkv, hkv)]
    q, k, v = (t.bfloat16().requires_grad_() for t in base)
    r = [t.double().requires_grad_() for t in base]
    out = run_backend(backend, q, k, v, spec, ctx, D ** -0.5)
    ref = run_backend("dense", *r, spec, ctx, D ** -0.5)
    w = torch.randn(ref.shape, device="cuda", generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), r)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert _rel(out, ref) < REL, (backend, spec_name, ctx_name, _rel(out, ref))
    for name, a, b in zip("qkv", grads, ref_grads):
        assert _rel(a, b) < REL, (backend, spec_name, ctx_name, f"d{name}", _rel(a, b))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("spec_name", ["s2", "sf4", "win4"])
@pytest.mark.parametrize("ctx_name", ["odd", "packed"])
def test_sdpa_groups_gpu_path_bf16(spec_name, ctx_name):
    """Grouped SDPA off the CPU: reshaped groups with is_causal (sinks prepended), else the
    gathered masked rows; bf16 with its backward."""
    _check("sdpa_groups", spec_name, ctx_name)


@pytest.mark.gpu
@CUDA
def test_sdpa_causal_bf16_and_gqa():
    _check("sdpa", "causal", "odd", hkv=1)
    _check("sdpa", "sf4", "packed")


@pytest.mark.gpu
@CUDA
def test_bf16_lora_plus_steps_lower_the_loss():
    """A few bf16 LoRA+ steps of a tiny SF-Attn model built the way training builds it."""
    from finetune.memory import loss_sum_and_outputs, shift_labels
    from finetune.model import build_model
    from finetune.recipe import validate

    r = validate({"run_dir": "runs/x", "seed": 0,
                  "model": {"config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259,
                                       "max_position_embeddings": 2048}, "tokenizer": "byte", "dtype": "bfloat16"},
                  "attention": {"pattern": "sf_attn", "num_sink_tokens": 4},
                  "data": {"seq_length": 1024}, "deepspeed": {"config": None},
                  "training": {"precision": "bf16"}})  # fmt: skip
    with torch.device("cuda"):
        model = build_model(r)
    model = model.cuda().train()
    assert next(model.parameters()).dtype == torch.bfloat16
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(0, 259, (1, 1024), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    inputs = {"input_ids": ids, "position_ids": torch.arange(1024, device="cuda")[None]}
    losses = []
    for _ in range(6):
        s, _ = loss_sum_and_outputs(model, inputs, shift_labels(ids), r.memory)
        loss = s / 1023
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


def _tiny_model(layout_layers, backend="auto"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernels.layout import install_layout

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=len(layout_layers),
                      num_attention_heads=H, num_key_value_heads=HKV, vocab_size=512,
                      max_position_embeddings=2048, attention_dropout=0.0)
    model = LlamaForCausalLM(cfg).cuda().bfloat16().train()
    install_layout(model.config, {"version": 1, "backend": backend, "cross_document": False,
                                  "layers": layout_layers})
    return model


@pytest.mark.gpu
@CUDA
def test_auto_backend_on_cuda_in_a_bf16_training_step(monkeypatch):
    """`auto` on CUDA: flash-attn (installed) or FlexAttention for SF-Attn and sink_window,
    SDPA for plain causal; the logits and the gradients equal the dense backend's."""
    from kernels.backends import flash
    from kernels.registry import kernel_calls, reset_kernel_calls

    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "1")
    layers = [SPECS["sf4"], SPECS["win4"], SPECS["causal"]]
    L = 640
    ids = torch.randint(0, 512, (1, L), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    runs = {}
    for backend in ("auto", "dense"):
        model = _tiny_model(layers, backend)
        reset_kernel_calls()
        out = model(input_ids=ids, position_ids=torch.arange(L, device="cuda")[None])
        out.logits.float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if "q_proj" in n}
        runs[backend] = (out.logits.detach(), grads, kernel_calls())
    sparse = "flash" if flash.available() else "flex"
    assert runs["auto"][2] == {("sf_attn", sparse): 1, ("sink_window", sparse): 1, ("causal", "sdpa"): 1}
    assert runs["dense"][2] == {("sf_attn", "dense"): 1, ("sink_window", "dense"): 1, ("causal", "dense"): 1}
    assert _rel(runs["auto"][0], runs["dense"][0]) < REL
    for n, g in runs["auto"][1].items():
        assert _rel(g, runs["dense"][1][n]) < 5e-2, n


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("spec_name", ["sf4", "win4"])
def test_compiled_block_mask_equals_eager(spec_name, monkeypatch):
    """On CUDA the block mask is built by a compiled create_block_mask (the eager one
    materialises Lq x Lk per head); it must be the eager one's, block for block."""
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels.backends import flex

    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "1")
    assert flex._create_block_mask("cuda") is not create_block_mask
    assert flex._create_block_mask("cpu") is create_block_mask
    spec = resolve_spec(SPECS[spec_name])
    L = 1000
    ctx = build_context(1, L, L, "cuda")
    heads = H if head_dependent(spec, H) else None
    flex.clear_cache()
    got = flex.block_mask(spec, ctx, H, L, L, "cuda")
    want = create_block_mask(mask_mod(spec, ctx, H), None, heads, L, L, device="cuda")
    assert torch.equal(got.to_dense(), want.to_dense())
    assert got.sparsity() > 0


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("spec_name,ctx_name", [("sf4", "packed"), ("win4", "odd")])
def test_flex_compiled_bf16_forward_backward(spec_name, ctx_name, monkeypatch):
    """FlexAttention through torch.compile on CUDA (the Triton kernels, forward and backward):
    SF-Attn with packed documents and padding, sink_window on a row not a multiple of 128 (block
    sparse: tests/test_backends.py; each case compiles its own kernels, so they are few)."""
    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "1")
    _check("flex", spec_name, ctx_name)


def test_flex_compile_switch_is_read_per_call(monkeypatch):
    """(Runs on CPU too.) The compiled block-mask builder is chosen per call from
    LONGTUNE_FLEX_COMPILE and the device: CPU always gets the eager one."""
    from torch.nn.attention.flex_attention import create_block_mask

    from kernels.backends import flex

    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "0")
    assert flex._create_block_mask("cuda") is create_block_mask
    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "1")
    assert flex._create_block_mask("cpu") is create_block_mask

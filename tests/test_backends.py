"""Every backend equals the dense reference (float64: outputs and q/k/v gradients).

Grid: lengths divisible and not by G, N <= G, batch > 1 with different padding, packed
documents, GQA ratios 1/2/4, sinks 0 and 4. FlexAttention runs eager and forward-only on CPU
(PyTorch has no CPU backward for it); one compiled case is marked slow. flash-attn cases need
CUDA and are marked gpu; its log-sum-exp merge is tested here on CPU with dense parts.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.backends import dense
from kernels.backends.merge import dense_part, merge_partials, merged_attention
from kernels.masks import build_context, dense_mask, resolve_spec
from kernels.registry import run_backend

os.environ.setdefault("LONGTUNE_FLEX_COMPILE", "0")
H, D, SCALE = 4, 8, 0.35

SPECS = {
    "s2": {"pattern": "s2_attn", "group_ratio": 0.25},
    "sf4": {"pattern": "sf_attn", "group_ratio": 0.25, "num_sink_tokens": 4},
    "sf4_q": {"pattern": "sf_attn", "group_ratio": 1 / 3, "shift_fraction": 0.25, "num_sink_tokens": 4},
    "sf_full": {"pattern": "sf_attn", "group_ratio": 1.0, "num_sink_tokens": 4},  # N <= G
    "win0": {"pattern": "sink_window", "window": 5, "num_sink_tokens": 0},
    "win4": {"pattern": "sink_window", "window": 6, "num_sink_tokens": 4},
    "win1": {"pattern": "sink_window", "window": 1, "num_sink_tokens": 2},
    "win_all": {"pattern": "sink_window", "window": 64, "num_sink_tokens": 4},  # window >= N
    "block": {"pattern": "block_sparse", "block_size": 4, "local_blocks": 2, "stride": 3},
    "causal": {"pattern": "causal"},
}


def _context(name):
    """(B, L, kwargs for build_context)."""
    if name == "div":  # L divisible by G (16 * 1/4)
        return 1, 16, {}
    if name == "odd":
        return 2, 23, {}
    if name == "pad":  # row 0 right-padded, row 1 left-padded: different real lengths
        am = torch.ones(2, 21, dtype=torch.bool)
        am[0, 17:] = False
        am[1, :6] = False
        return 2, 21, {"attention_mask": am}
    if name == "long":  # long enough that SF's first (shifted) group holds the 4 sinks
        return 1, 45, {}
    if name == "long_pad":  # same, padded on either side
        am = torch.ones(2, 50, dtype=torch.bool)
        am[0, 41:] = False
        am[1, :7] = False
        return 2, 50, {"attention_mask": am}
    if name == "packed":
        pos = torch.stack([torch.cat([torch.arange(9), torch.arange(15)]),
                           torch.cat([torch.arange(5), torch.arange(11), torch.arange(8)])])
        return 2, 24, {"position_ids": pos}
    if name == "packed_pad":
        pos = torch.cat([torch.arange(7), torch.arange(10), torch.arange(3)]).unsqueeze(0).expand(2, -1)
        am = torch.ones(2, 20, dtype=torch.bool)
        am[1, 14:] = False
        return 2, 20, {"position_ids": pos, "attention_mask": am}
    raise KeyError(name)


def _inputs(B, L, hkv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, L, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(H), mk(hkv), mk(hkv)


def _run(backend, spec, ctx_name, hkv, grads=True):
    B, L, kw = _context(ctx_name)
    spec = resolve_spec(spec)
    ctx = build_context(B, L, L, "cpu", **kw)
    q, k, v = _inputs(B, L, hkv)
    ref = run_backend("dense", q, k, v, spec, ctx, SCALE)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    ref_g = torch.autograd.grad((ref * w).sum(), (q, k, v))
    if not grads:
        with torch.no_grad():
            out = run_backend(backend, q, k, v, spec, ctx, SCALE)
        return out, ref, None, None
    out = run_backend(backend, q, k, v, spec, ctx, SCALE)
    got_g = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out, ref, got_g, ref_g


CTXS = ["div", "odd", "pad", "packed", "packed_pad"]


@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("ctx_name", CTXS)
@pytest.mark.parametrize("spec_name", ["s2", "sf4", "sf4_q", "sf_full", "win0", "win4", "win1", "win_all"])
def test_sdpa_groups_matches_dense(spec_name, ctx_name, hkv):
    out, ref, g, rg = _run("sdpa_groups", SPECS[spec_name], ctx_name, hkv)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("ctx_name", CTXS)
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_sdpa_matches_dense(spec_name, ctx_name, hkv):
    out, ref, g, rg = _run("sdpa", SPECS[spec_name], ctx_name, hkv)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("ctx_name,hkv", [("div", 2), ("pad", 1), ("packed", 4)])
@pytest.mark.parametrize("spec_name", ["sf4", "win4", "block"])
def test_flex_eager_matches_dense(spec_name, ctx_name, hkv):
    out, ref, _, _ = _run("flex", SPECS[spec_name], ctx_name, hkv, grads=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_flex_compiled_cpu_forward(monkeypatch):
    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "1")
    B, L = 1, 128
    spec = resolve_spec(SPECS["win4"])
    ctx = build_context(B, L, L, "cpu")
    q, k, v = (t.detach().float() for t in _inputs(B, L, 2))
    with torch.no_grad():
        out = run_backend("flex", q, k, v, spec, ctx, SCALE)
        ref = run_backend("dense", q.double(), k.double(), v.double(), spec, ctx, SCALE)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_roll_mode_backends_agree_with_dense():
    """The grouped backends refuse roll mode; the masked SDPA path reproduces it exactly."""
    from kernels.backends import sdpa_groups

    spec = resolve_spec({"pattern": "s2_attn", "wrap": "roll"})
    ctx = build_context(1, 16, 16, "cpu")
    assert not sdpa_groups.supports(spec, ctx)
    out, ref, g, rg = _run("sdpa", spec, "div", 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("spec_name", ["sf4", "win4"])
@pytest.mark.parametrize("backend", ["sdpa_groups", "sdpa"])
def test_float32_error_within_reference_error(backend, spec_name):
    """docs/kernels.md, Tests: candidate (fp32) vs float64 reference within a few times the reference's own
    fp32 error."""
    B, L, kw = _context("pad")
    spec = resolve_spec(SPECS[spec_name])
    ctx = build_context(B, L, L, "cpu", **kw)
    q, k, v = (t.detach() for t in _inputs(B, L, 2))
    ref64 = run_backend("dense", q, k, v, spec, ctx, SCALE)
    ref32 = run_backend("dense", q.float(), k.float(), v.float(), spec, ctx, SCALE).double()
    got = run_backend(backend, q.float(), k.float(), v.float(), spec, ctx, SCALE).double()
    assert (got - ref64).abs().max() <= 4 * (ref32 - ref64).abs().max() + 1e-6


# ---------------------------------------------------------------- LSE merge (flash's sinks)
@pytest.mark.parametrize("hkv", [4, 2])
def test_lse_merge_of_disjoint_parts_equals_dense(hkv):
    """Window part + sink part merged by log-sum-exp, with the ring-attention backward."""
    B, L = 2, 19
    spec = resolve_spec(SPECS["win4"])
    ctx = build_context(B, L, L, "cpu")
    full = dense_mask(spec, ctx, H)
    t = torch.arange(L)
    window = full & ((t[:, None] - t[None, :]) < spec["window"])
    sinks = full & ~window
    q, k, v = _inputs(B, L, hkv)
    ref = dense.attention_with_lse(q, k, v, full, SCALE)[0]
    w = torch.randn(ref.shape, dtype=ref.dtype)
    rg = torch.autograd.grad((ref * w).sum(), (q, k, v))
    out = merged_attention(q, [(k, v, dense_part(window, SCALE)), (k, v, dense_part(sinks, SCALE))])
    g = torch.autograd.grad((out * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # the plain merge helper agrees too (and rows with no keys in one part are handled)
    o1, l1, _ = dense.attention_with_lse(q, k, v, window, SCALE)
    o2, l2, _ = dense.attention_with_lse(q, k, v, sinks, SCALE)
    torch.testing.assert_close(merge_partials([o1, o2], [l1, l2])[0], ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- GPU (flash-attn, compiled flex)
def _flash_ok():
    if not torch.cuda.is_available():
        return False
    from kernels.backends import flash

    return flash.available()


@pytest.mark.gpu
@pytest.mark.skipif(not _flash_ok(), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("spec_name", ["s2", "sf4", "sf4_q", "win0", "win4", "causal"])
@pytest.mark.parametrize("ctx_name", ["odd", "pad", "packed"])
def test_flash_matches_dense_gpu(spec_name, ctx_name):
    B, L, kw = _context(ctx_name)
    kw = {k_: v_.cuda() for k_, v_ in kw.items()}
    spec = resolve_spec(SPECS[spec_name])
    ctx = build_context(B, L, L, "cuda", **kw)
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in _inputs(B, L, 2))
    out = run_backend("flash", q, k, v, spec, ctx, SCALE)
    ref = run_backend("dense", *(t.detach().double().requires_grad_() for t in (q, k, v)), spec, ctx, SCALE)
    assert (out.double() - ref).abs().max() < 2e-2
    out.float().sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_eager_gpu_with_grad(monkeypatch):
    """Eager FlexAttention on CUDA, fp32, head_dim 8; the compiled kernels are tested in bf16 at
    head_dim 64 in tests/test_gpu.py."""
    monkeypatch.setenv("LONGTUNE_FLEX_COMPILE", "0")
    B, L = 1, 256
    spec = resolve_spec(SPECS["block"])
    ctx = build_context(B, L, L, "cuda")
    q, k, v = (t.detach().cuda().float().requires_grad_() for t in _inputs(B, L, 2))
    out = run_backend("flex", q, k, v, spec, ctx, SCALE)
    ref = run_backend("dense", q.double(), k.double(), v.double(), spec, ctx, SCALE)
    assert (out.double() - ref).abs().max() < 1e-4
    out.sum().backward()


@pytest.mark.parametrize("window,chunk", [(7, 1), (7, 2), (7, 3), (7, 5), (8, 4), (6, 3), (2, 1)])
@pytest.mark.parametrize("ctx_name,hkv", [("odd", 2), ("pad", 1), ("div", 4)])
@pytest.mark.parametrize("sinks", [0, 4])
def test_sink_window_chunking_matches_dense(window, chunk, ctx_name, hkv, sinks):
    """The CPU window paths: general (first rows masked band, later rows masked triangle +
    unmasked rest) and aligned (window = 2 * chunk, key blocks are views), with sinks."""
    from kernels.backends import sdpa_groups

    B, L, kw = _context(ctx_name)
    spec = resolve_spec({"pattern": "sink_window", "window": window, "num_sink_tokens": sinks})
    ctx = build_context(B, L, L, "cpu", **kw)
    q, k, v = _inputs(B, L, hkv)
    ref = run_backend("dense", q, k, v, spec, ctx, SCALE)
    out = sdpa_groups.forward(q, k, v, spec, ctx, SCALE, chunk=chunk)
    w = torch.randn(ref.shape, dtype=ref.dtype)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec_name", ["s2", "sf4", "sf4_q", "win0", "win4", "win1"])
@pytest.mark.parametrize("ctx_name,hkv", [("div", 4), ("odd", 2), ("long", 2), ("long_pad", 1), ("long_pad", 4)])
def test_cpu_block_plan_runs_and_splits_calls(monkeypatch, spec_name, ctx_name, hkv):
    """One-document rows (padded or not) take the CPU block plan (strided views, one autograd
    Function), not the masked fallback; window chunks split over several kernel calls still
    match dense (ROWS_PER_CALL shrunk so these short rows split too)."""
    from kernels.backends import cpu_blocks, sdpa_groups

    runs = []
    real_run = cpu_blocks.run
    monkeypatch.setattr(cpu_blocks, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    monkeypatch.setattr(sdpa_groups, "_rows_attention", None)  # the masked path must not run
    monkeypatch.setattr(cpu_blocks, "ROWS_PER_CALL", 2)
    if spec_name.startswith("sf") and not ctx_name.startswith("long"):
        pytest.skip("a shifted first group shorter than the sinks takes the masked path")
    out, ref, g, rg = _run("sdpa_groups", SPECS[spec_name], ctx_name, hkv)
    assert runs == [1]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_lse_merge_in_bf16_keeps_dtypes_and_accuracy():
    """The flash path merges bf16 flash output with a dense sink part: math in float32."""
    B, L = 1, 16
    spec = resolve_spec(SPECS["win4"])
    full = dense_mask(spec, build_context(B, L, L, "cpu"), H)
    t = torch.arange(L)
    window = full & ((t[:, None] - t[None, :]) < spec["window"])
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in _inputs(B, L, 2))
    out = merged_attention(q, [(k, v, dense_part(window, SCALE)), (k, v, dense_part(full & ~window, SCALE))])
    out.float().sum().backward()
    assert out.dtype == q.grad.dtype == k.grad.dtype == torch.bfloat16
    ref = dense.attention_with_lse(q.double(), k.double(), v.double(), full, SCALE)[0]
    assert (out.double() - ref).abs().max() < 2e-2


# ---------------------------------------------------------------- flash.py's logic on CPU
def _fake_flash_modules():
    """A CPU stand-in for flash-attn's varlen API (dense math on the same (T, H, D) layout), so
    the cu_seqlens cuts, sink merge and scatter of backends/flash.py are tested without a GPU."""
    import types

    def mask_of(cu, T, causal, left, device):
        seg = torch.bucketize(torch.arange(T, device=device), cu[1:].long(), right=True)
        i, j = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
        m = seg[:, None] == seg[None, :]
        if causal:
            m &= j <= i
        if left >= 0:
            m &= i - j <= left
        return m[None, None]

    def lay(x):  # (T, H, D) -> (1, H, T, D)
        return x.transpose(0, 1).unsqueeze(0)

    def varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
        m = mask_of(cu_q, q.shape[0], causal, window_size[0], q.device)
        return dense.attention_with_lse(lay(q), lay(k), lay(v), m, softmax_scale)[0][0].transpose(0, 1)

    def fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False):
        m = mask_of(cu_seqlens_q, q.shape[0], causal, window_size_left, q.device)
        out, lse, _ = dense.attention_with_lse(lay(q), lay(k), lay(v), m, softmax_scale)
        return out[0].transpose(0, 1), lse[0], None, None

    def bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
            alibi_slopes=None, deterministic=False, rng_state=None):
        m = mask_of(cu_seqlens_q, q.shape[0], causal, window_size_left, q.device)
        g = dense.attention_backward(lay(dout), lay(q), lay(k), lay(v), m, softmax_scale, lay(out),
                                     softmax_lse.unsqueeze(0))
        for dst, src in zip((dq, dk, dv), g):
            dst.copy_(src[0].transpose(0, 1))

    pkg = types.ModuleType("flash_attn")
    pkg.flash_attn_varlen_func = varlen_func
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_varlen_forward = fwd
    iface._flash_attn_varlen_backward = bwd
    pkg.flash_attn_interface = iface
    return {"flash_attn": pkg, "flash_attn.flash_attn_interface": iface}


@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("ctx_name", ["odd", "pad", "packed", "packed_pad"])
@pytest.mark.parametrize("spec_name", ["s2", "sf4", "sf4_q", "sf_full", "win0", "win4", "causal"])
def test_flash_backend_logic_with_cpu_stand_in(monkeypatch, spec_name, ctx_name, hkv):
    import sys

    for name, mod in _fake_flash_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    out, ref, g, rg = _run("flash", SPECS[spec_name], ctx_name, hkv)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)

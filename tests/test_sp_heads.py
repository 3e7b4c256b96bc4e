"""Attention on a slice of the heads (what a rank holds after Ulysses' all-to-all) equals the
same slice of full-head attention, for every pattern and CPU backend, against the dense
reference in float64. The shifted heads of S2/SF-Attn and block_sparse's strides go by the
GLOBAL head index: a slice attended with local indices would differ (checked too)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kernels import registry
from kernels.backends import dense
from kernels.heads import HeadSlice, localize
from kernels.masks import build_context, dense_mask

os.environ.setdefault("LONGTUNE_FLEX_COMPILE", "0")

SPECS = {
    "causal": {"pattern": "causal"},
    "s2_attn": {"pattern": "s2_attn", "group_ratio": 0.25, "shift_fraction": 0.5, "num_sink_tokens": 0},
    "sf_attn": {"pattern": "sf_attn", "group_ratio": 0.25, "shift_fraction": 0.5, "num_sink_tokens": 3},
    "sf_attn_odd": {"pattern": "sf_attn", "group_ratio": 0.25, "shift_fraction": 0.375, "num_sink_tokens": 2},
    "sink_window": {"pattern": "sink_window", "window": 7, "num_sink_tokens": 2},
    "block_sparse": {"pattern": "block_sparse", "block_size": 4, "local_blocks": 2, "stride": 3, "head_step": 1},
    "block_sparse_default_step": {"pattern": "block_sparse", "block_size": 4, "local_blocks": 1, "stride": 16},
}
BACKENDS = ["dense", "sdpa", "sdpa_groups", "flex"]


def module(H, spec, backend, training=True):
    layout = {"version": 1, "backend": backend, "cross_document": False, "layers": [dict(spec)]}
    cfg = SimpleNamespace(num_attention_heads=H, longtune_attention=layout)
    return SimpleNamespace(config=cfg, layer_idx=0, training=training)


def reference(q, k, v, spec, position_ids):
    """Full-head dense attention in float64: (B, H, L, D)."""
    B, H, L, D = q.shape
    ctx = build_context(B, L, L, q.device, position_ids=position_ids)
    rep = H // k.shape[1]
    return dense.attention_with_lse(q.double(), k.double().repeat_interleave(rep, 1),
                                    v.double().repeat_interleave(rep, 1), dense_mask(spec, ctx, H), D ** -0.5)[0]


def packed_positions(L):
    # three documents: 0..9, 0..12, 0..L-24
    return torch.cat([torch.arange(10), torch.arange(13), torch.arange(L - 23)]).unsqueeze(0)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,HKV,P", [(8, 8, 2), (8, 2, 4), (8, 1, 4)])
def test_head_slice_equals_full_head_slice(name, backend, H, HKV, P):
    spec = SPECS[name]
    torch.manual_seed(0)
    B, L, D = 2, 40, 8
    q = torch.randn(B, H, L, D)
    k, v = torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    pos = packed_positions(L).expand(B, -1) if name in ("sf_attn", "block_sparse", "causal") else None
    ref = reference(q, k, v, spec, pos)
    grad = backend != "flex"  # FlexAttention has no CPU backward (forward only there)
    local = H // P
    kv_local = max(1, HKV // P)
    try:
        for r in range(P):
            registry.set_head_offset(lambda n, r=r: r * n)
            qs = q[:, r * local:(r + 1) * local].clone().requires_grad_(grad)
            if HKV >= P:
                ks, vs = (x[:, r * kv_local:(r + 1) * kv_local] for x in (k, v))
            else:  # replicated KV heads: rank r gets KV head r // (P / HKV), as Ulysses sends it
                g = r // (P // HKV)
                ks, vs = k[:, g:g + 1], v[:, g:g + 1]
            ks, vs = ks.clone().requires_grad_(grad), vs.clone().requires_grad_(grad)
            kw = {} if pos is None else {"position_ids": pos}
            out, _ = registry.longtune_attention_forward(module(H, spec, backend), qs, ks, vs, None, **kw)
            torch.testing.assert_close(out.transpose(1, 2).double(), ref[:, r * local:(r + 1) * local],
                                       atol=2e-5, rtol=1e-4, msg=f"rank {r}")
            if grad:
                out.sum().backward()
                assert torch.isfinite(qs.grad).all()
    finally:
        registry.set_head_offset(None)


@pytest.mark.parametrize("name", ["sf_attn", "block_sparse"])
def test_local_head_index_would_differ(name):
    """The check above can fail: the same slice attended as if its heads were 0..local-1."""
    spec = SPECS[name]
    torch.manual_seed(1)
    H, P, L, D = 8, 2, 40, 8
    q, k, v = torch.randn(1, H, L, D), torch.randn(1, H, L, D), torch.randn(1, H, L, D)
    ref = reference(q, k, v, spec, None)
    r, local = 1 if name == "block_sparse" else 0, H // P
    sl = slice(r * local, (r + 1) * local)
    ctx = build_context(1, L, L, q.device)
    wrong = dense.attention_with_lse(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(),
                                     dense_mask(spec, ctx, local), D ** -0.5)[0]
    assert (wrong - ref[:, sl]).abs().max() > 1e-3


def test_localize_keeps_shifted_suffix():
    spec = {"pattern": "sf_attn", "group_ratio": 0.25, "shift_fraction": 0.375, "wrap": "none", "num_sink_tokens": 4}
    # 8 heads, 3 shifted (5, 6, 7): slices of 2 hold 0, 0, 1, 2 of them
    got = [localize(spec, HeadSlice(o, 2, 8))[0]["shift_fraction"] for o in (0, 2, 4, 6)]
    assert got == [0.0, 0.0, 0.5, 1.0]
    assert localize(spec, None) == (spec, None)


def test_slice_without_offset_hook_is_an_error():
    registry.set_head_offset(None)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="head offset"):
        registry.longtune_attention_forward(module(4, SPECS["causal"], "sdpa"), q, q, q, None)

"""kernels/backends/lse.py: fused causal attention + row log-sum-exp against the dense reference."""

import pytest
import torch

from kernels.backends import dense, lse
from kernels.masks import build_context, dense_mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,length", [(4, 2, 37), (3, 3, 300), (6, 1, 5)])
def test_causal_attention_with_lse_matches_dense(dtype, heads, kv_heads, length):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, length, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, 16, generator=g, dtype=torch.float64)
    mask = dense_mask({"pattern": "causal"}, build_context(2, length, length, q.device), heads)
    want_out, want_lse, _ = dense.attention_with_lse(q, k, v, mask, 0.3)  # float64 reference
    out, row_lse = lse.causal_attention_with_lse(q.to(dtype), k.to(dtype), v.to(dtype), 0.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and row_lse.shape == (2, heads, length)
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(row_lse.double(), want_lse, atol=tol, rtol=tol)

"""kernels/backends/column_sums.py: one-pass causal attention + each key's summed probability,
against the float64 dense reference (backends/dense.py on kernels.masks' causal mask)."""

import pytest
import torch

from kernels.backends import column_sums, dense
from kernels.masks import build_context, dense_mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "heads,kv_heads,length,pads", [(4, 2, 70, (0, 0)), (3, 3, 45, (0, 17)), (6, 1, 9, (3, 9))]
)
def test_matches_the_dense_reference(dtype, heads, kv_heads, length, pads, monkeypatch):
    """Outputs and column sums equal the dense softmax's (several row blocks per call, GQA,
    batch 2, left-padded rows: padding rows give 0 and add nothing, a fully padded row too)."""
    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 4 * heads * length)  # rows per block: 4..8
    monkeypatch.setattr(column_sums, "MIN_ROWS", 3)
    monkeypatch.setattr(column_sums, "MAX_ROWS", 8)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, length, 16, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, kv_heads, length, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, 12, generator=g, dtype=torch.float64)
    starts = torch.tensor(pads)
    real = torch.arange(length) >= starts[:, None]  # (2, L) left padding
    ctx = build_context(2, length, length, q.device, attention_mask=real.long())
    mask = dense_mask({"pattern": "causal"}, ctx, heads) & real.view(2, 1, length, 1)
    want_out, _, probs = dense.attention_with_lse(q, k, v, mask, 0.3)  # float64 reference
    want_out = want_out.masked_fill(~real.view(2, 1, length, 1), 0.0)
    out, sums = column_sums.causal_attention_with_column_sums(q.to(dtype), k.to(dtype), v.to(dtype), 0.3,
                                                              starts if any(pads) else None)  # fmt: skip
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and out.shape == (2, heads, length, 12) and sums.shape == (2, heads, length)
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(sums.double(), probs.sum(dim=2), atol=tol * 10, rtol=tol)
    assert not sums[~real.view(2, 1, length).expand_as(sums)].any()


def test_block_rows_follow_the_budget(monkeypatch):
    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 9 * 64 * 1000)
    assert column_sums.block_rows(9, 1000) == 64
    assert column_sums.block_rows(9, 10**6) == column_sums.MIN_ROWS
    assert column_sums.block_rows(9, 1) == column_sums.MAX_ROWS


def test_rejects_mismatched_shapes():
    q = torch.zeros(1, 4, 5, 8)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        column_sums.causal_attention_with_column_sums(
            q, torch.zeros(1, 3, 5, 8), torch.zeros(1, 3, 5, 8), 1.0
        )


def test_half_precision_inputs_are_upcast_once_and_left_untouched():
    """bfloat16 q/k/v: the same float32 work as on their upcast copies (out rounded back to
    bfloat16, sums float32), and the caller's tensors are not scaled in place."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 20, 8, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    before = [t.clone() for t in (q, k, v)]
    out, sums = column_sums.causal_attention_with_column_sums(q, k, v, 0.3, torch.tensor([0, 5]))
    want_out, want_sums = column_sums.causal_attention_with_column_sums(q.float(), k.float(), v.float(), 0.3,
                                                                        torch.tensor([0, 5]))  # fmt: skip
    assert out.dtype == torch.bfloat16 and sums.dtype == torch.float32
    torch.testing.assert_close(out, want_out.to(torch.bfloat16), atol=0, rtol=0)
    torch.testing.assert_close(sums, want_sums, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))
    assert not out[1, :, :5].any()

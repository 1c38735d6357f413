"""The batched products of the range projection's active-set method (``Q x`` and ``Qᵀ x`` as row
vectors times ``Q``), against one matrix-vector product per row in float64, and the factors of
``_factor`` (masked in place) against the QR factorisation of each row's active normals."""

import pytest
import torch

from torchjd.linalg._range_projection import _factor, _product, _transposed_product


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("k", "r", "w"), [(1, 1, 1), (3, 7, 5), (5, 40, 40), (4, 9, 0), (2, 0, 3)])
def test_products_against_one_product_per_row(dtype: torch.dtype, k: int, r: int, w: int):
    g = torch.Generator().manual_seed(k * 100 + r + w)
    Q = torch.randn(k, r, w, generator=g, dtype=torch.float64)
    x = torch.randn(k, w, generator=g, dtype=torch.float64)
    y = torch.randn(k, r, generator=g, dtype=torch.float64)
    expected = torch.stack([torch.mv(Q[i], x[i]) for i in range(k)]).reshape(k, r)
    expected_t = torch.stack([torch.mv(Q[i].T, y[i]) for i in range(k)]).reshape(k, w)
    got = _product(Q.to(dtype), x.to(dtype))
    got_t = _transposed_product(Q.to(dtype), y.to(dtype))
    assert got.shape == (k, r)
    assert got_t.shape == (k, w)
    assert got.dtype == got_t.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = max(1.0, r, w)
    torch.testing.assert_close(got.double(), expected, rtol=0.0, atol=rtol * scale)
    torch.testing.assert_close(got_t.double(), expected_t, rtol=0.0, atol=rtol * scale)


def test_factor_against_qr_of_each_row():
    g = torch.Generator().manual_seed(0)
    m, r, width = 12, 8, 6
    ell = torch.randn(m, r, generator=g, dtype=torch.float64)
    padded = torch.cat([ell, torch.zeros(1, r, dtype=torch.float64)])
    q = torch.tensor([0, 3, 6, 1])
    slots = torch.stack([torch.randperm(m, generator=g)[:width] for _ in q])
    slots = torch.where(torch.arange(width) < q.unsqueeze(1), slots, m)
    Q, R = _factor(padded, slots, q)
    for i, size in enumerate(q.tolist()):
        normals = ell[slots[i, :size]].T  # [r, size]
        torch.testing.assert_close(Q[i, :, :size] @ R[i, :size, :size], normals)
        torch.testing.assert_close(Q[i, :, :size].T @ Q[i, :, :size], torch.eye(size).double())
        assert torch.equal(Q[i, :, size:], torch.zeros(r, width - size, dtype=torch.float64))
        eye = torch.eye(width, dtype=torch.float64)
        assert torch.equal(R[i, size:, :], eye[size:])
        assert torch.equal(R[i, :size, size:], torch.zeros(size, width - size).double())
        assert torch.equal(R[i].triu(), R[i])

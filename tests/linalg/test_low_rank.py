"""Woodbury solves of the interior point on a low-rank Gramian, against dense references."""

import pytest
import torch

from tests.reference.matrices import make
from torchjd.linalg import _low_rank
from torchjd.linalg._interior_point import interior_point
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._low_rank import low_rank_factor, woodbury_factor, woodbury_solvers
from torchjd.linalg._spanning import range_factor


@pytest.mark.parametrize(("m", "rank"), [(6, 2), (20, 5), (40, 39)])
def test_low_rank_factor_reproduces_the_gramian(m: int, rank: int):
    A = make("normal", m, rank, seed=m)
    G = A @ A.T
    L = low_rank_factor(G, max_rank=m)
    assert L.shape == (m, rank)
    torch.testing.assert_close(L @ L.T, G, rtol=0, atol=1e-12 * G.abs().max())


def test_low_rank_factor_refuses_a_rank_above_the_bound():
    A = make("normal", 10, 6, seed=0)
    assert low_rank_factor(A @ A.T, max_rank=5) is None


@pytest.mark.parametrize("products", [True, False])
@pytest.mark.parametrize(("m", "r", "log_spread"), [(12, 4, 0.0), (12, 4, 8.0), (30, 20, 8.0)])
def test_woodbury_solver_matches_a_dense_solve(
    m: int, r: int, log_spread: float, products: bool, monkeypatch: pytest.MonkeyPatch
):
    # Both ways of forming the capacitance matrices: from the products l_j l_jᵀ formed once, and
    # (beyond their memory budget) by a batch of matrix products.
    if not products:
        monkeypatch.setattr(_low_rank, "_PRODUCTS_ENTRIES", m * r * (r + 1) // 2 - 1)
    g = torch.Generator().manual_seed(m)
    k = 5
    L = torch.randn(m, r, generator=g, dtype=torch.float64)
    delta = 10 ** (log_spread * (torch.rand(k, m, generator=g, dtype=torch.float64) - 0.5))
    b = torch.randn(k, m, generator=g, dtype=torch.float64)
    K = torch.diag_embed(delta) + 2 * L @ L.T
    expected = torch.linalg.solve(K, b.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(woodbury_solvers(L)(delta)(b), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", ["rank_deficient", "duplicate_rows", "mixed_row_norms"])
def test_interior_point_with_woodbury_solves_meets_its_tolerance(family: str):
    J = make(family, 30, 6, seed=1)
    G = J @ J.T / (J * J).sum()
    t = 1e-8 * G.diagonal()
    G_t = G + torch.diag(t)
    U = torch.eye(30, dtype=torch.float64)
    V = interior_point(G_t, U, 1e-10, low_rank=(low_rank_factor(G, 15), t))
    assert (V >= U).all()
    assert kkt_residual(G_t, U, V, V @ G_t).max() <= 1e-8


def _float32_gramian(m: int, rank: int, log_spread: float) -> torch.Tensor:
    """A float32 Gramian of rank ``rank`` whose rows' norms spread over ``log_spread`` decades,
    in float64."""
    A = make("normal", m, rank, seed=m)
    A = A * torch.logspace(0.0, -log_spread, m, dtype=A.dtype).unsqueeze(1)
    A32 = A.float()
    return (A32 @ A32.T).double()


@pytest.mark.parametrize(("m", "rank"), [(40, 12), (80, 30)])
def test_woodbury_factor_of_a_float32_gramian_keeps_its_small_rows(m: int, rank: int):
    G = _float32_gramian(m, rank, 8.0)
    factor = range_factor(G, torch.float32)
    assert factor is not None
    L = woodbury_factor(G, m, torch.float32, factor)
    assert L is not None
    assert L.shape == (m, rank)
    # Entry by entry, at the rounding of float32 relative to the rows' norms (the small rows
    # included, whose entries are 10⁻¹⁶ of the largest).
    norms = G.diagonal().sqrt()
    error = (L @ L.T - G).abs() / (norms.unsqueeze(1) * norms)
    assert float(error.max()) <= 1e-5


def test_woodbury_factor_refuses_a_rank_above_the_bound():
    G = _float32_gramian(30, 12, 4.0)
    factor = range_factor(G, torch.float32)
    assert woodbury_factor(G, 11, torch.float32, factor) is None
    assert woodbury_factor(G, 12, torch.float32, factor) is not None


def test_woodbury_factor_of_a_float64_gramian_is_low_rank_factor():
    A = make("normal", 20, 5, seed=3)
    G = A @ A.T
    factor = range_factor(G, torch.float64)
    L = woodbury_factor(G, 20, torch.float64, factor)
    assert L is not None
    torch.testing.assert_close(L, low_rank_factor(G, 20), rtol=0, atol=0)

"""Woodbury solves of the interior point on a low-rank Gramian, against dense references."""

import pytest
import torch

from tests.reference.matrices import make
from torchjd.linalg import _low_rank
from torchjd.linalg._interior_point import interior_point
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._low_rank import low_rank_factor, woodbury_solvers


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

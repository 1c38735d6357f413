"""Exact mode when the rows of ``J`` positively span a subspace (zero update): the least-norm
weights by the Newton method of ``_spanning``, against quadprog on the least-energy problem."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import least_energy_optimum
from torchjd.linalg import _bounded_qp, _spanning
from torchjd.linalg._bounded_qp import solve_lower_bounded_qp
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._spanning import _RIDGE, _newton_factor, zero_update_weights


def spanning_jacobian(m: int, rank: int, n: int, log_spread: float, seed: int) -> torch.Tensor:
    """``m`` Gaussian rows in a ``rank``-dimensional subspace of ``R^n`` (with ``m ≫ rank`` they
    positively span it), norms spread over ``log_spread`` decades, a zero row and a duplicate."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank, generator=g, dtype=torch.float64)
    J = J @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    J = J * 10 ** (log_spread * (torch.rand(m, 1, generator=g, dtype=torch.float64) - 0.5))
    J[0] = 0.0
    J[1] = J[2]
    return J


def assert_least_energy(J: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> None:
    """Each row of ``V`` is the optimum of least ``Σ_j ‖J_j‖² v_j²`` among the weights with a zero
    update (quadprog, on the column space of ``J`` from its SVD)."""
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        expected = least_energy_optimum(J.numpy(), u, np.zeros_like(u))
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@settings(max_examples=8)
@given(
    rank=st.integers(1, 3),
    extra=st.integers(0, 12),
    log_spread=st.floats(0, 4),
    seed=st.integers(0, 2**16),
)
def test_least_energy_weights_against_quadprog(rank: int, extra: int, log_spread: float, seed: int):
    """(``m ≥ 12 r + 4`` Gaussian rows span their ``r``-dimensional subspace positively but with
    a probability below 10⁻³, by Wendel's theorem.)"""
    m = 12 * rank + 4 + extra
    J = spanning_jacobian(m, rank, 2 * rank + 1, log_spread, seed)
    G = J @ J.T
    g = torch.Generator().manual_seed(seed)
    U = torch.rand(5, m, generator=g, dtype=torch.float64) * (torch.rand(5, m, generator=g) < 0.3)
    result = zero_update_weights(G, U, 1e-9, torch.float64)
    assert result is not None
    V, converged = result
    assert converged.all()
    assert (V >= U).all()
    assert kkt_residual(G, U, V, V @ G).max() <= 1e-9
    assert_least_energy(J, U, V)


def test_refuses_a_cone_that_is_not_a_subspace():
    """Rows with a common direction (all in an open half-space) and a full-rank ``G``."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(30, 3, generator=g, dtype=torch.float64)
    J[:, 0] = J[:, 0].abs() + 0.1
    U = torch.eye(30, dtype=torch.float64)
    assert zero_update_weights(J @ J.T, U, 1e-9, torch.float64) is None
    J = torch.randn(30, 40, generator=g, dtype=torch.float64)
    assert zero_update_weights(J @ J.T, U, 1e-9, torch.float64) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_mode_beyond_64_rows(dtype: torch.dtype):
    """Through the exact mode's route (``m > 64``): KKT on ``G`` itself, a zero update, and the
    least-energy weights."""
    m = 80
    J = spanning_jacobian(m, 6, 20, 2.0, seed=1)
    G = (J @ J.T).to(dtype)
    U = torch.eye(m, dtype=dtype)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    G64, U64, V64 = G.double(), U.double(), V.double()
    assert (V >= U).all()
    assert kkt_residual(G64, U64, V64, V64 @ G64).max() <= tol
    if dtype == torch.float64:
        assert_least_energy(J, U[:10], V[:10])


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_rows_of_spread_norms_keep_their_zero_update(
    monkeypatch: pytest.MonkeyPatch, seed: int
):
    """In float32, with row norms over six decades (the small rows get weights 10⁵ times their
    bound), the rounding of ``G`` alone puts the Newton weights above the tolerance on ``G``; they
    are kept (no row goes to the pivoting route), and their update barely conflicts with any row
    (in float64, from the float32 rows: 40 times less than the pivoting route's answer)."""
    J = spanning_jacobian(100, 10, 30, 6.0, seed).float()
    G, U = J @ J.T, torch.eye(100)

    def no_pivoting(*args: object) -> None:
        raise AssertionError("rows left to the pivoting route")

    monkeypatch.setattr(_bounded_qp, "_pivoting_route", no_pivoting)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert (V >= U).all()
    J64 = J.double()
    norms = J64.norm(dim=1)
    conflicts = (J64 @ (J64.T @ V.double().T)) / (norms * norms.max()).clamp_min(1e-300)[:, None]
    assert conflicts.min() >= -5e-7


@pytest.mark.parametrize("fraction_free", [0.2, 0.8])
def test_newton_factor_against_a_dense_product(fraction_free: float):
    """Both sides of the formation (``ℓ_Fᵀℓ_F`` gathered, or ``ℓᵀℓ − ℓ_Aᵀℓ_A``) against the
    masked dense product."""
    g = torch.Generator().manual_seed(0)
    m, r, k = 30, 6, 5
    ell = torch.randn(m, r, generator=g, dtype=torch.float64)
    free = torch.rand(k, m, generator=g) < fraction_free
    factor = _newton_factor(ell, ell.T @ ell, free)
    expected = (ell.T * free.unsqueeze(1)) @ ell + _RIDGE[torch.float64] * m * torch.eye(r)
    torch.testing.assert_close(factor @ factor.mT, expected, rtol=1e-12, atol=1e-12)


def test_rows_in_chunks_match_one_batch(monkeypatch: pytest.MonkeyPatch):
    """Rows solved in chunks of 7 (with their factorisations compacted as rows finish) give the
    least-energy weights too."""
    m = 60
    J = spanning_jacobian(m, 3, 7, 3.0, seed=2)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)[:20]
    monkeypatch.setattr(_spanning, "_FACTOR_ENTRIES", 7 * 3**2)
    V, converged = zero_update_weights(G, U, 1e-9, torch.float64)
    assert converged.all()
    assert kkt_residual(G, U, V, V @ G).max() <= 1e-9
    assert_least_energy(J, U, V)

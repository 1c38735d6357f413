"""Exact mode when the rows of ``J`` positively span a subspace (zero update): the least-norm
weights by the Newton method of ``_spanning``, against quadprog on the least-energy problem."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.reference.dual_cone import least_energy_optimum
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import TorchProjector, _bounded_qp, _spanning
from torchjd.linalg._bounded_qp import solve_lower_bounded_qp
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._low_rank import pair_products
from torchjd.linalg._spanning import (
    _RIDGE,
    _newton_factor,
    _updated_solve,
    zero_update_weights,
)


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


@pytest.mark.parametrize("formation", ["gathered", "products", "chunks"])
@pytest.mark.parametrize("fraction_free", [0.3, 0.5, 0.9])
def test_newton_factor_against_a_dense_product(
    monkeypatch: pytest.MonkeyPatch, fraction_free: float, formation: str
):
    """The factors (``ℓ_Fᵀ ℓ_F`` gathered on the smaller side, from the products of the columns
    of ``ℓ`` formed once, or from those formed by blocks of rows of the triangle, of at most 12
    columns) against the masked dense product."""
    g = torch.Generator().manual_seed(0)
    m, r, k = 30, 6, 5
    if formation == "chunks":
        monkeypatch.setattr(_spanning, "_FACTOR_ENTRIES", 12 * m)
        monkeypatch.setattr(_spanning, "_FORMED_PRODUCTS_ROWS", 1)
    ell = torch.randn(m, r, generator=g, dtype=torch.float64)
    free = torch.rand(k, m, generator=g) < fraction_free
    free[:, :r] = True  # ℓ_Fᵀ ℓ_F well conditioned
    products = pair_products(ell) if formation == "products" else None
    factor = _newton_factor(ell, free, products)
    expected = (ell.T * free.unsqueeze(1)) @ ell + _RIDGE[torch.float64] * m * torch.eye(r)
    torch.testing.assert_close(factor @ factor.mT, expected, rtol=1e-12, atol=1e-12)
    assert (factor.triu(1) == 0).all()


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 8), changes=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_updated_solve_against_a_dense_solve(r: int, changes: int, seed: int):
    """The Woodbury update of a factorisation made on another free set (indices joining and
    leaving it, as many per row as drawn, none for some rows) against a solve with the dense
    ``ℓ_Fᵀ ℓ_F + ρ I``; rows whose update is singular come back non-finite, the others exact."""
    g = torch.Generator().manual_seed(seed)
    m, k = 24, 6
    ell = torch.randn(m, r, generator=g, dtype=torch.float64)
    factored_free = torch.rand(k, m, generator=g) < 0.7
    flips = torch.rand(k, m, generator=g).argsort(dim=1)[:, :changes]
    free = factored_free.clone()
    free[1:].scatter_(1, flips[1:], ~factored_free[1:].gather(1, flips[1:]))
    inverses = torch.cholesky_inverse(_newton_factor(ell, factored_free))
    gradient = torch.randn(k, r, generator=g, dtype=torch.float64)
    direction = _updated_solve(ell, inverses, factored_free, free, gradient)
    ridge = _RIDGE[torch.float64] * m * torch.eye(r, dtype=torch.float64)
    M = (ell.T * free.unsqueeze(1)) @ ell + ridge
    expected = torch.linalg.solve(M, gradient.unsqueeze(2)).squeeze(2)
    finite = torch.isfinite(direction).all(dim=1)
    assert finite[0]
    # Accurate to the conditioning of the new system (the ridge makes it at most ~1e13).
    scale = torch.linalg.cond(M).unsqueeze(1) * expected.abs().amax(dim=1, keepdim=True)
    error = (direction - expected).abs()[finite]
    assert (error <= 1e-14 * scale[finite] + 1e-12).all()


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


_SHAPES = {"rank": st.integers(1, 6), "ratio": st.floats(1.5, 3.5), "shift": st.floats(0.0, 0.6)}


@settings(max_examples=15, deadline=None)
@given(**_SHAPES, seed=st.integers(0, 2**16))
def test_spanning_decision_against_linprog(rank: int, ratio: float, shift: float, seed: int):
    """Whether the route answers (the rows positively span a subspace) against a linear program:
    some ``w ≥ 1`` with ``Jᵀ w = 0`` (HiGHS, through scipy). Gaussian rows, a few times more than
    their rank (spanning with a probability near one half), some shifted along a common direction
    (spanning less often); the route must answer exactly for those that span, with KKT on ``G``,
    and stop (None) for the others, by the certificate ``ℓ y ≤ 0`` or otherwise."""
    from scipy.optimize import linprog

    m = max(rank + 2, int(ratio * rank))
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank, generator=g, dtype=torch.float64)
    J[:, 0] += shift
    J = J @ torch.randn(rank, rank + 3, generator=g, dtype=torch.float64)
    G = J @ J.T
    J_np = J.numpy()
    program = linprog(np.zeros(m), A_eq=J_np.T, b_eq=np.zeros(J_np.shape[1]), bounds=(1, None))
    U = torch.eye(m, dtype=torch.float64)
    result = zero_update_weights(G, U, 1e-9, torch.float64)
    assert (result is not None) == (program.status == 0)
    if result is not None:
        V, converged = result
        assert (V >= U).all()
        assert kkt_residual(G, U[converged], V[converged], V[converged] @ G).max() <= 1e-9


def test_infeasible_unit_row_stops_at_the_certificate(monkeypatch: pytest.MonkeyPatch):
    """Rows in an open half-space (no positive span), of low rank: the ``u = 1`` problem stops
    within a few Newton steps, at an iterate with ``ℓ y ≤ 0``, instead of running all of them."""
    g = torch.Generator().manual_seed(3)
    J = torch.randn(40, 4, generator=g, dtype=torch.float64)
    J[:, 0] = J[:, 0].abs() + 0.5
    J = J @ torch.randn(4, 9, generator=g, dtype=torch.float64)
    steps = []
    line_search = _spanning._line_search

    def counted(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps.append(args[1].shape[0])
        return line_search(*args)

    monkeypatch.setattr(_spanning, "_line_search", counted)
    assert (
        zero_update_weights(J @ J.T, torch.eye(40, dtype=torch.float64), 1e-9, torch.float64)
        is None
    )
    newton_steps = len(steps) - _spanning._FEASIBILITY_SHARED_STEPS
    assert newton_steps < _spanning._NEWTON_STEPS


def _class_jacobian(t: Tensor, seed: int) -> Tensor:
    """40 rows on 5 class means that positively span a 4-dimensional subspace (every update is
    zero), the classes scaled by ``1 + t s_k``: they still span it, with weights that move with
    ``t``; row norms over a decade."""
    g = torch.Generator().manual_seed(seed)
    m = 40
    means = torch.randn(5, 3 * m, generator=g, dtype=torch.float64)
    means = means - means.mean(dim=0)
    classes = torch.randperm(m, generator=g) % 5
    scales = 10 ** (torch.rand(m, 1, generator=g, dtype=torch.float64) - 0.5)
    s = torch.randn(5, 1, generator=g, dtype=torch.float64)
    return (means * (1 + t * s))[classes] * scales


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_weighting_differentiates_through_spanning_rows(seed: int):
    """A tracked Gramian whose rows positively span a subspace: the Newton steps' factors are
    replaced out of place (an earlier solve saved them for the backward pass, which raised on
    seeds 0 and 1), and the gradient of the weights matches a central difference."""
    weighting = UPGradWeighting(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))
    c = torch.randn(40, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)

    def objective(t: Tensor) -> Tensor:
        J = _class_jacobian(t, seed)
        return c @ weighting(J @ J.T)

    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    objective(t).backward()
    h = torch.tensor(1e-6, dtype=torch.float64)
    with torch.no_grad():
        difference = (objective(h) - objective(-h)) / (2 * h)
    assert t.grad is not None
    torch.testing.assert_close(t.grad, difference, rtol=1e-6, atol=1e-9)

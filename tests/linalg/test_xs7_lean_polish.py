"""The exact mode's least-energy polish with fewer operations (``_range_projection._least_norm``:
the full Newton step tried before the line search, rows that stop kept in a small batch with
their multipliers fixed, the Newton systems of small factors as one product; the polish's rows
not checked again). Checked against quadprog's least-energy weights (an independent reference),
and against the same rows solved one at a time."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_least_energy_polish import assert_optimal_of_least_energy
from tests.linalg.test_range_projection import degenerate_jacobian, optimal_weights
from tests.linalg.test_xs5_least_energy import JACOBIANS, assert_least_energy, singular_jacobian
from torchjd.linalg import _bounded_qp, _range_projection
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _exact_unit_route
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._range_projection import least_energy_rows
from torchjd.linalg._spanning import _newton_factor, range_factor

TOL = LEAST_NORM_TOL[torch.float64]


def energies(J: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``Σ_j W_j v_j²`` of each row (``W``: squared row norms, zero rows 1e-6 of the largest)."""
    squared_norms = (J * J).sum(dim=1)
    weights = torch.where(squared_norms > 0, squared_norms, 1e-6 * squared_norms.max())
    return (weights * V * V).sum(dim=1)


def nnls_problem(m: int, rank: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``J`` (zero, duplicate and opposite rows: degenerate optima), ``G = J Jᵀ``, the unit rows
    and the optimal weights that NNLS gives them (optimal, seldom of least energy)."""
    J = degenerate_jacobian(m, rank, 3 * rank, seed)
    U = torch.eye(m, dtype=J.dtype)
    V = np.stack([optimal_weights(J.numpy(), u) for u in U.numpy()])
    return J, J @ J.T, U, torch.from_numpy(V)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(10, 24), rank=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_polish_reaches_quadprog_least_energy(m: int, rank: int, seed: int):
    # NNLS's optimal weights, polished: each row (of those meeting tol) optimal on G and no
    # heavier than quadprog's least-energy weights of its update (10⁻⁶ relative), where quadprog
    # concludes (on at least half of the rows); none heavier than before.
    J, G, U, V = nnls_problem(m, rank, seed)
    met = kkt_residual(G, U, V, V @ G) <= TOL
    polished = _bounded_qp._least_energy_polish(G, U, V, TOL)
    assert (energies(J, polished) <= energies(J, V) * (1 + 1e-12)).all()
    assert_optimal_of_least_energy(J, U[met], polished[met])


def test_polish_splits_duplicate_rows_evenly():
    # Rows 1 and 2 of J are equal: an optimum moved between them keeps its update, and the least
    # energy splits their weight evenly. The polish must undo an uneven split.
    J = degenerate_jacobian(16, 4, 12, seed=3)
    G = J @ J.T
    V = _exact_unit_route(G, TOL, 10_000)
    U = torch.eye(16, dtype=J.dtype)
    (rows,) = ((V[:, 1] > U[:, 1]) & (V[:, 2] > U[:, 2]) & (V[:, 1] + V[:, 2] > 0.1)).nonzero(
        as_tuple=True
    )
    assert rows.numel() > 0
    uneven = V.clone()
    shift = 0.5 * torch.minimum(V[rows, 1] - U[rows, 1], V[rows, 2] - U[rows, 2])
    uneven[rows, 1] += shift
    uneven[rows, 2] -= shift
    assert (energies(J, uneven[rows]) > energies(J, V[rows]) * (1 + 1e-6)).all()
    polished = _bounded_qp._least_energy_polish(G, U, uneven, TOL)
    torch.testing.assert_close(polished[rows, 1], polished[rows, 2], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(energies(J, polished[rows]), energies(J, V[rows]), rtol=1e-7, atol=0)


@settings(max_examples=8, deadline=None)
@given(m=st.integers(8, 24), **JACOBIANS)
def test_unit_rows_still_least_energy(
    m: int, columns: float, rank: float, features: list[bool], seed: int
):
    """UPGrad's rows through the whole exact route, with the polish's fewer operations: optimal,
    of least energy (certified by a linear program)."""
    J = singular_jacobian(m, columns, rank, features, seed)
    V = _exact_unit_route(J @ J.T, TOL, 10_000)
    assert_least_energy(J, torch.eye(m, dtype=J.dtype), V)


@settings(max_examples=6, deadline=None)
@given(m=st.integers(12, 30), rank=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_batched_rows_match_rows_alone(m: int, rank: int, seed: int):
    # The rows of a small batch stop at different Newton steps: those that stop stay in the batch
    # with their multipliers fixed. Each row comes out as it does alone (up to rounding).
    _, G, U, V = nnls_problem(m, rank, seed)
    factor = range_factor(G, torch.float64)
    assert factor is not None
    batch = least_energy_rows(G, U, V, TOL, factor, 1e-8, 1.0)
    alone = torch.cat(
        [least_energy_rows(G, U[i : i + 1], V[i : i + 1], TOL, factor, 1e-8, 1.0) for i in range(m)]
    )
    scale = V.abs().amax(dim=1, keepdim=True)
    assert ((batch - alone).abs() <= 1e-7 * scale).all()


def test_optimal_rows_skip_only_the_check():
    # With optimal=True, rows meeting tol come out as without it (bitwise); a row that misses it
    # (v = u on a conflicted row) is only replaced by lighter weights meeting tol.
    J, G, U, V = nnls_problem(20, 4, seed=5)
    factor = range_factor(G, torch.float64)
    assert factor is not None
    met = kkt_residual(G, U, V, V @ G) <= TOL
    assert met.all()
    torch.testing.assert_close(
        least_energy_rows(G, U, V, TOL, factor, 1e-8, 1.0, optimal=True),
        least_energy_rows(G, U, V, TOL, factor, 1e-8, 1.0),
        rtol=0,
        atol=0,
    )
    conflicted = ((U @ G).amin(dim=1) < 0).nonzero().squeeze(1)[:3]
    assert conflicted.numel() > 0
    result = least_energy_rows(G, U[conflicted], U[conflicted], TOL, factor, optimal=True)
    kept = (result == U[conflicted]).all(dim=1)
    residual = kkt_residual(G, U[conflicted], result, result @ G)
    assert (kept | ((residual <= TOL) & (energies(J, result) < energies(J, U[conflicted])))).all()


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(4, 40),
    r=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    ridge=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_newton_systems_by_squares(m: int, r: int, density: float, ridge: bool, seed: int):
    # The Newton systems ℓ_Fᵀ ℓ_F (+ a ridge) as one product with the squares of ℓ's rows: the
    # same factors as gathered from each row's free indices.
    g = torch.Generator().manual_seed(seed)
    ell = torch.randn(m, r, generator=g, dtype=torch.float64)
    ell = ell / ell.norm(dim=1, keepdim=True)
    free = torch.rand(6, m, generator=g) < density
    free[0] = False
    free[1] = True
    ridges = torch.rand(6, generator=g, dtype=torch.float64) if ridge else None
    squares = _range_projection._squares(ell)
    assert squares is not None
    expected = _newton_factor(ell, free, ridge=ridges)
    factor = _newton_factor(ell, free, ridge=ridges, squares=squares)
    torch.testing.assert_close(factor @ factor.mT, expected @ expected.mT, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(4, 30), r=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_full_step_is_the_line_search_answer(m: int, r: int, seed: int):
    # Where the dual's slope at the full step is non-negative (and positive at the start), the
    # exact line search takes the full step: what _least_norm uses to skip it.
    g = torch.Generator().manual_seed(seed)
    ell = torch.randn(m, r, generator=g, dtype=torch.float64)
    ell = ell / ell.norm(dim=1, keepdim=True)
    k = 8
    B = torch.rand(k, m, generator=g, dtype=torch.float64) * (torch.rand(k, m, generator=g) < 0.3)
    tight = torch.rand(k, m, generator=g) < 0.8
    lam = torch.randn(k, r, generator=g, dtype=torch.float64)
    Y = torch.randn(k, r, generator=g, dtype=torch.float64)
    direction = torch.randn(k, r, generator=g, dtype=torch.float64) * torch.rand(k, 1, generator=g)
    C, _, _, gradient = _range_projection._evaluate(ell, B, Y, tight, lam)
    end = _range_projection._evaluate(ell, B, Y, tight, lam + direction)[3]
    full = ((gradient * direction).sum(dim=1) > 0) & ((end * direction).sum(dim=1) >= 0)
    slope = (gradient * direction).sum(dim=1)
    step = _range_projection._line_search(ell, B, tight, lam, C, slope, direction)
    torch.testing.assert_close(step[full], (lam + direction)[full], rtol=1e-12, atol=1e-12)

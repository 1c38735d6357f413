"""The warm start of the dual active-set method of ``_range_projection`` (ADMM's guess of the active
set made dual feasible): the same projection as the cold start and as scipy's NNLS, a start that is
dual feasible, and, on a planted problem with a large active set, far fewer steps."""

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_range_projection import degenerate_jacobian, problem_rows
from torchjd.linalg import _range_projection
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._range_projection import dual_active_set, range_projection_rows, warm_start
from torchjd.linalg._spanning import range_factor

ITERATIONS, RHO = _range_projection._ADMM_ITERATIONS, _range_projection._ADMM_RHO


def nnls_projection(ell: torch.Tensor, a: torch.Tensor) -> np.ndarray:
    """``argmin_{ℓ y ≥ 0} ‖y − a‖`` by the Moreau decomposition: ``y = a + ℓᵀ μ`` with
    ``μ = argmin_{μ ≥ 0} ‖ℓᵀ μ + a‖`` (scipy's NNLS)."""
    L = ell.numpy()
    mu = scipy.optimize.nnls(L.T, -a.numpy(), maxiter=50 * L.shape[0])[0]
    return a.numpy() + L.T @ mu


def assert_dual_feasible(ell: torch.Tensor, B: torch.Tensor, start: tuple) -> None:
    """The start's normals are linearly independent and its multipliers, those of the projection
    onto ``{ℓ_A y = 0}`` (``y − a = ℓ_Aᵀ μ``), non-negative."""
    slots, q = start
    A = B @ ell
    for a, row, size in zip(A, slots, q.tolist(), strict=True):
        active = row[:size]
        assert (row[size:] == ell.shape[0]).all()
        if size == 0:
            continue
        normals = ell[active]
        assert torch.linalg.matrix_rank(normals) == size
        mu = -torch.linalg.solve(normals @ normals.T, normals @ a)
        assert (mu >= -1e-9 * a.norm()).all()


def range_problem(m: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The range factor ``ℓ`` of a degenerate Gramian and rows ``b = √W ⊙ u`` of its problems."""
    J = degenerate_jacobian(m, rank, 3 * rank, seed)
    ell, sqrt_weights = range_factor(J @ J.T, torch.float64)
    return ell, problem_rows(m, seed) * sqrt_weights


@settings(max_examples=8, deadline=None)
@given(rank=st.integers(3, 10), extra=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_warm_start_against_cold_start_and_nnls(rank: int, extra: int, seed: int):
    m = 12 + 2 * rank + extra
    ell, B = range_problem(m, rank, seed)
    A = B @ ell
    eps = 1e-12 * A.norm(dim=1)
    start = warm_start(ell, B, ITERATIONS, RHO)
    assert_dual_feasible(ell, B, start)
    Y_cold, _, found_cold = dual_active_set(ell, B, eps, 10 * m)
    Y_warm, _, found_warm = dual_active_set(ell, B, eps, 10 * m, start)
    assert found_warm.all()
    assert found_cold.all()
    torch.testing.assert_close(Y_warm, Y_cold, rtol=0, atol=1e-9 * float(A.norm(dim=1).max()))
    for a, y in zip(A, Y_warm, strict=True):
        np.testing.assert_allclose(y.numpy(), nnls_projection(ell, a), atol=1e-8 * float(a.norm()))


def planted(r: int, m: int, active: int, rows: int, seed: int) -> tuple:
    """Unit normals ``ℓ`` (``m × r``, ``ℓᵀℓ`` diagonal) and rows ``a`` whose projections onto
    ``{ℓ y ≥ 0}`` are planted: ``y*`` (shared) tight on the first ``active`` normals (orthogonal
    to it), strictly inside the others, and ``a = y* − ℓ_Aᵀ μ`` with ``μ ≥ 1/2`` (each row its
    own)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(r, generator=g, dtype=torch.float64)
    y /= y.norm()
    ell = torch.randn(m, r, generator=g, dtype=torch.float64)
    ell[:active] -= (ell[:active] @ y).unsqueeze(1) * y
    ell[active:] *= torch.sign(ell[active:] @ y).unsqueeze(1)
    ell[active:] += 0.3 * y
    ell /= ell.norm(dim=1, keepdim=True)
    mu = 0.5 + torch.rand(rows, active, generator=g, dtype=torch.float64)
    A = y - mu @ ell[:active]
    # Coordinates in which ℓᵀℓ is diagonal, as for the range factor (an eigendecomposition).
    _, V = torch.linalg.eigh(ell.T @ ell)
    return ell @ V, A @ V, y @ V


def test_warm_start_needs_far_fewer_steps():
    """A planted active set of ``r − 2`` normals: the cold start adds them one by one (at least
    ``r − 2`` steps); from the warm start, the rows are found within half of that."""
    r, m, active = 40, 160, 38
    ell, A, y = planted(r, m, active, 12, seed=0)
    B = torch.linalg.lstsq(ell.T, A.T).solution.T  # a = ℓᵀ b
    torch.testing.assert_close(B @ ell, A)
    eps = 1e-12 * A.norm(dim=1)
    steps = active // 2
    start = warm_start(ell, B, ITERATIONS, RHO)
    assert_dual_feasible(ell, B, start)
    Y, _, found = dual_active_set(ell, B, eps, steps, start)
    assert found.all()
    torch.testing.assert_close(Y, y.expand_as(Y), rtol=0, atol=1e-10)
    _, _, found_cold = dual_active_set(ell, B, eps, active - 1)
    assert not found_cold.any()
    Y_cold, _, found_cold = dual_active_set(ell, B, eps, 10 * m)
    assert found_cold.all()
    torch.testing.assert_close(Y_cold, Y, rtol=0, atol=1e-10)


def test_failed_probe_then_warm_start(monkeypatch: pytest.MonkeyPatch):
    """When the cold probe finds no row (here: no step allowed), the rows are warm-started:
    all found, with KKT on ``G`` and the same weights as the cold start."""
    m = 70
    J = degenerate_jacobian(m, 6, 15, seed=9)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    factor = range_factor(G, torch.float64)
    V_cold, found_cold = range_projection_rows(G, U, 1e-9, factor, torch.float64)
    monkeypatch.setattr(_range_projection, "_STEPS", (0, 0))
    V, found = range_projection_rows(G, U, 1e-9, factor, torch.float64)
    assert found.all()
    assert found_cold.all()
    assert (kkt_residual(G, U, V, V @ G) <= 1e-9).all()
    torch.testing.assert_close(V, V_cold, rtol=1e-6, atol=1e-8)


def test_over_relaxed_admm_converges_faster_to_the_same_multipliers(
    monkeypatch: pytest.MonkeyPatch,
):
    """ADMM's over-relaxation keeps its limit (the projection's multipliers: the planted ``μ`` on
    the active normals, zero on the others) and gets closer to it in as many iterations."""
    r, m, active = 40, 160, 38
    ell, A, y = planted(r, m, active, 12, seed=0)
    B = torch.linalg.lstsq(ell.T, A.T).solution.T
    normals = ell[:active]
    mu = torch.linalg.solve(normals @ normals.T, normals @ (y - A).T).T
    relaxed = _range_projection._ADMM_RELAX
    assert 1.0 < relaxed < 2.0

    def error(iterations: int) -> float:
        multipliers = _range_projection._admm_multipliers(ell, B, iterations, RHO).double()
        assert (multipliers[:, active:] == 0.0).all()
        return float((multipliers[:, :active] - mu).abs().max())

    relaxed_error = error(3000)
    monkeypatch.setattr(_range_projection, "_ADMM_RELAX", 1.0)
    plain_error = error(3000)
    assert relaxed_error < 0.1 * float(mu.min())
    assert relaxed_error < 0.5 * plain_error

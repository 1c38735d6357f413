"""Exact mode on a singular ``G`` whose rows do not positively span a subspace: the update by the
dual active-set method in the range of ``G``, then the least-norm weights (``_range_projection``),
against scipy's NNLS (the update) and quadprog (the least-energy weights)."""

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import least_energy_optimum
from torchjd.linalg import _bounded_qp, _range_projection
from torchjd.linalg._bounded_qp import solve_lower_bounded_qp
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._range_projection import dual_active_set, range_projection_rows
from torchjd.linalg._spanning import range_factor


def degenerate_jacobian(m: int, rank: int, n: int, seed: int) -> torch.Tensor:
    """``m`` rows of rank ``rank`` with a shared direction (their cone is not a subspace), norms
    over two decades, a zero row, a duplicate and an opposite row."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank, generator=g, dtype=torch.float64)
    J = J @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    J += 3.0 * J.norm(dim=1).mean() / n**0.5 * torch.randn(1, n, generator=g, dtype=J.dtype)
    J = J * 10 ** (2 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 1)
    J[0] = 0.0
    J[1] = J[2]
    J[5] = -2.0 * J[6]
    return J


def optimal_weights(J: np.ndarray, u: np.ndarray) -> np.ndarray:
    """An optimal ``v`` (``v ≥ u``) of ``min vᵀ J Jᵀ v``, by the Moreau decomposition: the update
    is ``Jᵀu + Jᵀλ`` with ``λ = argmin_{λ ≥ 0} ‖Jᵀλ + Jᵀu‖`` (scipy's NNLS), and ``v = u + λ``."""
    lam = scipy.optimize.nnls(J.T, -(J.T @ u), maxiter=50 * len(u))[0]
    return u + lam


def assert_least_energy(J: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> None:
    """Each row of ``V`` has the least ``Σ_j ‖J_j‖² v_j²`` among the ``v ≥ u`` with its update (the
    update's optimality is checked apart: KKT on ``G``, and NNLS below): quadprog's answer where
    it concludes (its own degeneracy can stop it), else no feasible point of scipy's SLSQP (from
    ``v``) lighter."""
    J_np = J.numpy()
    weights = (J_np * J_np).sum(axis=1)
    weights = np.where(weights > 0, weights, 1e-6 * weights.max())
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        try:
            expected = least_energy_optimum(J_np, u, v)
        except ValueError:
            update = J_np.T @ v
            result = scipy.optimize.minimize(
                lambda x: (weights * x * x).sum(),
                v,
                jac=lambda x: 2 * weights * x,
                bounds=list(zip(u, [None] * len(u), strict=True)),
                constraints=[{"type": "eq", "fun": lambda x, update=update: J_np.T @ x - update}],
                method="SLSQP",
                options={"ftol": 1e-14, "maxiter": 500},
            )
            # (SLSQP can stop early on an infeasible point, lighter than any feasible one.)
            feasible = np.abs(J_np.T @ result.x - update).max() <= 1e-9 * np.abs(update).max()
            if feasible and (result.x >= u - 1e-12).all():
                assert (weights * v * v).sum() <= (weights * result.x**2).sum() * (1 + 1e-7) + 1e-12
            continue
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def problem_rows(m: int, seed: int) -> torch.Tensor:
    """Unit rows (UPGrad's problems) and a few sparse non-negative ones."""
    g = torch.Generator().manual_seed(seed)
    sparse = torch.rand(4, m, generator=g, dtype=torch.float64) * (
        torch.rand(4, m, generator=g) < 0.3
    )
    return torch.cat([torch.eye(m, dtype=torch.float64)[::3], sparse])


@settings(max_examples=10, deadline=None)
@given(rank=st.integers(2, 6), extra=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_least_energy_weights_against_quadprog(rank: int, extra: int, seed: int):
    m = 10 + 2 * rank + extra
    J = degenerate_jacobian(m, rank, 3 * rank, seed)
    G = J @ J.T
    U = problem_rows(m, seed)
    V, found = range_projection_rows(G, U, 1e-9, range_factor(G, torch.float64), torch.float64)
    assert (V >= U).all()
    assert (kkt_residual(G, U, V, V @ G)[found] <= 1e-9).all()
    assert found.float().mean() >= 0.5
    assert_least_energy(J, U[found], V[found])


@pytest.mark.parametrize("seed", range(4))
def test_projection_against_nnls(seed: int):
    """The update ``y*`` in the coordinates of the range: ``ℓ y* = J d / ‖J_j‖`` for the optimal
    update ``d`` of NNLS."""
    m = 40
    J = degenerate_jacobian(m, 5, 12, seed)
    G = J @ J.T
    U = problem_rows(m, seed)
    ell, sqrt_weights = range_factor(G, torch.float64)
    B = U * sqrt_weights
    a_norm = (B @ ell).norm(dim=1)
    Y, _, found = dual_active_set(ell, B, 1e-12 * a_norm)
    assert found.all()
    J_np = J.numpy()
    for u, y, scale in zip(U.numpy(), Y, a_norm, strict=True):
        update = J_np.T @ optimal_weights(J_np, u)
        expected = (J_np @ update) / sqrt_weights.numpy()
        np.testing.assert_allclose((ell @ y).numpy(), expected, atol=1e-8 * float(scale))


def test_weights_no_heavier_than_the_pivoting_route():
    """Least energy ``Σ_j G_jj v_j²`` against the general route's answer (its Tikhonov limit),
    never above it (on opposite and duplicate rows, up to a few percent below: the Tikhonov term's
    limit is only approached)."""
    m = 50
    J = degenerate_jacobian(m, 4, 10, seed=3)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    conflicted = (U @ G).amin(dim=1) < 0
    U = U[conflicted]
    V, found = range_projection_rows(G, U, 1e-9, range_factor(G, torch.float64), torch.float64)
    assert found.all()
    reference = solve_lower_bounded_qp(G, U, least_norm=True)
    energy = (G.diagonal() * V**2).sum(dim=1)
    reference_energy = (G.diagonal() * reference**2).sum(dim=1)
    assert (energy <= reference_energy * (1 + 1e-6)).all()


def test_small_state_chunks_and_probe(monkeypatch: pytest.MonkeyPatch):
    """Chunks of 9 rows, a state grown two columns at a time, and the probe (more than 32 rows):
    the same answers as one batch."""
    m = 70
    J = degenerate_jacobian(m, 6, 15, seed=5)
    G = J @ J.T
    U = torch.cat([torch.eye(m, dtype=torch.float64), problem_rows(m, 5)])
    factor = range_factor(G, torch.float64)
    V, found = range_projection_rows(G, U, 1e-9, factor, torch.float64)
    monkeypatch.setattr(_range_projection, "_CHUNK_ENTRIES", 9 * 6**2)
    monkeypatch.setattr(_range_projection, "_GROWTH", 2)
    V_small, found_small = range_projection_rows(G, U, 1e-9, factor, torch.float64)
    assert torch.equal(found, found_small)
    torch.testing.assert_close(V_small, V, rtol=1e-8, atol=1e-10)
    assert found.float().mean() >= 0.5


def test_probe_without_success_leaves_every_row(monkeypatch: pytest.MonkeyPatch):
    """When no probe row is found (here: no step allowed, cold or warm-started), the other rows are
    not tried."""
    m = 70
    J = degenerate_jacobian(m, 6, 15, seed=6)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    calls = []
    rows = _range_projection._rows

    def counted(*args: object) -> object:
        calls.append(args[3].shape[0])
        return rows(*args)

    monkeypatch.setattr(_range_projection, "_STEPS", (0, 0))
    monkeypatch.setattr(_range_projection, "_WARM_STEPS", (0, 0))
    monkeypatch.setattr(_range_projection, "_rows", counted)
    V, found = range_projection_rows(G, U, 1e-9, range_factor(G, torch.float64), torch.float64)
    assert not found.any()
    assert torch.equal(V, U)
    assert calls == [_range_projection._PROBE_ROWS] * 2


def range_route_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The range route from ``m = 65`` on, warm-started pivoting converging on no row, and no row
    allowed to reach the interior point."""

    def nothing_converged(G: torch.Tensor, G_exact: torch.Tensor, U: torch.Tensor, *args: object):
        return U.clone(), torch.zeros(U.shape[0], dtype=torch.bool)

    def no_fallback(*args: object) -> None:
        raise AssertionError("rows left to the interior point")

    monkeypatch.setattr(_bounded_qp, "_RANGE_MIN_M", 65)
    monkeypatch.setattr(_bounded_qp, "warm_started_pivoting", nothing_converged)
    monkeypatch.setattr(_bounded_qp, "_least_norm_fallback", no_fallback)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_mode_takes_the_range_route(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype):
    """Beyond ``m = 64`` (the size threshold lowered), the rows are solved in the range of ``G``
    first, none left to pivoting and the interior point: KKT on ``G`` (float64), the least-energy
    weights, and (float32) no conflict beyond the float32 guarantee."""
    m = 80
    J = degenerate_jacobian(m, 8, 20, seed=7)
    G = (J @ J.T).to(dtype)
    U = torch.eye(m, dtype=dtype)
    range_route_only(monkeypatch)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert (V >= U).all()
    if dtype == torch.float64:
        assert kkt_residual(G, U, V, V @ G).max() <= 1e-9
        conflicted = (U @ G).amin(dim=1) < 0
        assert_least_energy(J, U[conflicted][:12], V[conflicted][:12])
    else:
        J64 = J.float().double()
        norms = J64.norm(dim=1)
        update = J64.T @ V.double().T
        conflicts = (J64 @ update) / (norms * norms.max()).clamp_min(1e-300)[:, None]
        assert conflicts.min() >= -1e-4


def test_rows_left_by_the_spanning_route_take_the_range_route(monkeypatch: pytest.MonkeyPatch):
    """The rows that the spanning route leaves (here: all, as if the rows positively spanned a
    subspace but no row converged) and that warm-started pivoting leaves (here: all) are solved in
    the range of ``G`` before the interior point."""
    m = 80
    J = degenerate_jacobian(m, 8, 20, seed=8)
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)

    def unconverged(G: torch.Tensor, U: torch.Tensor, *args: object, **kwargs: object):
        return U.clone(), torch.zeros(U.shape[0], dtype=torch.bool)

    range_route_only(monkeypatch)
    monkeypatch.setattr(_bounded_qp, "zero_update_weights", unconverged)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert (V >= U).all()
    assert kkt_residual(G, U, V, V @ G).max() <= 1e-9

"""UPGrad's problems beyond ``m = 64`` in the default mode, solved as those of the unit vectors
through ``G⁻¹`` (:func:`~torchjd.linalg._unit_schur.unit_schur_pivoting`, called by
``TorchProjector._summed_projections``), against quadprog (Goldfarb-Idnani's dual method, an
independent algorithm) on the regularised problem in float64, and the general path of the
projector."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchjd.linalg._unit_schur as unit_schur_module
from tests.linalg.test_schur_pivoting import last_layer, regularised
from tests.reference.dual_cone import kkt_violation, with_quadprog
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import TorchProjector
from torchjd.linalg._bounded_qp import _SCHUR_PIVOTS, _UNIT_BUDGET, DEFAULT_TOL, _large_unit_route
from torchjd.linalg._gramian import normalized, regularized, symmetrized
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._schur_pivoting import distinct_faces
from torchjd.linalg._unit_schur import _spd_inverse, unit_schur_pivoting


def per_sample_gramian(m: int, n_classes: int, noise: float, seed: int) -> torch.Tensor:
    """Per-sample gradients of a cross-entropy layer (rows of a class agree, of other classes
    conflict), plus noise, with row norms over a decade: the default-mode Gramian."""
    g = torch.Generator().manual_seed(seed)
    J = last_layer(m, n_classes, seed)
    J = J + noise * J.norm(dim=1).mean() / J.shape[1] ** 0.5 * torch.randn(J.shape, generator=g)
    norms = torch.logspace(-0.5, 0.5, m, dtype=torch.float64)[torch.randperm(m, generator=g)]
    return regularised(J * norms.unsqueeze(1))


def solve(G: torch.Tensor, budget: float = 10.0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The route with the default mode's parameters (and by default, any number of distinct
    faces: its cost is not what these tests check)."""
    return unit_schur_pivoting(G, DEFAULT_TOL[G.dtype], _SCHUR_PIVOTS, G.shape[0] // 4, budget)


def assert_unit_rows_optimal(G: torch.Tensor, X: torch.Tensor, solved: torch.Tensor) -> None:
    """The solved rows of ``X`` are the optima ``v(e_i)`` of ``G`` (quadprog in float64, and the
    KKT conditions); every row is feasible, ``v ≥ e_i`` exactly."""
    m = G.shape[0]
    G64 = G.double().numpy()
    expected = with_quadprog(G64, np.eye(m))
    rows = solved.nonzero().squeeze(1).numpy()
    atol = {torch.float64: 1e-7, torch.float32: 1e-4}[G.dtype]
    np.testing.assert_allclose(X[rows].double().numpy(), expected[rows], rtol=0, atol=atol)
    for i in rows.tolist():
        assert kkt_violation(G64, np.eye(m)[i], X[i].double().numpy()) <= atol
    assert torch.ge(X, torch.eye(m, dtype=X.dtype)).all()


@settings(max_examples=6)
@given(
    m=st.integers(65, 140),
    n_classes=st.integers(8, 12),
    noise=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_matches_quadprog_on_per_sample_gramians(m: int, n_classes: int, noise: float, seed: int):
    G = per_sample_gramian(m, n_classes, noise, seed)
    result = solve(G)
    assert result is not None  # the rows of a class share their face: the route runs
    X, solved = result
    assert_unit_rows_optimal(G, X, solved)
    assert solved.double().mean() >= 0.9  # rows whose face grows too large are left
    residual = kkt_residual(G, torch.eye(m, dtype=G.dtype), X, X @ G)
    assert (residual[solved] <= DEFAULT_TOL[torch.float64]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_quadprog_at_300_rows(dtype: torch.dtype):
    G = per_sample_gramian(300, 10, 0.5, 3).to(dtype)
    result = solve(G)
    assert result is not None
    X, solved = result
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)
    residual = kkt_residual(G, torch.eye(300, dtype=dtype), X, X @ G)
    assert (residual <= DEFAULT_TOL[dtype]).all()


def test_several_steps_and_distinct_faces(monkeypatch: pytest.MonkeyPatch):
    """With noise, the initial guess is wrong for some rows, which pivot again on their own
    faces; the first step factorises each distinct face once."""
    sizes = []
    face_solutions = unit_schur_module._face_solutions

    def spy(HS, s, faces, inverse, units):
        sizes.append((faces.shape[0], units.shape[0]))
        return face_solutions(HS, s, faces, inverse, units)

    monkeypatch.setattr(unit_schur_module, "_face_solutions", spy)
    G = per_sample_gramian(200, 8, 0.1, 0)
    X, solved = solve(G)
    assert len(sizes) >= 2
    assert sizes[0][0] <= sizes[0][1] // 4  # few distinct faces at first
    assert 0 < sizes[1][1] < 200  # then the rows left, each on its own face
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


def test_rows_without_conflict_are_the_unit_vectors():
    """No row conflicts with another (``G ≥ 0`` entrywise): ``v(e_i) = e_i``, without a
    factorisation."""
    J = torch.rand(80, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = regularised(J)
    X, solved = solve(G)
    assert solved.all()
    assert torch.equal(X, torch.eye(80, dtype=torch.float64))
    G[0, 1] = G[1, 0] = torch.nan
    assert solve(G) is None  # the general route's NaN rows


def test_declines_costly_faces_and_ill_conditioned_gramians():
    """A Wishart Gramian (half the pairs agree: faces of about m / 2), faces too many for the
    budget, and a Gramian too ill-conditioned for ``G⁻¹`` in float32 are left to the general
    route."""
    g = torch.Generator().manual_seed(0)
    assert solve(regularised(torch.randn(100, 100, generator=g, dtype=torch.float64))) is None
    G = per_sample_gramian(200, 8, 1.0, 0).float()  # noisy: each row has its own face
    assert solve(G, _UNIT_BUDGET[torch.float32]) is None
    assert solve(G) is not None
    J = last_layer(100, 8, 0)
    J[:2] *= 100.0  # two large rows (the regularisation is negligible for them)...
    J[1] = J[0] * (1 + 1e-5)  # ...nearly equal: κ far beyond float32's reach
    G = regularised(J).float()
    assert solve(G) is None
    result = solve(G.double())  # in float64, G⁻¹ is accurate enough
    assert result is not None
    assert_unit_rows_optimal(G.double(), *result)


def general_weights(G: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return TorchProjector()(torch.diag(p), G).sum(dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [65, 130])
def test_weighting_matches_general_route_and_quadprog(m: int, dtype: torch.dtype):
    """``UPGradWeighting`` on an unnormalised Gramian (its default preference, and a random one):
    the weights of the general route on the rows ``p_i e_i``, and those of quadprog on the
    normalised, regularised Gramian."""
    G = per_sample_gramian(m, 8, 0.3, m) * 37.0
    G = G.to(dtype)
    p = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=dtype)
    G_regularised = symmetrized(regularized(normalized(G.double(), 1e-4), 1e-4)).numpy()
    for preference in (None, p):
        weights = UPGradWeighting(preference)(G)
        q = torch.full((m,), 1 / m, dtype=dtype) if preference is None else p
        expected = with_quadprog(G_regularised, np.diag(q.double().numpy())).sum(axis=0)
        atol = {torch.float64: 1e-9, torch.float32: 1e-5}[dtype] * expected.max()
        np.testing.assert_allclose(weights.double().numpy(), expected, rtol=0, atol=atol)
        # The general route in float32 (ADMM to the tolerance on the KKT residual) is less
        # accurate: weights within about 1e-3 of the largest.
        atol = {torch.float64: 1e-9, torch.float32: 2e-3}[dtype] * expected.max()
        torch.testing.assert_close(weights, general_weights(G, q), rtol=0, atol=atol)


def test_weighting_with_grad_and_non_finite_gramians_take_the_general_route():
    """A Gramian that requires grad gives the general route's differentiable weights; a NaN entry
    gives NaN weights, as on the general route."""
    G = per_sample_gramian(80, 8, 0.3, 1).requires_grad_()
    weights = UPGradWeighting()(G)
    weights.sum().backward()
    assert G.grad is not None
    assert G.grad.isfinite().all()
    p = torch.full((80,), 1 / 80, dtype=torch.float64)
    torch.testing.assert_close(weights.detach(), general_weights(G.detach(), p))
    for value in (torch.nan, torch.inf):
        G_bad = G.detach().clone()
        G_bad[3, 5] = G_bad[5, 3] = value
        assert UPGradWeighting()(G_bad).isnan().any()
        G_bad = G.detach().clone()
        G_bad[3, 3] = value
        assert UPGradWeighting()(G_bad).isnan().all()


def test_unit_route_satisfies_the_tolerance_on_every_row():
    """Every row the route returns as solved meets the default tolerance on ``G`` itself, and the
    rows it does not solve come from the general route, so the weights always do."""
    G = per_sample_gramian(150, 10, 0.3, 7).float()
    p = torch.full((150,), 1 / 150)
    weights = UPGradWeighting()(G)
    G_regularised = symmetrized(regularized(normalized(G, 1e-4), 1e-4))
    X, solved = solve(G_regularised)
    residual = kkt_residual(G_regularised, torch.eye(150), X, X @ G_regularised)
    assert (residual[solved] <= DEFAULT_TOL[torch.float32]).all()
    torch.testing.assert_close(weights, general_weights(G, p), rtol=0, atol=2e-3 * weights.max())


@pytest.mark.parametrize("m", [100, 300, 600])
def test_block_inverse_and_pivots(m: int):
    """The recursive block inverse against LAPACK's, with the least squared pivot of the Cholesky
    factor; NaN for a matrix that is not positive definite."""
    g = torch.Generator().manual_seed(m)
    J = torch.randn(m, 2 * m, generator=g, dtype=torch.float64)
    A = J @ J.T / (2 * m) + 1e-3 * torch.eye(m, dtype=torch.float64)
    inverse, pivot = _spd_inverse(A)
    torch.testing.assert_close(inverse, torch.linalg.inv(A), rtol=1e-9, atol=1e-9)
    L = torch.linalg.cholesky(A)
    torch.testing.assert_close(pivot, L.diagonal().amin() ** 2)
    A[m - 1, m - 1] = -1.0
    assert _spd_inverse(A)[1].isnan()


def test_rows_left_by_the_route_take_the_general_route(monkeypatch: pytest.MonkeyPatch):
    """When the rows left after the first step have faces too costly (here: any), they stop,
    unconverged, and the weighting solves them by the general route; beyond 512 rows, the route
    is not tried."""
    monkeypatch.setattr(unit_schur_module, "_LATER_BUDGET", 0.0)
    G = per_sample_gramian(200, 8, 0.1, 0)
    X, solved = solve(G)
    assert not solved.all()
    assert solved.any()
    assert_unit_rows_optimal(G, X, solved)
    X = _large_unit_route(G, DEFAULT_TOL[torch.float64], 10_000)
    assert X is not None
    assert_unit_rows_optimal(G, X, torch.ones(200, dtype=torch.bool))
    assert _large_unit_route(torch.eye(513, dtype=torch.float64), 1e-7, 10_000) is None


def test_face_solutions_shared_and_per_row_agree():
    """The weights and multipliers of the unit vectors' problems on their faces are the same
    whether each distinct face is inverted once or each row solves its own (shared faces among
    fewer than four rows each, or every row its own)."""
    G = per_sample_gramian(100, 8, 0.3, 2)
    s = G.diagonal().rsqrt()
    H, _ = _spd_inverse(s.unsqueeze(1) * G * s.unsqueeze(0))
    HS = H * s
    active = G > 0
    for units in (torch.arange(100), torch.arange(12)):
        faces, inverse = distinct_faces(active[units])
        assert faces.shape[0] < units.shape[0]
        V, mu_A, idx = unit_schur_module._face_solutions(HS, s, faces, inverse, units)
        own = torch.arange(units.shape[0])
        V_own, mu_own, idx_own = unit_schur_module._face_solutions(HS, s, active[units], own, units)
        torch.testing.assert_close(V, V_own)
        M = torch.zeros(len(units), 100, dtype=G.dtype).scatter_(1, idx[inverse], mu_A)
        M_own = torch.zeros(len(units), 100, dtype=G.dtype).scatter_(1, idx_own, mu_own)
        torch.testing.assert_close(M, M_own)
        # On its face, v_A = e_i and G v = μ / s (zero on the free indices).
        torch.testing.assert_close(V @ G, M / s, atol=1e-12, rtol=0)

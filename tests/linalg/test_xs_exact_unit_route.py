"""The exact mode's rows of the unit vectors up to ``m = 64`` (``_bounded_qp._exact_unit_route``):
nonsingular Gramians through the default mode's batched unit route on ``G`` itself (checked
against quadprog: their optimum is unique), the rows it leaves through ``_nonsingular_route``, and
the shortcuts taken on non-finite, zero and conflict-free Gramians; the convergence flags of the
masked pivoting loop (with the factors kept, as in the exact mode) against its general loop."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import kkt_violation, with_quadprog
from tests.reference.matrices import make
from torchjd.linalg import _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, tikhonov
from torchjd.linalg._kkt import kkt_residual, row_scales
from torchjd.linalg._principal_pivoting import _masked_pivoting, _pivoting, solve_on_faces

NONSINGULAR = ("normal", "common_direction", "mixed_row_norms")


def normalised_gramian(family: str, m: int, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    J = make(family, m, n, seed=seed)
    G = J @ J.T
    return (G / G.trace()).to(dtype)


def unit_rows(G: torch.Tensor) -> torch.Tensor:
    return _bounded_qp._exact_unit_route(G, LEAST_NORM_TOL[G.dtype], 10_000)


def spy(monkeypatch: pytest.MonkeyPatch, name: str, rows_at: int = 0) -> list[int]:
    """The number of rows of the argument ``rows_at`` of each call of ``_bounded_qp.<name>``."""
    calls = []
    original = getattr(_bounded_qp, name)

    def wrapped(*args, **kwargs):
        calls.append(args[rows_at].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(_bounded_qp, name, wrapped)
    return calls


def assert_unique_optimum(G: torch.Tensor, X: torch.Tensor) -> None:
    """Each row ``v(e_i)`` meets the KKT conditions on ``G`` (in float64) and is quadprog's: its
    weights in float64; in float32, whose tolerance leaves the weights of small rows determined
    only to about ``κ · tol``, its update (the error in the ``G``-norm, relative to the largest
    row's norm, as the non-conflict guarantee is)."""
    G64 = G.double().numpy()
    eye = np.eye(G.shape[0])
    expected = with_quadprog(G64, eye)
    for u, v, reference in zip(eye, X.double().numpy(), expected, strict=True):
        if G.dtype == torch.float64:
            assert kkt_violation(G64, u, v) <= 1e-9
            np.testing.assert_allclose(v, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())
        else:
            assert kkt_violation(G64, u, v) <= 1e-5
            error = v - reference
            largest = np.sqrt(G64.diagonal().max())
            assert np.sqrt(max(error @ G64 @ error, 0.0)) <= 1e-4 * largest


@pytest.mark.parametrize("family", NONSINGULAR)
@pytest.mark.parametrize("m", [6, 12, 20, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonsingular_gramians_take_the_unit_route(
    monkeypatch: pytest.MonkeyPatch, family: str, m: int, dtype: torch.dtype
):
    unit_calls = spy(monkeypatch, "_small_unit_route")
    least_norm_calls = spy(monkeypatch, "_least_norm_route")
    G = normalised_gramian(family, m, 3 * m, seed=m, dtype=dtype)
    X = unit_rows(G)
    assert X.dtype == dtype
    assert len(unit_calls) == int(bool((G.amin(dim=1) < 0).any()))  # (else v(e_i) = e_i)
    assert least_norm_calls == []
    assert_unique_optimum(G, X)


@pytest.mark.parametrize("m", [10, 24, 48])
def test_rows_left_by_the_unit_route_go_to_the_nonsingular_route(
    monkeypatch: pytest.MonkeyPatch, m: int
):
    """The rows that the unit route does not solve (here: every other row, returned as ``e_i``)
    are solved again, and only they."""
    original = _bounded_qp._small_unit_route

    def half_solved(G: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
        X, solved = original(G, tol)
        X[::2] = torch.eye(m, dtype=X.dtype)[::2]
        solved[::2] = False
        return X, solved

    monkeypatch.setattr(_bounded_qp, "_small_unit_route", half_solved)
    G = normalised_gramian("common_direction", m, 2 * m, seed=m, dtype=torch.float64)
    calls = spy(monkeypatch, "_nonsingular_route", rows_at=1)
    X = unit_rows(G)
    conflicted_even = int((G[::2].amin(dim=1) < 0).sum())
    assert calls == ([conflicted_even] if conflicted_even > 0 else [])
    assert_unique_optimum(G, X)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [5, 16, 64])
def test_non_finite_zero_and_conflict_free_gramians(dtype: torch.dtype, m: int):
    G = normalised_gramian("rank_deficient", m, m, seed=1, dtype=dtype)
    G[1, 2] = G[2, 1] = torch.inf
    assert unit_rows(G).isnan().all()
    G[1, 2] = G[2, 1] = torch.nan
    assert unit_rows(G).isnan().all()
    eye = torch.eye(m, dtype=dtype)
    assert torch.equal(unit_rows(torch.zeros(m, m, dtype=dtype)), eye)
    J = torch.rand(m, 2 * m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    assert torch.equal(unit_rows((J @ J.T).to(dtype)), eye)  # no conflict: v(e_i) = e_i


@pytest.mark.parametrize("family", ["rank_deficient", "duplicate_rows", "opposite_rows"])
@pytest.mark.parametrize("m", [16, 32])
def test_singular_gramians_meet_the_kkt_conditions(family: str, m: int):
    """The least-norm route's rows on a singular ``G``: feasible, KKT residual within the exact
    mode's tolerance (rows without conflict kept as ``e_i`` exactly)."""
    G = normalised_gramian(family, m, 2 * m, seed=m, dtype=torch.float64)
    X = unit_rows(G)
    eye = torch.eye(m, dtype=torch.float64)
    assert (X - eye).amin() >= 0
    assert kkt_residual(G, eye, X, X @ G).max() <= LEAST_NORM_TOL[torch.float64]
    free = G.amin(dim=1) >= 0
    assert torch.equal(X[free], eye[free])


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 32),
    rank=st.integers(1, 32),
    max_iters=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_masked_loop_flags_match_the_general_loop(m: int, rank: int, max_iters: int, seed: int):
    """On a barely regularised singular ``G`` (the exact mode's), the masked loop that keeps its
    factors flags the same rows converged as the general loop, also when stopped early; converged
    rows meet the KKT conditions on that ``G``, and no row's step count exceeds the last step."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, min(rank, m), generator=g, dtype=torch.float64)
    J = J @ torch.randn(J.shape[1], 2 * m, generator=g, dtype=torch.float64)
    G = J @ J.T
    G = tikhonov(G / G.trace())
    U = torch.eye(m, dtype=torch.float64)[(G.amin(dim=1) < 0)]
    if U.shape[0] == 0:
        return
    active, scales, tol = U @ G > 0, row_scales(G), 1e-9

    def general(U: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        V = solve_on_faces(G, U, active)
        return V, V @ G

    X, converged, _, (_, finished) = _masked_pivoting(
        G, U, active, scales, tol, max_iters, keep_factors=True
    )
    _, converged_ref, *_ = _pivoting(G, U, active, scales, tol, max_iters, general, False)
    assert torch.equal(converged, converged_ref)
    assert (finished <= max_iters - 1).all()
    X = torch.maximum(X, U)
    residual = kkt_residual(G, U, X, X @ G)
    assert (residual[converged] <= 1e-6).all()

"""Block principal pivoting (:mod:`torchjd.linalg._principal_pivoting`) against quadprog; its
few-operations masked loop (default mode, ``m ≤ 32``) against its general loop, and its compacted
variant (least-norm mode, ``32 < m ≤ 64``) against both."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import kkt_violation, with_quadprog
from tests.reference.matrices import make
from torchjd.linalg import _principal_pivoting
from torchjd.linalg._kkt import feasible_kkt_residual, kkt_residual, kkt_scales, row_scales
from torchjd.linalg._principal_pivoting import (
    _REFINEMENTS,
    _masked_pivoting,
    _pivoting,
    face_solver,
    free_first,
    principal_pivoting,
    refine,
    solve_on_faces,
    upper_cholesky,
)


def low_rank_gramian(m: int, seed: int) -> torch.Tensor:
    """Rank 8, singular values over four decades, divided by its trace plus ``1e-4 I``: the
    ill-conditioned Gramians on which pivoting needs most exchanges."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(m, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 8)
    J = left @ torch.randn(8, 3 * m, generator=g, dtype=torch.float64)
    G = J @ J.T
    return G / G.trace() + 1e-4 * torch.eye(m, dtype=torch.float64)


def gramians(m: int) -> list[torch.Tensor]:
    J = make("normal", m, m, seed=m)
    mixed = make("mixed_row_norms", m, 2 * m, seed=m)
    return [low_rank_gramian(m, m), J @ J.T, mixed @ mixed.T]


def problems(m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    return torch.cat([torch.eye(m, dtype=torch.float64) / m, torch.randn(4, m, generator=g)])


def assert_matches_quadprog(G: torch.Tensor, U: torch.Tensor, X: torch.Tensor) -> None:
    """Each row of ``X`` meets the KKT conditions and is quadprog's optimum (in the G-norm)."""
    expected = with_quadprog(G.numpy(), U.numpy())
    for u, x in zip(U.numpy(), X.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, x) <= 1e-6
    error = X - torch.from_numpy(expected)
    g_norm_error = torch.einsum("ki,ij,kj->k", error, G, error).clamp_min(0).sqrt()
    g_norm = torch.einsum("ki,ij,kj->k", X, G, X).sqrt()
    assert (g_norm_error <= 1e-6 * g_norm).all()


@pytest.mark.parametrize("m", [9, 16, 25, 32])
def test_masked_loop_matches_quadprog(m: int):
    for G in gramians(m):
        U = problems(m)
        X, converged = principal_pivoting(G, U, U @ G > 0, row_scales(G), 1e-7, 3 * m + 10)
        assert converged.all()
        assert_matches_quadprog(G, U, torch.maximum(X, U))


@pytest.mark.parametrize("m", [12, 32])
@pytest.mark.parametrize("max_iters", [1, 2, 100])
def test_masked_loop_agrees_with_general_loop(m: int, max_iters: int):
    """Same exchanges, same faces: the general loop (its face solves given as ``face_solver``)
    ends at the same answers and convergence flags, also when stopped early."""
    G = low_rank_gramian(m, seed=1)
    U = problems(m)
    active = U @ G > 0
    scales = row_scales(G)

    def general(U: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        V = solve_on_faces(G, U, active)
        return V, V @ G

    X, converged = principal_pivoting(G, U, active, scales, 1e-7, max_iters)
    X_ref, converged_ref = principal_pivoting(G, U, active, scales, 1e-7, max_iters, None, general)
    assert torch.equal(converged, converged_ref)
    assert converged.all() == (max_iters == 100)
    torch.testing.assert_close(X, X_ref, rtol=1e-9, atol=1e-12)


def test_masked_loop_stops_unconverged_rows_on_non_finite_gramians():
    G = low_rank_gramian(10, seed=2)
    G[3, 4] = G[4, 3] = torch.nan
    U = problems(10)
    _, converged = principal_pivoting(G, U, U @ G > 0, row_scales(G), 1e-7, 40)
    assert not converged.any()


@pytest.mark.parametrize("m", [9, 33, 48])
def test_compacted_loop_matches_quadprog(m: int):
    """The least-norm mode's compacted loop (``Ĝ_FF`` gathered per row) ends at quadprog's
    optimum, on positive-definite Gramians."""
    for G in gramians(m):
        U = problems(m)
        X, converged, _, _ = _masked_pivoting(
            G, U, U @ G > 0, row_scales(G), 1e-7, 3 * m + 10, compacted=True
        )
        assert converged.all()
        assert_matches_quadprog(G, U, torch.maximum(X, U))


@given(m=st.integers(2, 40), seed=st.integers(0, 2**16), max_iters=st.sampled_from([1, 3, 200]))
def test_compacted_loop_agrees_with_masked_loop(m: int, seed: int, max_iters: int):
    """Same exchanges, same faces: the compacted loop ends at the masked loop's answers, active
    sets and convergence flags, also when stopped early; the face solve it keeps (its last
    factors) is that of freshly factorised faces."""
    G = low_rank_gramian(m, seed)
    U = torch.randn(m + 3, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    active = U @ G > 0
    scales = row_scales(G)
    X, converged, final, kept = _masked_pivoting(
        G, U, active, scales, 1e-7, max_iters, keep_factors=True, compacted=True
    )
    X_ref, converged_ref, final_ref, _ = _masked_pivoting(G, U, active, scales, 1e-7, max_iters)
    assert torch.equal(converged, converged_ref)
    assert torch.equal(final, final_ref)
    torch.testing.assert_close(X, X_ref, rtol=1e-9, atol=1e-12)
    assert kept is not None
    rhs = torch.randn(U.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=G.dtype)
    expected = face_solver(G, final, masked=True)(rhs)
    torch.testing.assert_close(kept[0](rhs), expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(33, 48), seed=st.integers(0, 2**16), max_iters=st.sampled_from([1, 3, 200]))
def test_grouped_loop_keeps_the_factors_of_its_last_faces(m: int, seed: int, max_iters: int):
    """The least-norm mode's grouped loop (:func:`_pivoting`, faces grouped by size: beyond
    ``_ONE_GROUP_MAX_M``, lowered here) keeps each row's factors of its last face, also when
    stopped early: their solve is that of freshly factorised faces, compacted and masked (the
    reference)."""
    G = low_rank_gramian(m, seed)
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(m + 3, m, generator=g, dtype=torch.float64)
    active = U @ G > 0
    active[0] = True  # a row without free index
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_principal_pivoting, "_ONE_GROUP_MAX_M", 8)
        _, _, final, solve = _pivoting(
            G, U, active, row_scales(G), 1e-7, max_iters, None, least_norm=True
        )
        assert solve is not None
        rhs = torch.randn(U.shape, generator=g, dtype=G.dtype)
        compacted = face_solver(G, final, masked=False)(rhs)
    assert torch.equal(solve(rhs)[final], torch.zeros_like(rhs[final]))
    torch.testing.assert_close(solve(rhs), compacted, rtol=1e-10, atol=1e-10)
    masked = face_solver(G, final, masked=True)(rhs)
    torch.testing.assert_close(solve(rhs), masked, rtol=1e-9, atol=1e-9)


@settings(max_examples=50)
@given(
    k=st.integers(1, 5),
    m=st.integers(1, 70),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_free_first_is_the_stable_argsort_of_active(k: int, m: int, density: float, seed: int):
    """Each row's free indices first, then its active ones, both in increasing order: a stable
    sort of ``active`` (the reference)."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(k, m, generator=g) < density
    expected = torch.argsort(active.to(torch.uint8), dim=1, stable=True)
    assert torch.equal(free_first(active), expected)


@settings(max_examples=30)
@given(k=st.integers(1, 4), n=st.integers(1, 40), log_conditioning=st.floats(0, 10))
def test_upper_cholesky_is_the_lower_factor(k: int, n: int, log_conditioning: float):
    """The transposed upper factor is lower-triangular, reproduces ``K`` and is the factor that
    numpy computes (the reference), on positive definite batches up to ``κ = 10¹⁰``."""
    g = torch.Generator().manual_seed(k * 1000 + n)
    Q, _ = torch.linalg.qr(torch.randn(k, n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -log_conditioning, n, dtype=torch.float64)
    K = (Q * eigenvalues) @ Q.mT
    K = (K + K.mT) / 2
    L = upper_cholesky(K)
    assert torch.equal(L, L.tril())
    assert torch.allclose(L @ L.mT, K, rtol=0, atol=1e-12)
    expected = torch.from_numpy(np.linalg.cholesky(K.numpy()))
    assert torch.allclose(L, expected, rtol=0, atol=1e-9 * 10 ** (log_conditioning / 2))


@pytest.mark.parametrize("m", [7, 16, 30])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounded_refinement_keeps_each_rows_least_residual_iterate(m: int, seed: int):
    """``refine(rounded=True)`` on the values of a singular float32 Gramian (whose rounding makes
    it slightly indefinite), against the iterates of the refinement computed row by row with
    ``numpy.linalg.solve``: each row is one of its clamped iterates (the face solution included),
    with its residual, no worse than the face solution's nor the first step's."""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, m // 2)
    J = torch.randn(m, rank, generator=g, dtype=torch.float64)
    J = (J @ torch.randn(rank, 2 * m, generator=g, dtype=torch.float64)).float()
    G_exact = (J @ J.T).double()
    G = G_exact + 1e-5 * torch.diag(G_exact.diagonal())  # the float32 Tikhonov term
    U = torch.eye(m, dtype=torch.float64)
    tol = 2e-5
    V, _, active, _ = _masked_pivoting(G, U, U @ G > 0, row_scales(G), tol, 3 * m + 10)
    X, residual = refine(G_exact, G, U, V, active, tol, masked=True, rounded=True)

    # The reference iterates, v ← v − P_F G_FF⁻¹ (G_exact v)_F, and their clamped candidates.
    G_np, G_exact_np = G.numpy(), G_exact.numpy()
    candidates = []
    refined = np.maximum(V.numpy(), U.numpy())
    for step in range(_REFINEMENTS + 1):
        if step > 0:
            gradient = refined @ G_exact_np
            for i in range(m):
                free = ~active[i].numpy()
                refined[i, free] -= np.linalg.solve(G_np[np.ix_(free, free)], gradient[i, free])
        candidates.append(np.maximum(refined, U.numpy()))
    candidates_t = torch.from_numpy(np.stack(candidates))  # [steps + 1, m, m]
    residuals = torch.stack(
        [feasible_kkt_residual(G_exact, U, C, C @ G_exact) for C in candidates_t]
    )
    assert bool((X >= U).all())
    torch.testing.assert_close(residual, feasible_kkt_residual(G_exact, U, X, X @ G_exact))
    # Each row is one of its candidates, up to the rounding of the solves (which the drift along
    # the near-null space of G_exact, about 10⁻⁷ / 10⁻⁵ per step, carries over).
    distance = (candidates_t - X).abs().amax(dim=2) / X.abs().amax(dim=1)
    assert bool((distance.amin(dim=0) <= 1e-4).all())
    # Never worse than the face solution or its first refinement step.
    bound = torch.minimum(residuals[0], residuals[1])
    assert bool((residual <= bound * (1 + 1e-3) + 1e-10).all())


@settings(max_examples=30)
@given(m=st.integers(1, 12), k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_feasible_kkt_residual_with_shared_scales(m: int, k: int, seed: int):
    """:func:`feasible_kkt_residual` given :func:`kkt_scales` (computed once, as the refinement
    does) is the residual computed without them, and :func:`kkt_residual` on feasible rows (rows
    of very different norms, a zero row of ``G``)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, m + 2, generator=g, dtype=torch.float64)
    J = J * 10 ** (4 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 2)
    J[0] = 0.0
    G = J @ J.T
    U = torch.randn(k, m, generator=g, dtype=torch.float64)
    V = U + torch.rand(k, m, generator=g, dtype=torch.float64) * (
        torch.rand(k, m, generator=g) < 0.5
    )
    scales = kkt_scales(G, U)
    shared = feasible_kkt_residual(G, U, V, V @ G, scales)
    assert torch.equal(shared, feasible_kkt_residual(G, U, V, V @ G))
    torch.testing.assert_close(shared, kkt_residual(G, U, V, V @ G), rtol=1e-12, atol=0)

"""The exact mode's give-up on degenerate batches (``_bounded_qp._LEAST_NORM_GIVE_UP``): the
compacted pivoting loop stops every row, unconverged, when it has solved none by that step, and
is unchanged otherwise; the batches it gives up go to the interior point whole, and their rows
still meet the KKT conditions with the least-energy weights (certified by a linear program)."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from tests.reference.dual_cone import kkt_violation
from tests.reference.matrices import make
from torchjd.linalg import _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, tikhonov
from torchjd.linalg._kkt import row_scales
from torchjd.linalg._principal_pivoting import _masked_pivoting


def degenerate_jacobian(seed: int) -> torch.Tensor:
    """64 rows of rank 20 in 20 columns, a shared direction, row norms over two decades: a
    batch where pivoting solves no row within the first steps."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(64, 20, generator=g, dtype=torch.float64)
    J = J @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    J = J + torch.randn(1, 20, generator=g, dtype=torch.float64)
    norms = 10 ** (torch.rand(64, 1, generator=g, dtype=torch.float64) * 2 - 1)
    return J / J.norm(dim=1, keepdim=True) * norms


def least_energy_gap(J: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """How far ``v`` is from being, among the ``v ≥ u`` with its update (``Qᵀv`` fixed for an
    orthonormal basis ``Q`` of the column space of ``J``), the one of least ``Σ_j w_j v_j²``
    (``w_j = ‖J_j‖²``): the least ``t`` for which some ``λ`` meets the optimality conditions of
    that strictly convex problem, ``2 w_j v_j = (Qλ)_j`` on the free indices and ``≤`` on the
    others (their multipliers ``≥ 0``), each within ``t`` of ``max_j 2 w_j |v_j|`` (by HiGHS)."""
    left, singular_values, _ = np.linalg.svd(J, full_matrices=False)
    Q = left[:, singular_values > 1e-12 * singular_values.max()]
    g = 2 * (J * J).sum(axis=1) * v
    g = g / np.abs(g).max()
    free = v - u > 1e-9 * np.abs(u).max()
    rows = np.concatenate([Q[free], -Q[free], Q[~free]])
    bounds = np.concatenate([g[free], -g[free], g[~free]])
    r = Q.shape[1]
    objective = np.zeros(r + 1)
    objective[-1] = 1.0
    result = linprog(
        objective,
        A_ub=np.concatenate([rows, -np.ones((len(rows), 1))], axis=1),
        b_ub=bounds,
        bounds=[(None, None)] * r + [(0.0, None)],
        method="highs",
    )
    assert result.success
    return float(result.x[-1])


def pivot(G: torch.Tensor, give_up: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compacted loop on the unit rows of the regularised ``G``, from the one-step guess, as
    the exact mode runs it: the rows, which converged, and the step at which each left."""
    G_reg = tikhonov(G)
    U = torch.eye(G.shape[0], dtype=G.dtype)
    tol = LEAST_NORM_TOL[G.dtype]
    X, converged, _, kept = _masked_pivoting(
        G_reg, U, G_reg > 0, row_scales(G_reg), tol, 15, True, True, give_up
    )
    return X, converged, kept[1]


@pytest.mark.parametrize("give_up", [0, 2, 4, 8])
@pytest.mark.parametrize(
    ("family", "m", "n", "seed"),
    [
        ("normal", 40, 12, 0),
        ("rank_deficient", 48, 30, 1),
        ("duplicate_rows", 64, 40, 2),
        ("common_direction", 64, 80, 3),
        ("mixed_row_norms", 40, 8, 4),
    ],
)
def test_unchanged_unless_nothing_is_solved(family: str, m: int, n: int, seed: int, give_up: int):
    """Where some row is solved by step ``give_up``, the loop's rows and flags are those without
    it (bit for bit); where none is, every row stops there, unconverged."""
    J = make(family, m, n, seed=seed)
    G = J @ J.T
    G = G / G.trace()
    X, converged, finished = pivot(G, None)
    X_given, converged_given, finished_given = pivot(G, give_up)
    if bool((converged & (finished <= give_up)).any()):
        assert torch.equal(X_given, X)
        assert torch.equal(converged_given, converged)
        assert torch.equal(finished_given, finished)
    else:
        assert not bool(converged_given.any())
        assert bool((finished_given <= give_up).all())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_degenerate_batch_is_given_up(seed: int):
    """Pivoting solves no row of the batch within the first steps: none converges."""
    G = degenerate_jacobian(seed)
    G = G @ G.T
    _, converged, finished = pivot(G / G.trace(), _bounded_qp._LEAST_NORM_GIVE_UP)
    assert not bool(converged.any())
    assert bool((finished == _bounded_qp._LEAST_NORM_GIVE_UP).all())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_given_up_rows_are_optimal_with_least_energy(seed: int, monkeypatch: pytest.MonkeyPatch):
    """The exact mode's unit rows of such a batch: all go to the fallback at once, and each meets
    the KKT conditions on ``G`` with the weights of least ``Σ_j ‖J_j‖² v_j²`` among the optimal
    ones (see :func:`least_energy_gap`)."""
    calls = []
    fallback = _bounded_qp._least_norm_fallback

    def spied(G, G_exact, U, tol, factor=None):
        calls.append(U.shape[0])
        return fallback(G, G_exact, U, tol, factor)

    monkeypatch.setattr(_bounded_qp, "_least_norm_fallback", spied)
    J = degenerate_jacobian(seed)
    J = J / (J * J).sum().sqrt()  # (the exact mode normalises G by its trace)
    G = J @ J.T
    V = _bounded_qp._exact_unit_route(G, LEAST_NORM_TOL[G.dtype], 10_000)
    assert calls == [64]
    assert not bool(V.isnan().any())
    G_np, J_np = G.numpy(), J.numpy()
    for u, v in zip(np.eye(64), V.numpy(), strict=True):
        assert kkt_violation(G_np, u, v) <= 1e-8
        assert least_energy_gap(J_np, u, v) <= 1e-6


def test_least_energy_gap_detects_heavier_optima():
    """The certificate's own check: moving an optimum along the null space of ``Jᵀ`` (the same
    update, heavier weights) opens a gap."""
    J = degenerate_jacobian(1)
    J = J / (J * J).sum().sqrt()
    V = _bounded_qp._exact_unit_route(J @ J.T, LEAST_NORM_TOL[J.dtype], 10_000).numpy()
    left, singular_values, _ = np.linalg.svd(J.numpy(), full_matrices=False)
    Q = left[:, singular_values > 1e-12 * singular_values.max()]
    rng = np.random.default_rng(0)
    for u, v in zip(np.eye(64)[:3], V[:3], strict=True):
        direction = rng.standard_normal(64)
        direction -= Q @ (Q.T @ direction)
        assert least_energy_gap(J.numpy(), u, v + 1e-6 * direction / np.abs(direction).max()) > 1e-3

"""The exact mode on singular Gramians up to ``m = 64``, in float64 (also for float32 Gramians):
pivoting on the regularised Gramian, then the least-norm refinement until it settles
(``_bounded_qp._refined_least_norm``), against the general route (pivoting with the refinement of
every face, and its fallbacks) that it short-cuts, and against an independent reference (the
projection and its least-energy weights, both by quadprog)."""

from collections.abc import Callable

import numpy as np
import pytest
import quadprog
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import kkt_violation
from tests.reference.matrices import make
from torchjd.linalg import TorchProjector, _bounded_qp, _principal_pivoting
from torchjd.linalg._kkt import kkt_residual


def exact() -> TorchProjector:
    return TorchProjector(norm_eps=0.0, reg_eps=0.0)


def more_rows(m: int, seed: int) -> torch.Tensor:
    return make("normal", m, m // 2, seed=seed)


def shared_direction(m: int, seed: int) -> torch.Tensor:
    """Few conflicts, in a Gramian of rank m / 4."""
    return make("rank_deficient", m, m // 4, seed=seed) + make("normal", 1, m // 4, seed=seed + 1)


SINGULAR: dict[str, Callable[[int, int], torch.Tensor]] = {
    "rank_deficient": lambda m, seed: make("rank_deficient", m, 4 * m, seed=seed),
    "more_rows": more_rows,
    "duplicate_rows": lambda m, seed: make("duplicate_rows", m, 4 * m, seed=seed),
    "zero_row": lambda m, seed: make("zero_row", m, 4 * m, seed=seed),
    "opposite_rows": lambda m, seed: make("opposite_rows", m, 4 * m, seed=seed),
    "shared_direction": shared_direction,
}


@pytest.mark.parametrize("family", sorted(SINGULAR))
@pytest.mark.parametrize("m", [16, 32, 48])
def test_same_weights_as_the_general_route(family: str, m: int, monkeypatch: pytest.MonkeyPatch):
    """The rows it solves (it must solve some) have the weights of the general route, up to its
    rounding, and meet the KKT conditions on ``G``."""
    J = SINGULAR[family](m, m)
    G = J @ J.T
    assert not _bounded_qp._nonsingular(G / G.trace())
    U = torch.eye(m, dtype=torch.float64)
    original = _bounded_qp._refined_least_norm
    solved_rows = []

    def spy(*args, **kwargs):
        X, solved = original(*args, **kwargs)
        solved_rows.append(int(solved.sum()))
        return X, solved

    monkeypatch.setattr(_bounded_qp, "_refined_least_norm", spy)
    V = exact()(U, G)
    assert len(solved_rows) == 1
    assert solved_rows[0] > 0

    def unsolved(G, G_exact, U, GU, tol, factor=None):
        return U.clone(), torch.zeros(U.shape[0], dtype=torch.bool)

    monkeypatch.setattr(_bounded_qp, "_refined_least_norm", unsolved)
    expected = exact()(U, G)
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(V / scale, expected / scale, rtol=0.0, atol=1e-7)
    Gn = (G / G.trace()).numpy()
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(Gn, u, v) <= 1e-8
    np.testing.assert_array_less(-1e-12, (V - U).numpy())


@pytest.mark.parametrize(
    ("m", "dtype"), [(16, torch.float32), (48, torch.float64), (64, torch.float32)]
)
def test_taken_up_to_64_rows_and_in_float32(m: int, dtype: torch.dtype, monkeypatch):
    """Up to ``m = 64``, and on float32 Gramians (solved in float64 at once), the rows go through
    it, and most are final there (not solved a second time by the general route)."""
    original = _bounded_qp._refined_least_norm
    final_rows = []

    def spy(G, G_exact, U, GU, tol, factor=None):
        X, final = original(G, G_exact, U, GU, tol, factor)
        final_rows.append((int(final.sum()), U.shape[0]))
        return X, final

    monkeypatch.setattr(_bounded_qp, "_refined_least_norm", spy)
    J = make("duplicate_rows", m, 4 * m, seed=m).to(dtype)
    U = torch.eye(m, dtype=dtype)
    V = exact()(U, J @ J.T)
    assert len(final_rows) == 1
    final, rows = final_rows[0]
    assert final >= rows - 2
    G = (J @ J.T).double()
    G = G / G.trace()
    residual = kkt_residual(G, U.double(), V.double(), V.double() @ G)
    assert residual.max() <= (1e-8 if dtype == torch.float64 else 1e-4)


def projection(J: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The projection of ``Jᵀu`` onto ``{d : J d ≥ 0}``: quadprog on ``min ‖d − Jᵀu‖²``."""
    return quadprog.solve_qp(np.eye(J.shape[1]), J.T @ u, J.T, np.zeros(J.shape[0]), 0)[0]


def least_energy(J: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Among the ``w ≥ u`` with ``Jᵀw = Jᵀv`` (``Qᵀw = Qᵀv``, ``Q`` an orthonormal basis of the
    column space of ``J``), the one of least ``Σ_j ‖J_j‖² w_j²``, by quadprog (the bound relaxed by
    ``1e-12``: at a degenerate vertex, its rounding may find them inconsistent)."""
    Q, singular_values, _ = np.linalg.svd(J, full_matrices=False)
    Q = Q[:, singular_values > 1e-10 * singular_values.max()]
    constraints = np.concatenate([Q, np.eye(len(u))], axis=1)
    bounds = np.concatenate([Q.T @ v, u - 1e-12])
    weights = 2 * np.diag((J * J).sum(axis=1))
    return quadprog.solve_qp(weights, np.zeros(len(u)), constraints, bounds, Q.shape[1])[0]


@settings(max_examples=15)
@given(
    m=st.sampled_from([12, 24, 40, 64]),
    rank_fraction=st.floats(0.2, 0.8),
    shared=st.floats(0.0, 1.5),
    seed=st.integers(0, 2**16),
)
def test_projection_and_least_energy_against_quadprog(
    m: int, rank_fraction: float, shared: float, seed: int
):
    """Rank-deficient Jacobians (more rows than the rank, a shared direction of random weight; the
    null space well separated, so that the update is well determined):
    the update is the projection (quadprog, from ``J`` alone), and the weights are, among those
    of this update, the ones of least ``Σ_j ‖J_j‖² v_j²`` (quadprog), up to the bias of the tiny
    Tikhonov term (up to about ``1e-4`` relative with a dozen rows per rank; another optimal
    ``v`` differs by order one)."""
    g = torch.Generator().manual_seed(seed)
    rank = max(2, int(rank_fraction * m))
    A = torch.randn(m, rank, generator=g, dtype=torch.float64)
    A = A + shared * torch.randn(1, rank, generator=g, dtype=torch.float64)
    J = A @ torch.randn(rank, 2 * m, generator=g, dtype=torch.float64)
    J = J / (J * J).sum().sqrt()
    G = J @ J.T
    U = torch.eye(m, dtype=torch.float64)
    V = exact()(U, G).numpy()
    for u, v in zip(U.numpy(), V, strict=True):
        d = projection(J.numpy(), u)
        np.testing.assert_allclose(J.T.numpy() @ v, d, atol=1e-7 * max(1.0, np.abs(d).max()))
        expected = least_energy(J.numpy(), u, v)
        np.testing.assert_allclose(v, expected, atol=1e-3 * max(1.0, np.abs(expected).max()))
        assert kkt_violation(G.numpy(), u, v) <= 1e-8


@pytest.mark.parametrize("m", [16, 40])
def test_refinement_stops_once_settled(m: int, monkeypatch: pytest.MonkeyPatch):
    """The least-norm refinement of pivoting stops before its last step once every row meets the
    tolerance and its steps have settled (on the rows where pivoting converges), with the weights
    of all its steps to about ``1e-7``."""
    J = make("rank_deficient", m, 4 * m, seed=m)
    G_exact = J @ J.T / (J * J).sum()
    G = _bounded_qp.tikhonov(G_exact)
    U = torch.eye(m, dtype=torch.float64)
    scales = _bounded_qp.row_scales(G)
    tol = 1e-9

    def solve(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pivoting = _principal_pivoting.principal_pivoting
        return pivoting(G, U, U @ G > 0, scales, tol, 3 * m + 10, G_exact)

    _, converged = solve(U)
    U = U[converged]
    assert U.shape[0] >= m // 2
    # Solves per factorisation: the refinement's is the last one (masked faces; compacted ones
    # reuse the pivoting's factors).
    solves: list[list[int]] = []

    def counting(name: str) -> None:
        original = getattr(_principal_pivoting, name)

        def counting_face_solver(*args, **kwargs):
            solve, count = original(*args, **kwargs), []
            solves.append(count)
            return lambda rhs: count.append(1) or solve(rhs)

        monkeypatch.setattr(_principal_pivoting, name, counting_face_solver)

    counting("face_solver")
    counting("_kept_grouped_solver")
    X, _ = solve(U)
    assert len(solves[-1]) < _principal_pivoting._REFINEMENTS
    assert (kkt_residual(G_exact, U, X, X @ G_exact) <= tol).all()
    monkeypatch.setattr(_principal_pivoting, "_SETTLED", 0.0)  # every step
    expected, _ = solve(U)
    assert len(solves[-1]) == _principal_pivoting._REFINEMENTS
    scale = expected.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(X / scale, expected / scale, rtol=0.0, atol=3e-7)


@pytest.mark.parametrize("seed", range(4))
def test_float32_low_rank_with_row_norms_over_decades_does_not_conflict(seed: int):
    """A float32 Jacobian of rank 3 with row norms over six decades (weights up to about 1e4):
    the refinement keeps a row's face solution when refining it would make a tiny row conflict
    (a clamp of a large weight's rounding moves a tiny row's gradient by much, relatively)."""
    m = 32
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, 3, generator=g, dtype=torch.float64)
    J = J * torch.logspace(-6, 0, m, dtype=torch.float64)[torch.randperm(m, generator=g)].unsqueeze(
        1
    )
    J = J.float()
    G = J @ J.T
    V = exact()(torch.eye(m), G).double()
    d = J.double().T @ V.sum(dim=0)
    norms = J.double().norm(dim=1)
    assert ((J.double() @ d) / (norms * norms.max())).min() >= -1e-4


@pytest.mark.parametrize("family", ["rank_deficient", "duplicate_rows", "shared_direction"])
def test_few_rows_at_64_masked_as_compacted(family: str, monkeypatch: pytest.MonkeyPatch):
    """Least-norm pivoting of a few rows at ``m = 64`` (masked full-size systems) gives the
    weights and the convergence of the compacted face systems."""
    m = 64
    J = SINGULAR[family](m, m)
    G_exact = J @ J.T / (J * J).sum()
    G = _bounded_qp.tikhonov(G_exact)
    U = torch.eye(m, dtype=torch.float64)[:3]

    def solve() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scales = _bounded_qp.row_scales(G)
        X, converged, residual, _ = _principal_pivoting.least_norm_pivoting(
            G, U, U @ G > 0, scales, 1e-9, 15, G_exact
        )
        return X, converged, residual

    X, converged, residual = solve()
    assert converged.any()
    monkeypatch.setattr(_principal_pivoting, "_MASKED_BUDGET", 0)
    expected, expected_converged, _ = solve()
    assert torch.equal(converged, expected_converged)
    scale = expected.abs().amax(dim=1, keepdim=True)
    rows = converged.nonzero().squeeze(1)
    torch.testing.assert_close(
        X[rows] / scale[rows], expected[rows] / scale[rows], rtol=0, atol=1e-7
    )
    torch.testing.assert_close(residual, kkt_residual(G_exact, U, X, X @ G_exact))


def test_wandering_rows_leave_pivoting_early(monkeypatch: pytest.MonkeyPatch):
    """At ``m = 64``, with many more rows than the rank, least-norm pivoting leaves many rows
    unsolved; those left to single pivots with more infeasible indices than steps left stop (for
    the interior point) before the last step, which few rows reach."""
    m = 64
    J = torch.randn(m, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    G_exact = J @ J.T / (J * J).sum()
    G = _bounded_qp.tikhonov(G_exact)
    U = torch.eye(m, dtype=torch.float64)
    batch_sizes = []
    original = _principal_pivoting.compacted_blocks  # once per step, on the rows left

    def counting(bordered, index):
        batch_sizes.append(index.shape[0])
        return original(bordered, index)

    monkeypatch.setattr(_principal_pivoting, "compacted_blocks", counting)
    scales = _bounded_qp.row_scales(G)
    pivoting = _principal_pivoting.least_norm_pivoting
    _, converged, *_ = pivoting(G, U, U @ G > 0, scales, 1e-9, 15, G_exact)
    unsolved = int((~converged).sum())
    assert unsolved >= m // 2
    assert batch_sizes[-1] <= unsolved // 4

"""The exact mode's route for Gramians whose only singular part is zero rows and pairs of opposite
rows (:mod:`torchjd.linalg._opposite_pairs`, :func:`~torchjd.linalg._bounded_qp._paired_route`,
beyond ``m = 64``): the update against an independent solver of the projection (quadprog, on the
primal problem in ``d``), the weights against an independent least-norm solve over the optimal
set (quadprog, in the null space of ``G``), the KKT conditions on ``G`` itself, non-conflict,
and the structure it reads."""

import numpy as np
import pytest
import quadprog
import torch

from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _paired_route, solve_lower_bounded_qp
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._opposite_pairs import opposite_pairs


def paired_jacobian(
    m: int, n: int, pairs: int, zeros: int, seed: int, spread: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 Jacobian with ``pairs`` rows ``J_a = −c J_b`` (``c`` in ``[0.1, 10]``) and
    ``zeros`` zero rows, the others random (a shared direction; row norms over four decades when
    ``spread``); and the indices ``a``, ``b`` and of the zero rows."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    J += torch.randn(1, n, generator=g, dtype=torch.float64)
    if spread:
        J *= 10 ** (4 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 2)
    rows = torch.randperm(m, generator=g)
    a, b = rows[:pairs], rows[pairs : 2 * pairs]
    c = 10 ** (2 * torch.rand(pairs, 1, generator=g, dtype=torch.float64) - 1)
    J[a] = -c * J[b]
    zero = rows[2 * pairs : 2 * pairs + zeros]
    J[zero] = 0.0
    return J, a, b, zero


def projection(J: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``argmin_{J d ≥ 0} ‖d − Jᵀu‖²`` by quadprog (its Hessian: the identity)."""
    n = J.shape[1]
    return quadprog.solve_qp(np.eye(n), J.T @ u, J.T, np.zeros(J.shape[0]), 0)[0]


def least_energy(G: np.ndarray, u: np.ndarray, v: np.ndarray, N: np.ndarray) -> float:
    """``min Σ_j G_jj x_j²`` over ``x = v + N y ≥ u``, by quadprog: ``N`` spans the null space of
    ``G`` less its zero rows (from the construction: ``e_a + c e_b`` for each pair), so that
    ``x`` has the update of ``v`` (on the zero rows, ``x = v``); constraints on the rows where
    ``N`` is nonzero."""
    W = np.diag(G)
    H = N.T @ (W[:, None] * N)
    support = np.abs(N).sum(axis=1) > 0
    C = N[support]
    y = quadprog.solve_qp(H, -(N.T @ (W * v)), C.T, (u - v)[support], 0)[0]
    x = v + N @ y
    return float(W @ (x * x))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("zeros", [0, 5])
def test_update_and_least_norm_weights(seed: int, zeros: int) -> None:
    m, n, pairs = 80, 110, 8
    J, a, b, zero = paired_jacobian(m, n, pairs, zeros, seed)
    J = J / (J * J).sum().sqrt()  # G of unit trace
    N = np.zeros((m, pairs))
    N[a.numpy(), np.arange(pairs)] = 1.0
    N[b.numpy(), np.arange(pairs)] = (J[a].norm(dim=1) / J[b].norm(dim=1)).numpy()
    assert np.abs(J.numpy().T @ N).max() <= 1e-14
    G = J @ J.T
    g = torch.Generator().manual_seed(100 + seed)
    # UPGrad's rows of a pair's member, of a plain row, and general rows.
    U = torch.cat(
        [
            torch.eye(m, dtype=torch.float64)[[int(a[0]), int(b[1]), int(a[2]), 3]],
            torch.rand(4, m, generator=g, dtype=torch.float64),
            # (negative bounds: a pair's least-norm split can leave both weights off them)
            2 * torch.rand(4, m, generator=g, dtype=torch.float64) - 1,
        ]
    )
    if zeros:
        U = torch.cat([U, torch.eye(m, dtype=torch.float64)[zero[:1]]])
    result = _paired_route(G, U, LEAST_NORM_TOL[torch.float64], 10_000)
    assert result is not None  # the route is taken
    V, solved = result
    assert bool(solved.all())
    # (the solver's own call: its rows without conflict returned at once, G symmetrised)
    torch.testing.assert_close(
        solve_lower_bounded_qp(G, U, least_norm=True), V, rtol=1e-9, atol=1e-12
    )
    assert (V >= U).all()
    assert (kkt_residual(G, U, V, V @ G) <= LEAST_NORM_TOL[torch.float64]).all()
    # Zero rows at max(u_j, 0), as the other routes give them (any weight >= u_j is optimal).
    assert torch.equal(V[:, zero], U[:, zero].clamp_min(0))
    J_np, G_np = J.numpy(), G.numpy()
    scale = float(J.norm(dim=1).max())
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        d = J_np.T @ v
        reference = projection(J_np, u)
        assert np.linalg.norm(d - reference) <= 1e-7 * scale * np.abs(u).max()
        energy = float(np.diag(G_np) @ (v * v))
        assert energy <= least_energy(G_np, u, v, N) * (1 + 1e-7) + 1e-300


@pytest.mark.parametrize("seed", range(3))
def test_non_conflict_float32(seed: int) -> None:
    m, n = 96, 150
    J, *_ = paired_jacobian(m, n, 10, 4, seed)
    J = J.float()
    G = J @ J.T
    U = torch.eye(m) / m
    result = _paired_route((G + G.T) / 2, U, LEAST_NORM_TOL[torch.float32], 10_000)
    assert result is not None
    assert bool(result[1].all())  # the route is taken, every row accepted
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert V.isfinite().all()
    assert (V >= U).all()
    d = (J.double().T @ V.double().T).T  # each row's update
    norms = J.double().norm(dim=1)
    conflict = (d @ J.double().T) / (norms * norms.max()).clamp_min(1e-300)
    assert (conflict >= -1e-4 / m).all()


def test_structure() -> None:
    J, a, b, zero = paired_jacobian(70, 100, 6, 3, 0, spread=False)
    G = J @ J.T
    structure = opposite_pairs(G, torch.float64)
    assert structure is not None
    found = {
        frozenset(pair) for pair in zip(structure.a.tolist(), structure.b.tolist(), strict=True)
    }
    assert found == {frozenset(pair) for pair in zip(a.tolist(), b.tolist(), strict=True)}
    assert set(structure.zero.nonzero().squeeze(1).tolist()) == set(zero.tolist())
    norms = J.norm(dim=1)
    assert (norms[structure.b] >= norms[structure.a]).all()
    torch.testing.assert_close(structure.c, norms[structure.a] / norms[structure.b])
    assert len(structure.rest) == 70 - 12 - 3
    # The reduced Gramian: that of the other rows projected off the pairs' directions.
    B = J[structure.b]
    P = torch.eye(100, dtype=torch.float64) - B.T @ torch.linalg.solve(B @ B.T, B)
    R = J[structure.rest] @ P
    torch.testing.assert_close(
        structure.reduced, R @ R.T, atol=1e-9 * float(G.diagonal().max()), rtol=0
    )


def test_declines() -> None:
    J, *_ = paired_jacobian(70, 100, 0, 0, 1)
    assert opposite_pairs(J @ J.T, torch.float64) is None  # no zero row, no pair
    J, _, b, _ = paired_jacobian(70, 100, 4, 0, 2)
    J[int(b[1])] = 2.0 * J[int(b[0])]  # parallel to a row other than its partner
    assert opposite_pairs(J @ J.T, torch.float64) is None
    # More rows than columns: the reduced Gramian is singular, the route declines.
    J, *_ = paired_jacobian(90, 50, 6, 2, 3)
    G = J @ J.T
    assert opposite_pairs(G, torch.float64) is not None
    assert _paired_route(G, torch.eye(90, dtype=torch.float64), 1e-9, 10_000) is None


def test_detection_symmetric_at_the_threshold() -> None:
    # A G not bitwise symmetric whose pair (0, 1) is opposite within the threshold one way only:
    # both rows must see each other, else row 0 would be in a pair and among the other rows.
    J = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G = J @ J.T
    root = G.diagonal().sqrt()
    G[0, 1] = -(1 - 0.5e-10) * root[0] * root[1]
    G[1, 0] = -(1 - 2e-10) * root[0] * root[1]
    structure = opposite_pairs(G, torch.float64)
    if structure is not None:
        rows = torch.cat([structure.a, structure.b, structure.rest]).sort().values
        assert torch.equal(rows, torch.arange(4))

"""Exact mode beyond ``m = 64``: the rows that warm-started pivoting leaves, pivoted on the faces of
``G`` itself in float64 (``exact_face_pivoting``, then their least-norm weights), and the float32
rows it leaves, pivoted again in float64 (``float64_pivoting``). Checked against independent
solvers (quadprog): the projection of ``Jᵀu`` onto the dual cone, and the least-energy weights of
that update (a quadratic program over ``v + N y ≥ u``, ``N`` spanning the null space of ``Jᵀ``).
Also the face blocks that pivoting gathers a few at a time (``compacted_blocks``)."""

import numpy as np
import pytest
import quadprog
import torch

from torchjd.linalg import _bounded_qp, _principal_pivoting, _warm_start
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, solve_lower_bounded_qp, tikhonov
from torchjd.linalg._kkt import kkt_residual, worst_conflict
from torchjd.linalg._principal_pivoting import bordered_scaled, compacted_blocks


def near_duplicate_jacobian(m: int, seed: int) -> torch.Tensor:
    """A float64 Jacobian of rank about ``0.6 m`` (more columns than rows) whose first ``m / 8``
    rows duplicate the next ``m / 8`` up to ``10⁻⁶``: ``G`` singular, with eigenvalues far below
    the exact mode's Tikhonov term."""
    g = torch.Generator().manual_seed(seed)
    n, rank, k = 2 * m, 3 * m // 5, m // 8
    J = torch.randn(m, rank, generator=g, dtype=torch.float64)
    J = J @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    J[:k] = J[k : 2 * k] + 1e-6 * torch.randn(k, n, generator=g, dtype=torch.float64)
    return J / J.norm()  # G of unit trace


def tall_jacobian(m: int, seed: int) -> torch.Tensor:
    """A float64 Jacobian with more rows than columns (``2m / 3``), a shared direction and row
    norms over six decades."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * m // 3
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    J += 0.5 * torch.randn(1, n, generator=g, dtype=torch.float64)
    norms = 10 ** (6 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 3)
    return J / J.norm(dim=1, keepdim=True) * norms


def projection(J: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``argmin_{J d ≥ 0} ‖d − Jᵀu‖²`` by quadprog."""
    n = J.shape[1]
    return quadprog.solve_qp(np.eye(n), J.T @ u, J.T, np.zeros(J.shape[0]), 0)[0]


def least_energy(J: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """``min Σ_j ‖J_j‖² x_j²`` over ``x = v + N y ≥ u`` (the update of ``v``), by quadprog, with
    ``N`` the right singular vectors of ``Jᵀ`` of singular value below ``10⁻¹⁰`` of its largest
    (the near-duplicate rows' own directions, at ``10⁻⁶``, are not in it)."""
    W = (J * J).sum(axis=1)
    left, singular, _ = np.linalg.svd(J, full_matrices=True)
    rank = int((singular > 1e-10 * singular[0]).sum())
    N = left[:, rank:]
    H = N.T @ (W[:, None] * N)
    y = quadprog.solve_qp((H + H.T) / 2, -(N.T @ (W * v)), N.T, u - v, 0)[0]
    x = v + N @ y
    return float(W @ (x * x))


@pytest.mark.parametrize("seed", range(3))
def test_near_duplicate_rows_by_exact_faces(seed: int, monkeypatch) -> None:
    m = 72
    J = near_duplicate_jacobian(m, seed)
    G = J @ J.T
    accepted = []
    route = _bounded_qp.exact_face_pivoting

    def counted(G: torch.Tensor, U: torch.Tensor, X: torch.Tensor, tol: float):  # type: ignore[no-untyped-def]
        result = route(G, U, X, tol)
        accepted.append(int(result[1].sum()))
        return result

    monkeypatch.setattr(_bounded_qp, "exact_face_pivoting", counted)
    U = torch.eye(m, dtype=torch.float64)
    V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert sum(accepted) > 0  # the route solves rows
    assert torch.all(V >= U)
    assert kkt_residual(G, U, V, V @ G).max() <= LEAST_NORM_TOL[torch.float64]
    J_np, scale = J.numpy(), float(J.norm(dim=1).max())
    for i in range(0, m, 7):
        u, v = U[i].numpy(), V[i].numpy()
        d = projection(J_np, u)
        assert np.abs(J_np.T @ v - d).max() <= 1e-7 * scale
        energy = float(((J * J).sum(dim=1) * V[i] ** 2).sum())
        assert energy <= least_energy(J_np, u, v) * (1 + 1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_float32_rows_pivoted_again_in_float64(seed: int) -> None:
    """The float32 rows of a tall Jacobian, from the all-active face (as pivoting in float32 might
    leave them): solved in float64, in conflict with no row beyond the tolerance, their updates
    those of the projection."""
    m = 96
    J = tall_jacobian(m, seed).float()
    G32 = J @ J.T
    G32 = (G32 + G32.T) / 2
    U = torch.eye(m)
    tol = LEAST_NORM_TOL[torch.float32]
    G64 = G32.double()
    X, converged = _warm_start.float64_pivoting(tikhonov(G32), G64, U, U.clone(), tol)
    assert X.dtype == torch.float32
    assert bool(converged.all())
    assert torch.all(X >= U)
    X64 = X.double()
    conflict = worst_conflict(G64, U.double(), X64 @ G64)
    assert bool((conflict <= tol).all())
    J_np = J.double().numpy()
    scale = float(J.double().norm(dim=1).max())
    for i in converged.nonzero().squeeze(1)[::9].tolist():
        d = projection(J_np, U[i].double().numpy())
        update = J_np.T @ X64[i].numpy()
        assert np.abs(update - d).max() <= 1e-6 * scale


@pytest.mark.parametrize("width", [100, 140])
def test_compacted_blocks_in_chunks(width: int) -> None:
    """The blocks gathered a few at a time (by rows of ``B`` for wide blocks, by ``take`` for
    narrow ones, both beyond the size of one intermediate) are those of plain indexing, padding
    by the identity included."""
    m, g = 256, 64
    generator = torch.Generator().manual_seed(width)
    A = torch.randn(m, 300, generator=generator, dtype=torch.float64)
    _, B = bordered_scaled(A @ A.T)
    sizes = torch.randint(width // 2, width + 1, (g,), generator=generator)
    scores = torch.rand(g, m, generator=generator)
    columns = torch.argsort(scores, dim=1)[:, :width]
    slots = torch.arange(width)
    index = torch.where(slots < sizes.unsqueeze(1), columns, m + slots)  # pads: identity
    assert g * width * min(2 * m, width) > _principal_pivoting._GATHER_ENTRIES  # chunked
    expected = B[index.unsqueeze(2), index.unsqueeze(1)]
    assert torch.equal(compacted_blocks(B, index), expected)


@pytest.mark.parametrize("width", [100, 140])
def test_compacted_blocks_of_a_tracked_matrix(width: int) -> None:
    """A ``B`` that requires grad (UPGrad on a Jacobian that requires grad) gets the blocks of
    plain indexing, with their gradient: the chunked gather into a buffer does not record one."""
    m, g = 256, 64
    generator = torch.Generator().manual_seed(width)
    A = torch.randn(m, 300, generator=generator, dtype=torch.float64)
    _, B = bordered_scaled(A @ A.T)
    B = B.requires_grad_()
    index = torch.stack([torch.randperm(m, generator=generator)[:width] for _ in range(g)])
    blocks = compacted_blocks(B, index)
    expected = B[index.unsqueeze(2), index.unsqueeze(1)]
    assert torch.equal(blocks, expected)
    weights = torch.randn(blocks.shape, generator=generator, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((blocks * weights).sum(), B)
    (expected_gradient,) = torch.autograd.grad((expected * weights).sum(), B)
    assert torch.allclose(gradient, expected_gradient, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("draw", [7, 9])
def test_upgrad_on_a_tracked_jacobian_at_256_rows(exact: bool, draw: int) -> None:
    """UPGrad (default and exact mode) on a float32 Jacobian of 256 rows that requires grad (hard
    Jacobians of ``benchmarks/non_conflict.py`` whose faces are gathered in chunks) gives the
    update of the same Jacobian detached, and a finite gradient."""
    from benchmarks.non_conflict import hard_jacobian

    from torchjd.aggregation import UPGrad
    from torchjd.linalg import TorchProjector

    generator = torch.Generator().manual_seed(263)
    for _ in range(draw + 1):
        J = hard_jacobian(256, generator).float()
    projector = TorchProjector(norm_eps=0.0, reg_eps=0.0) if exact else TorchProjector()
    aggregator = UPGrad(projector=projector)
    tracked = J.clone().requires_grad_()
    update = aggregator(tracked)
    assert torch.allclose(update.detach(), aggregator(J), rtol=1e-4, atol=1e-6)
    (gradient,) = torch.autograd.grad(update.sum(), tracked)
    assert torch.isfinite(gradient).all()

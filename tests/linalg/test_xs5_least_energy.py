"""The exact mode's weights on singular float64 Gramians up to ``m = 64`` are those of least
energy (``Σ_j ‖J_j‖² v_j²``) among the optimal ones (``_bounded_qp._least_energy_polish``):
each returned row meets the KKT conditions and the optimality conditions of the least-energy
weights of its update, certified by a linear program
(:func:`~tests.linalg.test_xs3_give_up.least_energy_gap`), on Jacobians with the hard features of
``benchmarks/non_conflict.py`` (low rank, more rows than columns, a shared direction, duplicate,
opposite and zero rows, row norms over decades): the cases where the pivoting route's faces are
optimal but not of least energy."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_xs3_give_up import least_energy_gap
from tests.reference.dual_cone import kkt_violation
from torchjd.aggregation import UPGrad
from torchjd.linalg import TorchProjector, _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _exact_unit_route, solve_lower_bounded_qp

TOL = LEAST_NORM_TOL[torch.float64]


def singular_jacobian(
    m: int, columns: float, rank: float, features: list[bool], seed: int
) -> torch.Tensor:
    """A rank-deficient float64 Jacobian of ``m`` rows, normalised as the exact mode's Gramian is
    (unit trace): ``n = max(1, columns · m)`` columns, rank ``max(1, rank · min(m, n))`` (below
    ``m``), and, per flag of ``features``: a shared direction, near-duplicate rows, opposite rows
    (negative multiples of others), zero rows, row norms over six decades."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, int(columns * m))
    k = max(1, min(m - 1, int(rank * min(m, n))))
    J = torch.randn(m, k, generator=g, dtype=torch.float64)
    J = J @ torch.randn(k, n, generator=g, dtype=torch.float64)
    shared, duplicates, opposite, zero, spread = features
    if shared:
        J = J + 2 * torch.rand(1, generator=g, dtype=torch.float64) * J[:1]
    rows = torch.randperm(m, generator=g)
    block = max(1, m // 8)
    first, second, third, fourth, fifth = (rows[i * block : (i + 1) * block] for i in range(5))
    if duplicates:
        J[first] = J[second] * (1 + 1e-9 * torch.randn(block, 1, generator=g, dtype=J.dtype))
    if opposite:
        J[third] = -(10 ** (2 * torch.rand(block, 1, generator=g, dtype=J.dtype) - 1)) * J[fourth]
    if zero:
        J[fifth] = 0.0
    if spread:
        norms = 10 ** (6 * torch.rand(m, 1, generator=g, dtype=J.dtype) - 3)
        J = J / J.norm(dim=1, keepdim=True).clamp_min(1e-300) * norms
    trace = (J * J).sum()
    return J / trace.sqrt() if bool(trace > 0) else J


def assert_least_energy(J: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> None:
    """Each row ``v`` of ``V`` is optimal for its ``u`` (``G = J Jᵀ``) with the least-energy
    weights of its update (a row of zero energy, on zero rows of ``J`` only, is of least energy
    at once)."""
    G_np, J_np = (J @ J.T).numpy(), J.numpy()
    energies = np.diag(G_np)
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G_np, u, v) <= 1e-8
        if bool((energies * v != 0).any()):
            assert least_energy_gap(J_np, u, v) <= 1e-6


JACOBIANS = {
    "columns": st.floats(0.1, 4.0),
    "rank": st.floats(0.05, 0.9),
    "features": st.lists(st.booleans(), min_size=5, max_size=5),
    "seed": st.integers(0, 2**16),
}


@settings(max_examples=12, deadline=None)
@given(m=st.integers(8, 32), **JACOBIANS)
def test_unit_rows_have_least_energy(
    m: int, columns: float, rank: float, features: list[bool], seed: int
):
    """UPGrad's problems (the unit vectors, :func:`_exact_unit_route`): every row optimal with
    the least-energy weights (a zero row of ``J`` has no conflict: ``v = u``)."""
    J = singular_jacobian(m, columns, rank, features, seed)
    V = _exact_unit_route(J @ J.T, TOL, 10_000)
    assert_least_energy(J, torch.eye(m, dtype=J.dtype), V)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(8, 24), **JACOBIANS)
def test_general_rows_have_least_energy(
    m: int, columns: float, rank: float, features: list[bool], seed: int
):
    """The general rows of the exact mode (:func:`solve_lower_bounded_qp` with ``least_norm``):
    non-negative rows with a few positive entries, each optimal with the least-energy weights."""
    J = singular_jacobian(m, columns, rank, features, seed)
    g = torch.Generator().manual_seed(seed + 1)
    U = torch.rand(4, m, generator=g, dtype=J.dtype)
    U = torch.where(torch.rand(4, m, generator=g, dtype=J.dtype) < 0.3, U, 0.0)
    U[:, 0] = 1.0
    V = solve_lower_bounded_qp(J @ J.T, U, least_norm=True)
    assert_least_energy(J, U, V)


def test_upgrad_exact_mode_sums_least_energy_rows():
    """UPGrad's exact mode on such a Jacobian: its update is that of the least-energy unit rows
    (their mean times ``J``), without conflict."""
    J = singular_jacobian(24, 2.2, 0.34, [False, False, True, False, True], 507)
    d = UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))(J)
    V = _exact_unit_route(J @ J.T, TOL, 10_000)
    assert_least_energy(J, torch.eye(24, dtype=J.dtype), V)
    torch.testing.assert_close(d, V.mean(dim=0) @ J, rtol=1e-9, atol=1e-12)
    norms = J.norm(dim=1)
    assert bool((J @ d >= -1e-8 * norms * norms.max()).all())


def test_float32_and_large_gramians_are_left_alone():
    """The polish declines a float32 ``G`` and one beyond ``m = 64``: the rows come back as
    given."""
    for m, dtype in [(16, torch.float32), (72, torch.float64)]:
        J = singular_jacobian(m, 0.5, 0.5, [False] * 5, 1).to(dtype)
        X = torch.rand(m, m, dtype=dtype)
        assert _bounded_qp._least_energy_polish(J @ J.T, torch.eye(m, dtype=dtype), X, TOL) is X

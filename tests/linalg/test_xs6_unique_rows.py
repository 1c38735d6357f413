"""The exact mode's least-energy polish skips the rows whose optimal weights are unique
(``_bounded_qp._unique_rows``): every weight off the tight set ``T`` at its bound and ``G_TT``
nonsingular. A skipped row must be the only optimal ``v``: checked here independently by the
singular values of the rows ``J_T`` of the Jacobian (numpy), on a tight set read with a looser
threshold than the polish's (so nearly tight indices count too), and by the linear-programming
certificate of least energy (:func:`~tests.linalg.test_xs3_give_up.least_energy_gap`)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_xs3_give_up import least_energy_gap
from tests.linalg.test_xs5_least_energy import JACOBIANS, singular_jacobian
from tests.reference.dual_cone import kkt_violation
from torchjd.linalg import _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _exact_unit_route, _unique_rows

TOL = LEAST_NORM_TOL[torch.float64]


def assert_unique(J: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """``v`` is optimal for ``u`` (``G = J Jᵀ``) and no other optimal weights exist: any other
    optimal ``v'`` has the same update and, by complementarity, ``v'_j = u_j`` wherever
    ``(G v)_j > 0``; here every index of ``(G v)_j`` above ``1e-7`` of its scale has ``v_j = u_j``
    and the rows of ``J`` on the others are linearly independent (so ``Jᵀ(v' − v) = 0`` forces
    ``v' = v``)."""
    G = J @ J.T
    assert kkt_violation(G, u, v) <= 1e-8
    norms = np.sqrt(np.diag(G))
    gradient = G @ v
    tight = (gradient <= 1e-7 * norms * norms.max() * np.abs(u).max()) & (norms > 0)
    assert np.all((v == u) | tight)
    if tight.any():
        rows = J[tight] / norms[tight, None]
        singular_values = np.linalg.svd(rows, compute_uv=False)
        assert singular_values.min() >= 1e-4
    if (norms * v != 0).any():
        assert least_energy_gap(J, u, v) <= 1e-6


@settings(max_examples=15, deadline=None)
@given(m=st.integers(6, 24), **JACOBIANS)
def test_skipped_unit_rows_are_unique(
    m: int, columns: float, rank: float, features: list[bool], seed: int
):
    """UPGrad's unit rows on singular Jacobians: every row that the polish skips is the only
    optimal one (and, then, of least energy)."""
    J = singular_jacobian(m, columns, rank, features, seed)
    G = J @ J.T
    V = _exact_unit_route(G, TOL, 10_000)
    U = torch.eye(m, dtype=J.dtype)
    unique = _unique_rows(G, U, V)
    for u, v in zip(U[unique].numpy(), V[unique].numpy(), strict=True):
        assert_unique(J.numpy(), u, v)


def test_tall_full_rank_jacobian_is_skipped_whole():
    """A tall Jacobian of full column rank (singular ``G``), rows of spread norms: each unit row's
    face is a set of independent rows, so the polish certifies every row and returns its input
    itself (no eigendecomposition, no Newton step); the rows are unique."""
    g = torch.Generator().manual_seed(3)
    J = torch.randn(12, 5, generator=g, dtype=torch.float64)
    J[:, 0] += 2.0  # a shared direction: no positive span, a nonzero update
    J = J * 10 ** (2 * torch.rand(12, 1, generator=g, dtype=torch.float64) - 1)
    G = J @ J.T
    U = torch.eye(12, dtype=J.dtype)
    V = _exact_unit_route(G, TOL, 10_000)
    assert bool(_unique_rows(G, U, V).all())
    assert _bounded_qp._least_energy_polish(G, U, V, TOL) is V
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert_unique(J.numpy(), u, v)


def test_duplicate_rows_and_positive_spans_are_not_skipped():
    """Weights that are not unique are never skipped: a free pair of duplicate rows (``G_TT``
    singular), and rows that positively span a subspace (every index tight, zero update)."""
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    u = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)  # optimal: no conflict
    assert bool(_unique_rows(J @ J.T, u, v).all())
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    U = torch.eye(4, dtype=torch.float64)
    V = _exact_unit_route(J @ J.T, TOL, 10_000)
    assert not bool(_unique_rows(J @ J.T, U, V).any())
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.2]], dtype=torch.float64)
    V = _exact_unit_route(J @ J.T, TOL, 10_000)
    unique = _unique_rows(J @ J.T, torch.eye(3, dtype=J.dtype), V)
    # Row 2 frees both duplicates (only their sum is fixed); rows 0 and 1 free row 2 alone.
    assert unique.tolist() == [True, True, False]

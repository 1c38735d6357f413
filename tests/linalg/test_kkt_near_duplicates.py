"""The exact mode's rows meet the KKT conditions within ``LEAST_NORM_TOL`` on singular float64
Gramians whose optimal weights are large: near-duplicate rows (``10⁻⁶`` apart) of a low-rank
Jacobian with row norms over six decades, as in ``benchmarks/non_conflict.py``'s hard Jacobians
(there, #1 of the float64 stream at ``m = 64``: rows left at ``4·10⁻⁴`` by the interior point,
whose Tikhonov term biases such weights, of norm up to ``10⁵``; now the active-set method of
:mod:`torchjd.linalg._lawson_hanson` finishes them)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.dual_cone import kkt_violation
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _exact_unit_route, solve_lower_bounded_qp
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._lawson_hanson import lawson_hanson_rows

TOL = LEAST_NORM_TOL[torch.float64]


def near_duplicate_jacobian(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """A float64 Jacobian of rank ``rank`` (plus a shared direction), ``m // 8`` of whose rows are
    others plus ``10⁻⁶`` noise, row norms then spread over six decades; unit trace of ``J Jᵀ``."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank, generator=g, dtype=torch.float64)
    J = J @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    J = J + 0.1 * torch.randn(1, n, generator=g, dtype=torch.float64)
    rows = torch.randperm(m, generator=g)
    k = m // 8
    noise = 1e-6 * torch.randn(k, n, generator=g, dtype=torch.float64)
    J[rows[:k]] = J[rows[k : 2 * k]] + noise
    norms = 10 ** (6 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 3)
    J = J / J.norm(dim=1, keepdim=True) * norms
    return J / (J * J).sum().sqrt()


def assert_optimal(J: torch.Tensor) -> None:
    """The exact mode's rows for the unit vectors (up to ``m = 64`` by its unit route, beyond by
    the general one) meet ``TOL`` on ``G = J Jᵀ``, also by the independent reference."""
    G = J @ J.T
    m = G.shape[0]
    U = torch.eye(m, dtype=G.dtype)
    if m <= 64:
        V = _exact_unit_route(G, TOL, 10_000)
    else:
        V = solve_lower_bounded_qp(G, U, least_norm=True)
    assert (V >= U).all()
    residual = kkt_residual(G, U, V, V @ G)
    assert float(residual.max()) <= TOL, residual.max()
    G_np = G.numpy()
    for i in range(m):
        assert kkt_violation(G_np, np.eye(m)[i], V[i].numpy()) <= TOL


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_near_duplicate_rows(seed: int):
    """Up to ``m = 64`` (on main, 29 of seeds 0..29 had rows above ``TOL``, up to 2·10⁻³)."""
    assert_optimal(near_duplicate_jacobian(64, 18, 11, seed))


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_near_duplicate_rows_general_route(seed: int):
    """Beyond ``m = 64``, through the fallback of the general route (on main, seeds 0..3 had 3
    to 11 rows above ``TOL``, up to 1.2·10⁻⁴)."""
    assert_optimal(near_duplicate_jacobian(80, 22, 14, seed))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(4, 24))
def test_lawson_hanson_from_no_free_index(seed: int, m: int):
    """The active-set method alone (started from ``V = U``: no free index) solves general rows
    ``u`` (entries of both signs) on Gramians of near-duplicate rows, checked on ``G`` and by
    the independent reference."""
    J = near_duplicate_jacobian(m, max(2, m // 3), max(1, m // 4), seed)
    G = J @ J.T
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(3, m, generator=g, dtype=torch.float64)
    V = lawson_hanson_rows(G, U, U, 3 * m + 10)
    assert (V >= U).all()
    assert float(kkt_residual(G, U, V, V @ G).max()) <= TOL
    for u, v in zip(U.numpy(), V.numpy(), strict=True):
        assert kkt_violation(G.numpy(), u, v) <= TOL

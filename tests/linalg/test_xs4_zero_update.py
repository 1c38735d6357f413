"""The exact mode's zero-update route from ``m = 33`` to ``64``
(``_bounded_qp._small_zero_update_rows``): on a singular float64 Gramian of low rank whose rows
positively span a subspace, every row's least-energy weights come from the Newton method in the
range of ``G``, the problem of ``u = 1`` solved in the same batch as a sentinel. The rows meet the
KKT conditions and the optimality conditions of the least-energy weights (certified by a linear
program, :func:`~tests.linalg.test_xs3_give_up.least_energy_gap`); without a positive span the
sentinel stops the batch and the route leaves the rows as they were."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_xs3_give_up import least_energy_gap
from tests.reference.dual_cone import kkt_violation
from torchjd.aggregation import UPGrad
from torchjd.linalg import TorchProjector, _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, _exact_unit_route
from torchjd.linalg._spanning import _RESIDUAL, null_space_projection, range_factor

TOL = LEAST_NORM_TOL[torch.float64]


def spanning_jacobian(m: int, n: int, seed: int, family: str) -> torch.Tensor:
    """``m`` rows in ``n ≤ m / 4`` dimensions pointing every way (they positively span ``ℝⁿ``
    with high probability, which the tests check through the route), normalised as the exact
    mode's Gramian is (unit trace); ``family`` adds the hard features of
    ``benchmarks/non_conflict.py``."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    if family == "mixed_row_norms":
        J = J * 10 ** (4 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 2)
    elif family == "low_rank":  # rank n in 3n columns
        J = J @ torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    elif family == "opposite_rows":
        J[: m // 8] = -torch.rand(m // 8, 1, generator=g, dtype=torch.float64) * J[m // 8 : m // 4]
    elif family == "zero_rows":
        J[: m // 8] = 0.0
    return J / (J * J).sum().sqrt()


def pointed_jacobian(m: int, n: int, seed: int) -> torch.Tensor:
    """Rows of a low rank in an open half-space (``J c > 0``; each reflected into it): no positive
    span, but conflicting rows."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    c = c / c.norm()
    side = J @ c
    J = J - 2 * torch.where(side < 0, side, 0.0).unsqueeze(1) * c + 0.05 * c
    return J / (J * J).sum().sqrt()


def route_rows(monkeypatch: pytest.MonkeyPatch, G: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The exact mode's unit rows of ``G``, and what the zero-update route returned (None: no
    positive span found, or not tried), one entry per call."""
    results = []
    route = _bounded_qp._small_zero_update_rows

    def spied(G: torch.Tensor, U: torch.Tensor, tol: float, factor: tuple):
        result = route(G, U, tol, factor)
        results.append(result)
        return result

    monkeypatch.setattr(_bounded_qp, "_small_zero_update_rows", spied)
    return _exact_unit_route(G, LEAST_NORM_TOL[G.dtype], 10_000), results


def assert_least_energy_optima(J: torch.Tensor, V: torch.Tensor, rows: range) -> None:
    """The rows ``rows`` of ``V`` (those of the unit vectors) are optimal with the least-energy
    weights (a zero row of ``J``, whose unit row has no conflict, only optimal)."""
    G_np, J_np = (J @ J.T).numpy(), J.numpy()
    for i in rows:
        u = np.eye(J.shape[0])[i]
        v = V[i].numpy()
        assert kkt_violation(G_np, u, v) <= 1e-8
        if bool(J[i].any()):
            assert least_energy_gap(J_np, u, v) <= 1e-6


SPANNING_CASES = {  # family: (m, n); the seed is the case's position
    "normal": (64, 8),
    "mixed_row_norms": (64, 12),
    "low_rank": (48, 6),
    "opposite_rows": (64, 16),
    "zero_rows": (40, 5),
}


@pytest.mark.parametrize("family", SPANNING_CASES)
def test_spanning_rows_have_least_energy(family: str, monkeypatch: pytest.MonkeyPatch):
    """The route takes every conflicted row, each optimal with the least-energy weights."""
    m, n = SPANNING_CASES[family]
    J = spanning_jacobian(m, n, list(SPANNING_CASES).index(family), family)
    V, results = route_rows(monkeypatch, J @ J.T)
    assert len(results) == 1
    assert results[0] is not None
    assert bool(results[0][1].all())
    assert_least_energy_optima(J, V, range(m))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_positive_span_the_rows_are_unchanged(seed: int, monkeypatch: pytest.MonkeyPatch):
    """Rows in a half-space: the sentinel stops the batch (every row unconverged), the route
    returns None (where a row without conflict does not rule it out before), and the rows are bit
    for bit those of the route without it."""
    J = pointed_jacobian(64, 10, seed)
    G = J @ J.T
    ell, sqrt_weights = range_factor(G, torch.float64)
    U = torch.cat([torch.ones(1, 64, dtype=G.dtype), torch.eye(64, dtype=G.dtype)])
    _, converged = null_space_projection(
        ell, sqrt_weights, U, TOL, _RESIDUAL[torch.float64], feasibility=True, sentinel=True
    )
    assert not bool(converged.any())
    V, results = route_rows(monkeypatch, G)
    assert all(result is None for result in results)
    monkeypatch.setattr(_bounded_qp, "_small_zero_update_rows", lambda G, U, tol, factor: None)
    assert torch.equal(V, _exact_unit_route(G, TOL, 10_000))


def test_sentinel_does_not_change_the_rows():
    """On a positive span, the sentinel's batch gives the rows of the batch without it (the rows
    are solved independently)."""
    J = spanning_jacobian(64, 8, 5, "normal")
    G = J @ J.T
    ell, sqrt_weights = range_factor(G, torch.float64)
    eye = torch.eye(64, dtype=G.dtype)
    args = (TOL, _RESIDUAL[torch.float64])
    with_sentinel = torch.cat([torch.ones(1, 64, dtype=G.dtype), eye])
    V, converged = null_space_projection(
        ell, sqrt_weights, with_sentinel, *args, feasibility=True, sentinel=True
    )
    V_alone, converged_alone = null_space_projection(
        ell, sqrt_weights, eye, *args, feasibility=True
    )
    assert bool(converged[0])
    assert torch.equal(converged[1:], converged_alone)
    torch.testing.assert_close(V[1:], V_alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("m", "dtype"), [(8, torch.float64), (64, torch.float32)])
def test_not_tried_below_9_or_in_float32(
    m: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
):
    """Below ``m = 9`` and for a float32 Gramian the route declines at once: the rows are those
    of the route without it."""
    J = spanning_jacobian(m, 4, 6, "normal").to(dtype)
    G = J @ J.T
    V, results = route_rows(monkeypatch, G)
    assert all(result is None for result in results)
    monkeypatch.setattr(_bounded_qp, "_small_zero_update_rows", lambda G, U, tol, factor: None)
    assert torch.equal(V, _exact_unit_route(G, LEAST_NORM_TOL[dtype], 10_000))


SPANS = {
    "m": st.integers(33, 64),
    "n_fraction": st.floats(0.05, 0.25),
    "seed": st.integers(0, 2**16),
    "scale": st.floats(-6.0, 4.0),
    "family": st.sampled_from(["normal", "mixed_row_norms", "opposite_rows", "zero_rows"]),
}


@settings(max_examples=6, deadline=None)
@given(**SPANS)
def test_upgrad_exact_mode_on_positive_spans(
    m: int, n_fraction: float, seed: int, scale: float, family: str
):
    """UPGrad's exact mode on positive spans of any scale: no conflict, and (on a few rows of the
    unit problems) the least-energy optima, the route taken or not."""
    n = max(2, int(n_fraction * m))
    J = spanning_jacobian(m, n, seed, family) * 10**scale
    d = UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))(J)
    norms = J.norm(dim=1)
    assert bool((J @ d >= -1e-8 * norms * norms.max()).all())
    J_unit = J / (J * J).sum().sqrt()
    V = _exact_unit_route(J_unit @ J_unit.T, TOL, 10_000)
    assert_least_energy_optima(J_unit, V, range(0, m, 8))

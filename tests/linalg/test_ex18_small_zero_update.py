"""The exact mode's zero-update route from ``m = 9`` to ``32``
(``_range_projection.zero_update_rows``, through ``_bounded_qp._small_zero_update_rows``): on a
singular float64 Gramian of low rank whose rows positively span a subspace, the rows it accepts
are optimal with the least-energy weights (certified by a linear program,
:func:`~tests.linalg.test_xs3_give_up.least_energy_gap`) and are final (not polished again); on
rows without a positive span it accepts only rows whose optimal update is zero (quadprog)."""

import numpy as np
import pytest
import quadprog
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_xs4_zero_update import (
    assert_least_energy_optima,
    pointed_jacobian,
    route_rows,
    spanning_jacobian,
)
from torchjd.linalg import _bounded_qp
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, TIKHONOV, tikhonov
from torchjd.linalg._range_projection import zero_update_rows
from torchjd.linalg._spanning import range_factor

TOL = LEAST_NORM_TOL[torch.float64]


@pytest.mark.parametrize(
    ("m", "n", "family"),
    [
        (9, 2, "normal"),
        (16, 3, "mixed_row_norms"),
        (16, 4, "opposite_rows"),
        (24, 6, "zero_rows"),
        (32, 8, "normal"),
        (32, 4, "low_rank"),
    ],
)
def test_spanning_rows_have_least_energy(
    m: int, n: int, family: str, monkeypatch: pytest.MonkeyPatch
):
    """The route is taken and accepts most conflicted rows; every row comes out optimal with the
    least-energy weights, and the accepted ones skip the least-energy polish."""
    J = spanning_jacobian(m, n, m + n, family)
    polished = []  # the rows of each polish
    polish = _bounded_qp._least_energy_polish
    monkeypatch.setattr(
        _bounded_qp,
        "_least_energy_polish",
        lambda G, U, *rest: polished.append(U.shape[0]) or polish(G, U, *rest),
    )
    V, results = route_rows(monkeypatch, J @ J.T)
    assert len(results) == 1
    assert results[0] is not None
    accepted = int(results[0][1].sum())
    assert accepted >= m // 2
    assert sum(polished) == results[0][1].numel() - accepted
    assert_least_energy_optima(J, V, range(m))


def projection(J: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The projection of ``Jᵀu`` onto ``{d : J d ≥ 0}``: quadprog on ``min ‖d − Jᵀu‖²``."""
    return quadprog.solve_qp(np.eye(J.shape[1]), J.T @ u, J.T, np.zeros(J.shape[0]), 0)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_without_positive_span_not_accepted_wrongly(seed: int):
    """Rows in a half-space (no positive span): each accepted row has a zero optimal update (an
    independent projection), a zero update of its own and is feasible; the conflicted rows whose
    optimal update is not zero are all left."""
    m = 16
    J = pointed_jacobian(m, 3, seed)
    G = J @ J.T
    U = torch.eye(m, dtype=G.dtype)
    factor = range_factor(G, torch.float64)
    assert factor is not None
    V, accepted, _ = zero_update_rows(G, tikhonov(G), U, TOL, factor, TIKHONOV[torch.float64])
    J_np = J.numpy()
    scale = J.norm(dim=1).max()
    for i in range(m):
        d = projection(J_np, np.eye(m)[i])
        if bool(accepted[i]):
            assert np.abs(d).max() <= 1e-6 * float(scale)
            assert float((V[i] @ J).norm()) <= 1e-6 * float(scale * V[i].abs().max())
            assert bool((V[i] >= U[i]).all())
        elif np.abs(d).max() > 1e-6 * float(scale):
            assert not bool(accepted[i])


@settings(max_examples=8, deadline=None)
@given(
    m=st.sampled_from([9, 16, 24, 32]),  # (opposite_rows: m // 4 = 2 (m // 8))
    n_fraction=st.floats(0.1, 0.33),
    seed=st.integers(0, 2**16),
    family=st.sampled_from(["normal", "mixed_row_norms", "opposite_rows", "zero_rows"]),
)
def test_unit_rows_on_small_spans(m: int, n_fraction: float, seed: int, family: str):
    """The exact mode's unit rows on small positive spans, the route taken or not: optimal, of
    least energy."""
    n = max(2, int(n_fraction * m))
    J = spanning_jacobian(m, n, seed, family)
    V = _bounded_qp._exact_unit_route(J @ J.T, TOL, 10_000)
    assert_least_energy_optima(J, V, range(m))


def half_space_jacobian(m: int, r: int, seed: int) -> torch.Tensor:
    """Rank-``r`` rows reflected into a half-space, then two of them replaced by opposites of two
    others (halved): a positive span through those pairs only."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(m, r, generator=generator, dtype=torch.float64) @ torch.randn(
        r, 3 * r, generator=generator, dtype=torch.float64
    )
    c = torch.randn(3 * r, generator=generator, dtype=torch.float64)
    c = c / c.norm()
    s = J @ c
    J = J - 2 * torch.where(s < 0, s, 0.0).unsqueeze(1) * c
    J[:2] = -J[2:4] * 0.5
    return J


@pytest.mark.parametrize(("seed", "m", "r"), [(2, 32, 6), (2, 20, 4), (17, 32, 6), (31, 32, 6)])
def test_rows_that_need_refining_keep_the_least_energy(seed: int, m: int, r: int):
    """Rows that the route's full Newton steps leave above the tolerance are left to the pivoting
    route and its least-energy polish (refined on their face and accepted, they were optimal but
    up to 27% heavier than the least energy on these Jacobians; review)."""
    J = half_space_jacobian(m, r, seed)
    V = _bounded_qp._exact_unit_route(J @ J.T, TOL, 10_000)
    assert_least_energy_optima(J, V, range(m))

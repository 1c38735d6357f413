"""The interior point's fallback between m = 64 and 512 on a float64 G: the range route first
(``_bounded_qp._range_rows_first``), the interior point for the rows it leaves."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchjd.linalg._bounded_qp as bounded_qp
from tests.linalg.test_least_energy_polish import assert_optimal_of_least_energy
from tests.linalg.test_range_projection import degenerate_jacobian, problem_rows
from torchjd.linalg._bounded_qp import (
    LEAST_NORM_TOL,
    _least_norm_fallback,
    _range_rows_first,
    tikhonov,
)
from torchjd.linalg._spanning import range_factor

TOL = LEAST_NORM_TOL[torch.float64]


@settings(max_examples=4, deadline=None)
@given(rank=st.integers(3, 8), seed=st.integers(0, 2**16))
def test_fallback_rows_optimal_and_of_least_energy(rank: int, seed: int):
    # m = 72: the rows go to the range route first (which accepts some), the others to the
    # interior point; every row is optimal on G and within 10⁻⁶ (relative) of the least energy
    # among the weights of its update, by quadprog where it concludes.
    m = 72
    J = degenerate_jacobian(m, rank, 3 * rank, seed)
    G = J @ J.T
    U = problem_rows(m, seed)
    accepted = []
    route = bounded_qp.range_projection_rows

    def spy(*args, **kwargs):
        X, found = route(*args, **kwargs)
        accepted.append(int(found.sum()))
        return X, found

    bounded_qp.range_projection_rows = spy
    try:
        V = _least_norm_fallback(tikhonov(G), G, U, TOL)
    finally:
        bounded_qp.range_projection_rows = route
    assert sum(accepted) > 0
    assert_optimal_of_least_energy(J, U, V)


def test_probe_rejected_leaves_the_other_rows():
    # When the range route accepts fewer than half of the probe rows (spread out), the others
    # are not tried: they come back as u, not accepted (the interior point takes them).
    J = degenerate_jacobian(72, 4, 12, seed=3)
    G = J @ J.T
    U = torch.eye(72, dtype=torch.float64)
    calls = []
    route = bounded_qp.range_projection_rows

    def rejecting(
        G: torch.Tensor, U: torch.Tensor, *args, warm: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((U.shape[0], warm))
        X, found = route(G, U, *args, warm=warm)
        return X, found & (torch.arange(U.shape[0]) < 7)  # 7 of 16 probe rows

    bounded_qp.range_projection_rows = rejecting
    try:
        X, found = _range_rows_first(G, U, TOL, range_factor(G, torch.float64), torch.float64)
    finally:
        bounded_qp.range_projection_rows = route
    assert calls == [(bounded_qp._RANGE_PROBE_ROWS, False)]  # the probe, cold, only
    assert int(found.sum()) <= 7
    others = torch.ones(72, dtype=torch.bool)
    others[torch.linspace(0, 71, bounded_qp._RANGE_PROBE_ROWS).long()] = False
    assert not found[others].any()
    assert torch.equal(X[others], U[others])

"""The safeguard of the dense dual steps against cycling, and the rows done leaving their batch
(:func:`~torchjd.linalg._small_pivoting._dense_steps`), on Gramians where full exchanges alone
cycle: checked against quadprog and the KKT conditions."""

import pytest
import torch

import torchjd.linalg._bounded_qp as bounded_qp
import torchjd.linalg._small_pivoting as small_pivoting
from tests.linalg.test_small_pivoting import regularised
from tests.linalg.test_unit_rows import assert_unit_rows_optimal
from torchjd.linalg._bounded_qp import _small_unit_route
from torchjd.linalg._small_pivoting import (
    _COMPACT_MIN_M,
    _DENSE_MAX_STEPS,
    UnitRows,
    _dense_steps,
    unit_dense_pivoting,
)


def decaying_gramian(m: int, seed: int) -> torch.Tensor:
    """``J = A B`` with ``A`` (``[m, 32]``) of columns scaled over four decades: many conflicts
    and a poor first guess, where full exchanges of the dense steps cycle from ``m = 16``."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -4, 32, dtype=torch.float64)
    A = torch.randn(m, 32, generator=g, dtype=torch.float64) * scales
    return regularised(A @ torch.randn(32, 4 * m, generator=g, dtype=torch.float64))


def dense_problem(G: torch.Tensor):
    """``H = Ĝ⁻¹``, ``û``, the bounds of the dense steps and the first guess of
    :func:`unit_dense_pivoting`."""
    problem = UnitRows(G, 1e-7)
    H = torch.linalg.inv(problem.G_hat)
    lower = problem.U_hat - problem.primal_bound
    guess = (problem.G_hat > 0) | (H < 0)
    return problem, H, lower, guess


@pytest.mark.parametrize("m", [16, 20])
def test_ws_full_exchanges_alone_cycle_here(m: int):
    """Sixty full exchanges in a row (one step at a time: no safeguard) leave some row infeasible
    on these Gramians: the safeguard is what ends the steps below."""
    problem, H, lower, face = dense_problem(decaying_gramian(m, 0))
    for _ in range(60):
        _, face, _ = _dense_steps(H, problem.U_hat, face, lower, problem.dual_bound, 1)
        assert face is not None


@pytest.mark.parametrize("m", [16, 20, 24])
@pytest.mark.parametrize("seed", range(3))
def test_ws_dense_route_ends_cycles_with_single_exchanges(m: int, seed: int):
    """The dense route of ``m ≤ 24`` solves every row of these Gramians itself (no single pivots on
    the tableau), and the rows are optimal."""
    G = decaying_gramian(m, seed)
    result = unit_dense_pivoting(UnitRows(G, 1e-7), _DENSE_MAX_STEPS)
    assert result is not None
    X, solved = result
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


def test_ws_unit_route_takes_no_tableau_steps(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def refuse(*args):
        calls.append(1)
        raise AssertionError("the tableau route was taken")

    monkeypatch.setattr(bounded_qp, "scaled_tableau_pivoting", refuse)
    G = decaying_gramian(20, 0)
    X, solved = _small_unit_route(G, 1e-7)
    assert calls == []
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


@pytest.mark.parametrize("max_steps", range(5, 11))
def test_ws_out_of_steps_after_rows_left_gives_every_rows_faces(max_steps: int):
    """Out of steps after the rows done have left the batch (``m = 24`` rows), the solutions and
    next faces of all rows come back in their places: each face holds its row's own index, and
    the steps resumed from them reach the optimum of every row."""
    m = 24
    assert m > _COMPACT_MIN_M
    G = decaying_gramian(m, 0)
    problem, H, lower, guess = dense_problem(G)
    Z, face, steps = _dense_steps(H, problem.U_hat, guess, lower, problem.dual_bound, max_steps)
    if face is None:  # (finished within max_steps: nothing left to check here)
        assert steps is not None
        assert steps <= max_steps
        return
    assert Z.shape == face.shape == (m, m)
    assert face.diagonal().all()
    Z, face, _ = _dense_steps(H, problem.U_hat, face, lower, problem.dual_bound, 40)
    assert face is None
    X, solved = problem.solution(Z)
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)


@pytest.mark.parametrize("m", [48, 64])
@pytest.mark.parametrize("seed", range(2))
def test_ws_rows_leave_the_batch_twice(m: int, seed: int, monkeypatch: pytest.MonkeyPatch):
    """Beyond ``unit_dense_pivoting``'s 24 rows (the dense steps called directly), rows done can
    leave the batch more than once: the solutions and faces come back in their rows' places, the
    same as with the rows kept in the batch throughout."""
    G = decaying_gramian(m, seed)
    problem, H, lower, guess = dense_problem(G)
    args = (H, problem.U_hat, guess, lower, problem.dual_bound, _DENSE_MAX_STEPS)
    Z, face, steps = _dense_steps(*args)
    monkeypatch.setattr(small_pivoting, "_COMPACT_MIN_M", 10 * m)  # no row leaves
    Z_kept, face_kept, steps_kept = _dense_steps(*args)
    assert steps == steps_kept
    assert (face is None) == (face_kept is None)
    if face is not None:
        assert torch.equal(face, face_kept)
    torch.testing.assert_close(Z, Z_kept, rtol=1e-12, atol=1e-12)
    if face is None:
        X, solved = problem.solution(Z)
        assert solved.all()
        assert_unit_rows_optimal(G, X, solved)

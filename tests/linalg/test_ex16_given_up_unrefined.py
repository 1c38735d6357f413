"""``least_norm_pivoting`` with ``give_up``: a batch whose compacted pivoting converges no row is
returned without the refinement (its rows all go to the caller's fallback), and a batch that
converges some rows is refined as before."""

import pytest
import torch

from tests.linalg.test_xs3_give_up import degenerate_jacobian
from tests.reference.matrices import make
from torchjd.linalg import _bounded_qp, _principal_pivoting
from torchjd.linalg._bounded_qp import LEAST_NORM_TOL, tikhonov
from torchjd.linalg._kkt import row_scales
from torchjd.linalg._principal_pivoting import _masked_pivoting, least_norm_pivoting

TOL = LEAST_NORM_TOL[torch.float64]


def unit_problem(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact mode's pivoting inputs for the unit rows of the trace-normalised ``G``: the
    regularised ``G``, the exact one, the rows and the one-step guess."""
    G = G / G.trace()
    G_reg = tikhonov(G)
    return G_reg, G, torch.eye(G.shape[0], dtype=G.dtype), G_reg > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_given_up_batch_is_not_refined(seed: int, monkeypatch: pytest.MonkeyPatch):
    """No row converges: the rows are the loop's own (clamped to ``v ≥ u``), unconverged, with
    residuals ``+inf``, and the refinement never runs."""
    J = degenerate_jacobian(seed)
    G_reg, G, U, active = unit_problem(J @ J.T)
    give_up = _bounded_qp._LEAST_NORM_GIVE_UP
    loop_rows, loop_converged, _, _ = _masked_pivoting(
        G_reg, U, active, row_scales(G_reg), TOL, 15, True, True, give_up
    )
    assert not bool(loop_converged.any())  # (the case under test)

    def refused(*args, **kwargs):
        raise AssertionError("refine called on a batch that gave up")

    monkeypatch.setattr(_principal_pivoting, "refine", refused)
    X, converged, residual, finished = least_norm_pivoting(
        G_reg, U, active, row_scales(G_reg), TOL, 15, G, False, give_up
    )
    assert not bool(converged.any())
    assert finished is None
    assert bool((residual == torch.inf).all())
    assert torch.equal(X, torch.maximum(loop_rows, U))


@pytest.mark.parametrize(("family", "n", "seed"), [("normal", 12, 0), ("rank_deficient", 30, 1)])
def test_batch_with_solved_rows_is_refined(family: str, n: int, seed: int):
    """Some row converges: the refinement runs, and each converged row meets the tolerance on
    ``G`` itself (its residual as :func:`~torchjd.linalg._kkt.kkt_residual` measures it)."""
    J = make(family, 40, n, seed=seed)
    G_reg, G, U, active = unit_problem(J @ J.T)
    X, converged, residual, _ = least_norm_pivoting(
        G_reg, U, active, row_scales(G_reg), TOL, 15, G, False, _bounded_qp._LEAST_NORM_GIVE_UP
    )
    assert bool(converged.any())
    assert bool(residual.isfinite().all())
    measured = _bounded_qp.kkt_residual(G, U, X, X @ G)
    torch.testing.assert_close(residual[converged], measured[converged], rtol=1e-6, atol=1e-15)

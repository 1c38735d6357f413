"""The exact mode's tie-break on the rows of the interior-point fallback: among the optimal weights,
those of least ``Σ_j ‖J_j‖² v_j²`` (``_range_projection.least_energy_rows``), against quadprog."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linalg.test_range_projection import degenerate_jacobian, problem_rows
from tests.reference.dual_cone import least_energy_optimum
from torchjd.linalg import _range_projection
from torchjd.linalg._bounded_qp import (
    LEAST_NORM_TOL,
    _interior_point_then_polish,
    _least_norm_fallback,
    tikhonov,
)
from torchjd.linalg._kkt import kkt_residual
from torchjd.linalg._range_projection import least_energy_rows
from torchjd.linalg._spanning import range_factor

TOL = LEAST_NORM_TOL[torch.float64]


def energies(J: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``Σ_j W_j v_j²`` of each row, ``W`` the weights of ``tikhonov``."""
    squared_norms = (J * J).sum(dim=1)
    weights = torch.where(squared_norms > 0, squared_norms, 1e-6 * squared_norms.max())
    return (weights * V * V).sum(dim=1)


@settings(max_examples=8, deadline=None)
@given(m=st.integers(14, 40), rank=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_fallback_weights_of_least_energy(m: int, rank: int, seed: int):
    # Zero, duplicate and opposite rows, every row through the fallback: optimal on G, and within
    # 10⁻⁶ (relative) of the least energy among the weights of the same update, by quadprog where
    # it concludes (its own degeneracy can stop it). The interior point's weights alone, those of
    # its Tikhonov term, are up to 5·10⁻⁵ heavier on these.
    U = problem_rows(m, seed)
    J = degenerate_jacobian(m, rank, 3 * rank, seed)
    G = J @ J.T
    V = _least_norm_fallback(tikhonov(G), G, U, TOL)
    assert_optimal_of_least_energy(J, U, V)


def assert_optimal_of_least_energy(J: torch.Tensor, U: torch.Tensor, V: torch.Tensor):
    """Every row optimal on ``G = J Jᵀ`` (``v ≥ u``, KKT residual at most ``TOL``), and within
    10⁻⁶ (relative) of the least energy among the weights of its update, by quadprog where it
    concludes (its own degeneracy can stop it), on at least half of the rows."""
    G = J @ J.T
    assert ((V >= U).all(dim=1) & (kkt_residual(G, U, V, V @ G) <= TOL)).all()
    J_np = J.numpy()
    checked = 0
    for u, v, energy in zip(U.numpy(), V, energies(J, V), strict=True):
        try:
            expected = least_energy_optimum(J_np, u, v.numpy())
        except ValueError:
            continue
        least = energies(J, torch.from_numpy(expected).unsqueeze(0))[0]
        assert energy <= least * (1 + 1e-6)
        checked += 1
    assert checked >= U.shape[0] // 2


def test_rows_that_miss_the_tolerance_are_kept():
    # v = u on conflicted rows (not optimal): returned as they are.
    J = degenerate_jacobian(24, 4, 12, seed=1)
    G = J @ J.T
    U = problem_rows(24, seed=1)
    conflicted = (U @ G).amin(dim=1) < 0
    assert conflicted.any()
    V = least_energy_rows(G, U, U, TOL, range_factor(G, torch.float64))
    assert torch.equal(V[conflicted], U[conflicted])


def test_never_heavier_than_the_interior_point():
    # On the rows of a degenerate G, the polish lowers or keeps each row's energy and keeps it
    # optimal, starting from the interior point's weights.
    J = degenerate_jacobian(36, 5, 15, seed=4)
    G = J @ J.T
    U = problem_rows(36, seed=4)
    V = _interior_point_then_polish(tikhonov(G), U, TOL, G)
    polished = least_energy_rows(G, U, V, TOL, range_factor(G, torch.float64))
    assert (energies(J, polished) <= energies(J, V)).all()
    assert (energies(J, polished) < energies(J, V)).any()
    assert (kkt_residual(G, U, polished, polished @ G) <= TOL).all()
    # The same update up to the tolerance (relative to max_j ‖J_j‖ max|u|, as the KKT residual):
    scale = J.norm(dim=1).max() * U.abs().amax(dim=1, keepdim=True)
    change = (polished - V) @ J / scale
    assert (change.abs() <= TOL).all()


def test_float32_free_sets_short_of_the_rank_take_fewer_steps(monkeypatch):
    # A float32 Gramian of rank 30 (m = 64): Newton's free sets fall short of the rank, where its
    # unridged steps meet a breakpoint at once and gain one index each; ridged, the rows stop in
    # fewer steps (35 against 60 row-steps here), optimal on G and as light as before, within
    # 10⁻³ of the least energy by quadprog where it concludes.
    J = degenerate_jacobian(64, 30, 60, seed=4).float()
    G = J @ J.T
    U = torch.eye(64)[::2]
    tol = LEAST_NORM_TOL[torch.float32]
    steps = [0]
    line_search = _range_projection._line_search

    def counted(*args):
        steps[0] += args[1].shape[0]  # the rows of B
        return line_search(*args)

    monkeypatch.setattr(_range_projection, "_line_search", counted)
    V = _least_norm_fallback(tikhonov(G), G, U, tol)
    ridged_steps, steps[0] = steps[0], 0
    monkeypatch.setattr(_range_projection, "_DEFICIENT_RIDGE", 0.0)
    V_unridged = _least_norm_fallback(tikhonov(G), G, U, tol)
    assert ridged_steps <= 0.75 * steps[0]
    J64, U64, V64 = J.double(), U.double(), V.double()
    G64 = J64 @ J64.T
    assert ((V64 >= U64).all(dim=1) & (kkt_residual(G64, U64, V64, V64 @ G64) <= tol)).all()
    assert (energies(J64, V64) <= energies(J64, V_unridged.double()) * (1 + 1e-3)).all()
    checked = 0
    for u, v, energy in zip(U64.numpy(), V64, energies(J64, V64), strict=True):
        try:
            expected = least_energy_optimum(J64.numpy(), u, v.numpy())
        except ValueError:
            continue
        assert energy <= energies(J64, torch.from_numpy(expected).unsqueeze(0))[0] * (1 + 1e-3)
        checked += 1
    assert checked >= U.shape[0] // 2

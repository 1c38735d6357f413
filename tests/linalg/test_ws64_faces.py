"""The face solves of :mod:`torchjd.linalg._small_pivoting` by Cholesky and triangular solves
(``H = L⁻ᵀ L⁻¹``, the blocks of every width, the dense steps), against independent references:
the float64 inverse, each row's face system solved on its own by ``torch.linalg.solve``, and
quadprog with the KKT conditions for the unit vectors' problems at ``m = 33`` to ``64``; and
no number read on the host inside a face solve."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from tests.linalg.test_principal_pivoting import low_rank_gramian
from tests.linalg.test_small_pivoting import random_problem
from tests.linalg.test_unit_dense import classifier_gramian
from tests.linalg.test_unit_rows import assert_unit_rows_optimal
from torchjd.linalg._bounded_qp import _small_unit_route
from torchjd.linalg._small_pivoting import UnitRows, _dense_steps, _Faces, _sizes


def unit_faces(G: torch.Tensor) -> tuple[UnitRows, _Faces]:
    problem = UnitRows(G, 1e-7)
    return problem, _Faces(problem.G_hat, torch.linalg.cholesky(problem.G_hat))


def faces_of_sizes(m: int, sizes: list[int], seed: int) -> torch.Tensor:
    """Active sets: row ``i`` holds its own index and ``sizes[i] − 1`` others, at random."""
    g = torch.Generator().manual_seed(seed)
    active = torch.zeros(m, m, dtype=torch.bool)
    for i, size in enumerate(sizes):
        others = torch.randperm(m - 1, generator=g)[: size - 1]
        others = others + (others >= i)
        active[i, i] = True
        active[i, others] = True
    return active


def reference_faces(G_hat: torch.Tensor, U_hat: torch.Tensor, active: torch.Tensor):
    """Each row's face solution on its own: ``z_A = û_A``, ``Ĝ_FF z_F = −Ĝ_FA û_A``."""
    Z = U_hat * active
    for i in range(U_hat.shape[0]):
        free = (~active[i]).nonzero().squeeze(1)
        if free.numel() > 0:
            rhs = -(G_hat[free] @ Z[i])
            Z[i, free] = torch.linalg.solve(G_hat[free][:, free], rhs)
    return Z


@settings(max_examples=12, deadline=None)
@given(m=st.integers(25, 64), seed=st.integers(0, 2**16))
def test_inverse_is_the_float64_inverse(m: int, seed: int):
    G, _ = random_problem(m, 2 * m, seed)
    _, faces = unit_faces(G)
    expected = torch.linalg.inv(faces.G_hat)
    scale = expected.abs().max()
    torch.testing.assert_close(faces.H, expected, rtol=0, atol=1e-10 * scale)


# Sizes of the active sets that take each side: all small (dual, from H), all large (primal,
# from Ĝ), and both (from m = 33, each row on its own smaller side).
SIDES = {
    "dual": lambda m: [1 + i % (m // 4) for i in range(m)],
    "primal": lambda m: [m - i % (m // 4) for i in range(m)],
    "mixed": lambda m: [1 + i % 4 if i % 2 else m - i % 4 for i in range(m)],
}


@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("m", [33, 48, 64])
@pytest.mark.parametrize("seed", range(2))
def test_face_solutions_solve_each_rows_system(side: str, m: int, seed: int):
    """:meth:`_Faces.solve` on every side, against each row's face system solved on its own;
    the gradients are ``Ĝ z`` (the multipliers on the active set, zero on the free set)."""
    G, _ = random_problem(m, 2 * m, seed)
    problem, faces = unit_faces(G)
    active = faces_of_sizes(m, SIDES[side](m), seed)
    widths = faces.widths(_sizes(active).tolist())
    Z, gradient = faces.solve(problem.U_hat, active, widths)
    expected = reference_faces(problem.G_hat, problem.U_hat, active)
    torch.testing.assert_close(Z, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(gradient, expected @ problem.G_hat, rtol=0, atol=1e-9)


def host_reads(function) -> int:
    """How many numbers ``function()`` reads on the host (``.item()``, ``bool(tensor)``, torch's
    own checks of a factorisation all end in ``aten::_local_scalar_dense``)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function()
    return sum(event.name == "aten::_local_scalar_dense" for event in prof.events())


@pytest.mark.parametrize("side", list(SIDES))
def test_face_solves_read_nothing_on_the_host(side: str):
    """A face solve, on any side and for blocks of any width, synchronises nothing (the
    factorisations fail to NaN, which the final check catches), nor does :meth:`_Faces.H`."""
    m = 48
    G, _ = random_problem(m, 2 * m, 0)
    problem, faces = unit_faces(G)
    active = faces_of_sizes(m, SIDES[side](m), 0)
    widths = faces.widths(_sizes(active).tolist())
    assert host_reads(lambda: faces.H) == 0
    assert host_reads(lambda: faces.solve(problem.U_hat, active, widths)) == 0


def test_dense_step_reads_only_its_outcome_on_the_host():
    """One dense step reads one number on the host (whether an index is infeasible), none in its
    solve."""
    m = 48
    G, _ = random_problem(m, 2 * m, 1)
    problem, faces = unit_faces(G)
    active = faces_of_sizes(m, SIDES["dual"](m), 1)[:2]
    lower = problem.U_hat[:2] - problem.primal_bound
    reads = host_reads(
        lambda: _dense_steps(faces.H, problem.U_hat[:2], active, lower, problem.dual_bound, 1)
    )
    assert reads == 1


def test_failed_block_factorisation_leaves_the_rows_unsolved():
    """Without a check read on the host, a block whose factorisation fails (here every one: H
    negated) gives a wrong face solution, which the final check on ``G`` refuses."""
    m = 40
    G, _ = random_problem(m, 2 * m, 2)
    problem, faces = unit_faces(G)
    active = faces_of_sizes(m, SIDES["dual"](m), 2)
    faces.__dict__["H"] = -faces.H  # every block negative definite
    Z, _ = faces.solve(problem.U_hat, active, faces.widths(_sizes(active).tolist()))
    _, solved = problem.solution(Z)
    assert not solved[_sizes(active) > 1].any()  # (a single index is z_i = û_i, with no solve)


FAMILIES = {
    "normal": lambda m, seed: random_problem(m, 2 * m, seed)[0],
    "classifier": classifier_gramian,
    "low_rank": lambda m, seed: low_rank_gramian(m, 4 + seed % 8),
}


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(list(FAMILIES)),
    m=st.integers(33, 64),
    seed=st.integers(0, 2**10),
)
def test_unit_rows_are_optimal(family: str, m: int, seed: int):
    """The default mode's route of the unit vectors at ``m = 33`` to ``64``: every row solved,
    and equal to quadprog's optimum (Goldfarb-Idnani's dual method) with the KKT conditions."""
    G = FAMILIES[family](m, seed)
    X, solved = _small_unit_route(G, 1e-7)
    assert solved.all()
    assert_unit_rows_optimal(G, X, solved)

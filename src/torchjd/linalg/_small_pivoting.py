r"""Block principal pivoting for small problems (``m ≤ 64``), each face solved on its smaller side.

For ``min_{v ≥ u} vᵀ G v`` with ``G`` positive definite, a guess of the active set ``A`` (where
``v = u``; free set ``F``) fixes ``v`` in two equivalent ways. In the Jacobi-scaled variables
``z = S⁻¹ v``, ``Ĝ = S G S``, ``S = diag(G)^{-1/2}`` (unit diagonal), and ``H = Ĝ⁻¹``:

.. math::

    \text{primal: } \hat G_{FF}\, z_F = -\hat G_{FA}\, \hat u_A, \qquad
    \text{dual: } H_{AA}\, \mu_A = \hat u_A,\; z = H_{:A}\, \mu_A \;(\hat G z = \mu),

with :math:`\hat u = S^{-1} u`: the gradient :math:`\hat G z` vanishes on ``F``, so it is a
multiplier :math:`\mu` supported on ``A``. Each step solves every row on the side that makes the
widest system the smaller (``|A| × |A|`` from ``H`` or ``|F| × |F|`` from ``Ĝ``: the free side
when the rows share a strong common direction and few conflict, the active side when each row
agrees with few others, as the per-sample losses of a classifier with those of their class), all
rows at once, as one batched factorisation of blocks indexed from ``diag(H, I)`` or
``diag(Ĝ, I)`` (the identity pads the blocks to a common width), by Cholesky and two triangular
solves: the kernels that also make ``H = L⁻ᵀ L⁻¹`` from the factor ``L`` of ``Ĝ``, and no
check of a factor read on the host (``torch.linalg.solve_ex`` and ``torch.cholesky_solve``
make some). The blocks are principal submatrices of ``H`` or ``Ĝ``, as well conditioned as
these; a failed factorisation would give a wrong face solution, which the final check refuses.
The guess is right when ``z_F ≥ û_F`` and ``(Ĝ z)_A ≥ 0``; otherwise the infeasible indices
change side, all at once while their number falls, else (after three steps without progress)
only the largest: Júdice & Pires (1994), the exchange of
:func:`~torchjd.linalg._principal_pivoting.exchange`.

A step is a fixed two to three dozen operations whatever the rows do, and two host
synchronisations (whether an index is infeasible; each row's count of infeasible indices and size
of its next active set, read together, from which the host takes the widths of the next faces and
the count of rows done): rows whose guess is right keep their face (their solution does not
change), and leave the batch only when they are half of it and the batch is large enough for its
size to matter. The answer of every row is checked once, at the end, on ``G`` itself (its KKT
residual, as :func:`~torchjd.linalg._kkt.kkt_residual` measures it).

UPGrad's problems are those of the unit vectors up to their scale
(:class:`UnitRows`: ``û = diag(√G_jj)``, ``max|u| = 1``, one bound for the
gradients of all rows, and the check done in the scaled variables). Their steps cost a fixed
number of operations, about 3 µs each on one CPU thread at these sizes, which is what a call
costs: :func:`unit_dense_pivoting` (``m ≤ 24``) solves every face at full size from ``H``
(``[m, m, m]``, no gathers, no widths read on the host: about fifteen operations a step), and
:func:`unit_small_pivoting` (``m > 24``) starts from a sharper guess when the faces are small (its
first step solved from one ``m × m`` factorisation when the rows' faces partition the indices, as
the classes of a classifier's per-sample Gramian do) and finishes the few rows left after its
first step the same way.
"""

import math
from bisect import bisect_right
from functools import cached_property

import torch
from torch import Tensor

from torchjd.linalg._low_rank import cholesky_solve
from torchjd.linalg._principal_pivoting import _FULL_EXCHANGES, _PRIMAL_THRESHOLD

# Smallest pivot of the Cholesky factor of Ĝ (its square bounds the smallest eigenvalue) for which
# H = Ĝ⁻¹ is accurate enough in float64.
_MIN_PIVOT = 1e-3
_COMPACT_MIN_M = 16  # beyond, the rows done leave the batch once they are half of it
# From this size on, each row is solved on its own smaller side when that makes the widest system
# narrower than this fraction of the widest on one side (the batched factorisations then cost
# more than the few operations it adds).
_MIXED_MIN_M = 33
_MIXED_GAIN = 0.9
# UPGrad's problems (the unit vectors'): up to _DENSE_MAX_M, dense steps only, at most
# _DENSE_MAX_STEPS of them (unit_dense_pivoting: two on the per-sample Gramians of a small
# classifier at 16 rows, where single pivots take three; within five on 96 of the 100 hard
# Jacobians of 16 rows of benchmarks/non_conflict.py, within nine on all, and at most 27 at 20
# and 24 rows; the low-rank Gramians of benchmarks/upgrad_weighting.py, where full exchanges
# cycle until the safeguard of _dense_steps ends it, 6 to 25 steps on 30 at 16 to 24 rows;
# single pivots on the tableau when out of steps); beyond, the rows left
# after the first step take dense steps when their count times m³ is at most _DENSE_BUDGET (two
# rows at m = 64, where a [k, m, m] factorisation costs about as much as the gathers of a block
# step), at most _DENSE_STEPS of them (unit_small_pivoting).
_DENSE_MAX_M = 24
_DENSE_MAX_STEPS = 30
_DENSE_BUDGET = 2 * 64**3
_DENSE_STEPS = 3
# unit_small_pivoting refines its guess with H when no row's face {j : G_ij > 0} holds more than
# this fraction of the indices (per-sample Gramians: the rows of a class)
_SMALL_FACES = 1 / 3
# When the first step leaves more rows than the dense steps take, those rows start the block steps
# from the faces of ceil(_DESCENT_SCALE / p) steps of accelerated projected gradient, p the
# smallest pivot of the Cholesky factor of Ĝ (p² ≥ its smallest eigenvalue: the steps grow as the
# problem's condition number allows), unless more than _DESCENT_MAX_STEPS would be needed (then the
# steps go on from the first step's faces). On benchmarks/upgrad_weighting.py's families at 64
# rows: six block steps down to three (the third on 11 to 16 rows) on its standard normal
# (wishart) Gramians, four to three (the third on 2 to 5 rows) on its wide ones, three to two on
# its per-sample ones and trained MLP (and one row); its low-rank Gramians (p² about 3e-3) keep
# their steps. A larger scale takes more descent steps than they save there (10: 0.9x to 1.1x the
# time of 6 at 32 to 64 rows).
_DESCENT_SCALE = 6.0
_DESCENT_MAX_STEPS = 96


def small_pivoting(
    G: Tensor, U: Tensor, active: Tensor, tol: float, max_steps: int
) -> tuple[Tensor, Tensor] | None:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` of ``U`` (``[k, m]``) from the guess ``active``, in
    float64 (see the module docstring), and which rows are solved: their KKT residual on ``G``
    (:func:`~torchjd.linalg._kkt.kkt_residual`) is at most ``tol``. Rows come back with
    ``v ≥ u`` exactly, in float64. None when ``G`` has a non-positive diagonal entry or is too
    ill-conditioned for ``H`` to be accurate (a pivot below :data:`_MIN_PIVOT`)."""
    return scaled_small_pivoting(ScaledProblem(G, U, tol), active, max_steps)


def scaled_small_pivoting(
    problem: "ScaledProblem", active: Tensor, max_steps: int
) -> tuple[Tensor, Tensor] | None:
    """:func:`small_pivoting` on a prepared problem. Two host synchronisations per step: whether
    some index is infeasible and, if so, each row's count of infeasible indices and the size of its
    next active set (read together: the host takes the count of rows done and the widths of the
    next faces from them)."""
    L, info = torch.linalg.cholesky_ex(problem.G_hat)
    conditioned = _conditioned(L, info, active)
    if conditioned is None:
        return None
    return _pivoting(problem, _Faces(problem.G_hat, L), active, conditioned[1], max_steps)


def _pivoting(
    problem: "ScaledProblem",
    faces: "_Faces",
    active: Tensor,
    n_active: list[float],
    max_steps: int,
    first: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The steps of :func:`scaled_small_pivoting` from ``active``, whose sizes are ``n_active``
    (``first``: the face solutions of ``active`` and their gradients, when already computed)."""
    G_hat, U_hat = problem.G_hat, problem.U_hat
    m = U_hat.shape[1]
    widths = faces.widths(n_active)
    # z_j below its bound on the free set, (Ĝ z)_j below its bound on the active set: infeasible
    # (a NaN passes, and fails the final check).
    lower, dual_bound = U_hat - problem.primal_bound, problem.dual_bound
    rows = slice(None)  # the rows still in the batch, once some have left
    for step in range(max_steps):
        Z, gradient = faces.solve(U_hat, active, widths) if step or first is None else first
        infeasible = torch.where(active, gradient < dual_bound, torch.lt(Z, lower))
        if step == max_steps - 1 or not bool(infeasible.any()):
            break
        count = infeasible.sum(dim=1)
        # The exchange of :func:`~torchjd.linalg._principal_pivoting.exchange`: all infeasible
        # indices while their count falls below its best, else (after _FULL_EXCHANGES steps
        # without progress) only the largest.
        if step == 0:
            best, stalled = count, None
        else:  # (a bool tensor after the first step, where no row has stalled before)
            stalled = count >= best if stalled is None else (stalled + 1) * (count >= best)
            best = torch.minimum(count, best)
        if step > _FULL_EXCHANGES:  # before, no row can have stalled that long
            positions = torch.arange(1, m + 1, device=G_hat.device)
            largest = (infeasible * positions).amax(dim=1, keepdim=True)
            single = (stalled > _FULL_EXCHANGES).unsqueeze(1)
            infeasible = infeasible & (~single | (positions == largest))
        active = active ^ infeasible
        # (the counts of infeasible indices and the sizes of the active sets, read together)
        counts = torch.cat([count, _sizes(active)]).tolist()
        n_done, widths = counts[: len(count)].count(0), faces.widths(counts[len(count) :])
        # The rows done leave with their last face when they are half the batch (below
        # _COMPACT_MIN_M, a batch costs about the same whatever its size); the widths of the
        # others are at most those computed on all.
        if 2 * n_done >= len(count) and m > _COMPACT_MIN_M:
            keep = count.nonzero().squeeze(1)
            if isinstance(rows, slice):  # (Z is a new tensor at each step)
                rows, Z_all = keep, Z
            else:
                Z_all[rows] = Z
                rows = rows[keep]
            active, U_hat, lower, best = (t[keep] for t in (active, U_hat, lower, best))
            if dual_bound.shape[0] > 1:  # (one bound for all rows: nothing to select)
                dual_bound = dual_bound[keep]
            stalled = None if stalled is None else stalled[keep]
    if isinstance(rows, slice):
        Z_all = Z
    else:
        Z_all[rows] = Z
    return problem.solution(Z_all)


def unit_small_pivoting(problem: "UnitRows", max_steps: int) -> tuple[Tensor, Tensor] | None:
    """:func:`scaled_small_pivoting` on the problems of the unit vectors (``m > 24``), with a
    sharper guess and cheaper later steps when few rows are left.

    The guess of row ``i`` is ``{j : Ĝ_ij > 0}`` (the indices that agree with ``i``: on the face
    of all indices, their multipliers are those of ``v = e_i``, ``μ = Ĝ û ≥ 0``); when no such
    face holds more than :data:`_SMALL_FACES` of the indices, only ``i`` and those of its indices
    that the face ``{i}`` pushes below zero (``z = H_{:i} û_i / H_ii``: ``H_ij < 0``) are kept:
    on the per-sample Gramians of a small transformer at 32 rows, right at once for every row,
    where the plain guess is wrong for 25. When the groups of these faces (:func:`_groups`: the
    rows whose faces share more than half of the larger one, so that a stray index in one face
    does not join two classes) partition the indices, as the rows of a class do in the
    per-sample Gramians of a classifier, they are the guess, and the first step solves all rows
    from one ``m × m`` factorisation (:meth:`_Faces.solve_groups`). On the training steps of
    ``benchmarks/autogram_step.py``'s models, it does so at every step: right at once for every
    row on 40 of 40 steps of its CNN at 64 rows and of its transformer at 32 rows, and on 30 of
    60 steps of its MLP at 64 rows (the sharper guess itself leaves one or two rows at every
    step). Otherwise the first step solves every row on the smaller side of its face
    (:meth:`_Faces.solve`). The rows still infeasible take dense steps (:func:`_dense_steps`)
    when they are few (:data:`_DENSE_BUDGET`), for at most :data:`_DENSE_STEPS` steps;
    otherwise, and after these, every row continues with :func:`scaled_small_pivoting`'s steps
    (with its safeguard against cycling), the rows still infeasible after the first step from
    the faces of a few steps of projected gradient from their first solutions
    (:func:`_descent_guess`, :data:`_DESCENT_SCALE`) when ``Ĝ`` is well enough conditioned for
    these to find most faces. None as :func:`scaled_small_pivoting`."""
    G_hat, U_hat = problem.G_hat, problem.U_hat
    m = G_hat.shape[0]
    L, info = torch.linalg.cholesky_ex(G_hat)
    faces = _Faces(G_hat, L)
    active = G_hat > 0.0  # (a float scalar: no conversion)
    conditioned = _conditioned(L, info, active)
    if conditioned is None:
        return None
    pivot, n_active = conditioned
    first = None
    if max(n_active) <= _SMALL_FACES * m:  # H only then (a large face may never need it)
        active = active & (faces.H < 0.0)
        active.diagonal().fill_(True)
        # (the sizes of the faces and of the groups, and whether these partition the indices,
        # read together)
        groups, *counts = _groups(active)
        *counts, paths = torch.cat(counts).tolist()
        n_active, group_sizes = counts[:m], counts[m:]
        if paths == sum(size * size for size in group_sizes):
            active, n_active = groups, group_sizes
            first = faces.solve_groups(U_hat, groups)
    lower, dual_bound = U_hat - problem.primal_bound, problem.dual_bound
    if first is None:
        first = faces.solve(U_hat, active, faces.widths(n_active))
    Z, gradient = first
    infeasible = torch.where(active, gradient < dual_bound, torch.lt(Z, lower))
    left = infeasible.any(dim=1, keepdim=True)
    rows = left.nonzero()[:, 0]
    if rows.numel() == 0:
        return problem.solution(Z)
    if rows.numel() * m**3 <= _DENSE_BUDGET:
        face = (active ^ infeasible)[rows]
        Z_rows, face, _ = _dense_steps(
            faces.H, U_hat[rows], face, lower[rows], dual_bound, _DENSE_STEPS, None, faces.eye
        )
        if face is None:
            Z[rows] = Z_rows
            return problem.solution(Z)
        active = active.index_put((rows,), face)
        steps_left = max(max_steps - 1 - _DENSE_STEPS, 1)
        return _pivoting(problem, faces, active, _sizes(active).tolist(), steps_left)
    # Many rows left: those start again from the faces of a few descent steps from their first
    # solutions (the rows solved keep their faces), when Ĝ is well enough conditioned for these.
    descent_steps = math.ceil(_DESCENT_SCALE / pivot)
    if descent_steps <= _DESCENT_MAX_STEPS:
        guess = _descent_guess(G_hat, U_hat, Z, descent_steps)
        active = torch.where(left, guess, active)
        return _pivoting(problem, faces, active, _sizes(active).tolist(), max(max_steps - 1, 1))
    return _pivoting(problem, faces, active, n_active, max_steps, (Z, gradient))


def unit_dense_pivoting(problem: "UnitRows", max_steps: int) -> tuple[Tensor, Tensor] | None:
    """The problems of the unit vectors for small ``m`` (up to :data:`_DENSE_MAX_M`), by dense
    steps (:func:`_dense_steps`, about fifteen operations each) from the guess
    ``{j : Ĝ_ij > 0 or H_ij < 0}``: the indices that agree with ``i``, and those that its own
    face ``{i}`` pushes below zero (``z = H_{:i} û_i / H_ii``). None when ``Ĝ`` is too
    ill-conditioned for ``H`` (a pivot of its Cholesky factor below :data:`_MIN_PIVOT`) or some
    row is still infeasible after ``max_steps`` steps (full exchanges can cycle): the caller then
    takes another route. One host synchronisation per step."""
    G_hat, U_hat = problem.G_hat, problem.U_hat
    L, info = torch.linalg.cholesky_ex(G_hat)
    # (read with the first step's outcome: one host synchronisation per step; a NaN pivot fails)
    factored = L.diagonal().amin() * (info == 0) >= _MIN_PIVOT
    H = torch.cholesky_inverse(L)
    lower = U_hat - problem.primal_bound
    Z, face, steps = _dense_steps(
        H, U_hat, (G_hat > 0.0) | (H < 0.0), lower, problem.dual_bound, max_steps, factored
    )
    return None if face is not None or steps is None else problem.solution(Z)


def _dense_steps(
    H: Tensor,
    U_hat: Tensor,
    active: Tensor,
    lower: Tensor,
    dual_bound: Tensor,
    max_steps: int,
    factored: Tensor | None = None,
    eye: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, int | None]:
    """Block principal pivoting of the rows of ``U_hat`` (``[k, m]``, each ``û_i e_i``) from the
    guess ``active`` (which holds each row's own index), every face solved on the dual side at
    full size: the systems
    ``H_AA μ_A = û_A``, padded by the identity to ``m × m`` (``[k, m, m]``: one batched Cholesky
    factorisation, no gathers and no widths read on the host), then ``z = H μ`` with
    ``z_A = û_A``. An index is infeasible as in :func:`scaled_small_pivoting` (``μ_j`` below
    ``dual_bound``, one bound for all rows, on ``A``; ``z_j`` below ``lower`` on ``F``); the
    infeasible indices change side, all at once, for at most ``max_steps`` steps. Full exchanges
    can cycle (as on the low-rank Gramians of ``benchmarks/upgrad_weighting.py`` from
    ``m = 16``): when more than :data:`_DENSE_STEPS` steps are allowed (the rows left by
    :func:`unit_small_pivoting` go on to block pivoting, with its own safeguard), once the total
    count of infeasible indices of a step (from the second on) is not below that of every earlier
    one, each row exchanges only its largest infeasible index from then on (Murty's rule, which
    ends on these positive definite problems), and the rows done leave the batch once, when they
    are half of it (beyond :data:`_COMPACT_MIN_M` rows). Returns the last face solutions, the next
    faces (None when every row was feasible) and the count of steps taken (None when
    ``factored``, a boolean tensor read with the first step's outcome, is False). ``eye``: the
    identity of ``H``'s size, when already made."""
    m = H.shape[0]
    eye = _eye(H) if eye is None else eye
    face = active
    # Each row's count of infeasible indices, read on the host in place of whether some index is
    # infeasible (the same synchronisation), only where the safeguard acts.
    guarded = max_steps > _DENSE_STEPS
    # The rows still in the batch once some have left, and the solutions and faces of all rows.
    rows = Z_all = face_all = None
    best, single = math.inf, False
    for step in range(max_steps):
        blocks = torch.where(face.unsqueeze(2) & face.unsqueeze(1), H, eye)
        # (two triangular solves: as fast as torch.cholesky_solve at these sizes, with no check
        # read on the host; û_A = û: each row's face holds its own index, from the guess on
        # (μ_i = zᵀ Ĝ z / û_i > 0 keeps it there), and û is zero elsewhere)
        L = torch.linalg.cholesky_ex(blocks)[0]
        mu = cholesky_solve(L, U_hat)
        Z = torch.where(face, U_hat, mu @ H)
        infeasible = torch.where(face, mu < dual_bound, torch.lt(Z, lower))
        if step == 0 and factored is not None:
            fit, left = torch.stack((factored, infeasible.any())).tolist()
            if not fit:
                return Z, face, None
        elif step == 0 or not guarded:
            left = bool(infeasible.any())
        else:
            count = infeasible.sum(dim=1)
            counts = count.tolist()
            left = len(counts) - counts.count(0)
        if not left:
            return _merged(Z_all, rows, Z), None, step + 1
        if guarded and step > 0:
            # Once the total count of infeasible indices has not fallen below its best, each row
            # exchanges only its largest infeasible index (from then on: Murty's rule, which
            # ends). In all, fewer steps than after one to three non-improving full exchanges on
            # the low-rank Gramians and the hard Jacobians of 16 to 24 rows (see _DENSE_MAX_STEPS).
            total = sum(counts)
            single = single or total >= best
            best = min(total, best)
            if single:
                positions = torch.arange(1, m + 1, device=H.device)
                largest = (infeasible * positions).amax(dim=1, keepdim=True)
                infeasible = infeasible & (positions == largest)
            if rows is None and 2 * left <= len(counts) and len(counts) > _COMPACT_MIN_M:
                # once (from at most 24 rows, at most 12 stay): Z and face are new tensors at
                # each step, kept whole
                rows = count.nonzero().squeeze(1)
                Z_all, face_all = Z, face
                Z, face, infeasible, U_hat, lower = (
                    t[rows] for t in (Z, face, infeasible, U_hat, lower)
                )
        face = face ^ infeasible
    return _merged(Z_all, rows, Z), _merged(face_all, rows, face), max_steps


def _merged(whole: Tensor | None, rows: Tensor | None, part: Tensor) -> Tensor:
    """``whole`` with ``part`` written in its ``rows`` (``part`` itself before any row left)."""
    if whole is None or rows is None:
        return part
    whole[rows] = part
    return whole


class ScaledProblem:
    """``min_{v ≥ u} vᵀ G v`` in float64 and in the Jacobi-scaled variables ``z = S⁻¹ v``
    (``Ĝ = S G S``, ``û = S⁻¹ u``, ``S = diag(G)^{-1/2}``), with the bounds of the feasibility
    tests of pivoting and the final check of the rows on ``G`` itself."""

    def __init__(self, G: Tensor, U: Tensor, tol: float) -> None:
        self.G, self.U, self.tol = G.double(), U.double(), tol
        diagonal = self.G.diagonal()
        self.s = diagonal.rsqrt()
        self.G_hat = self.s.unsqueeze(1) * self.G * self.s
        # Rows with a non-finite entry are solved as zero rows (for a fixed cost), and fail the
        # final check.
        U_finite = self.U.nan_to_num(0.0, 0.0, 0.0)
        tiny = torch.finfo(torch.float64).tiny
        self.u_scale = U_finite.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
        self.U_hat = U_finite / self.s
        # row_scales(G)_j = √(G_jj max_l G_ll) = c / s_j, with c = √(max_l G_ll).
        self.c = diagonal.amax().sqrt()
        # An index is infeasible when u_j − v_j = s_j (û_j − z_j) exceeds a small fraction of
        # max|u| (z_j below û_j − primal_bound_j), or −(G v)_j = −(Ĝ z)_j / s_j that fraction of
        # row_scale_j · max|u| ((Ĝ z)_j below dual_bound).
        bound = (_PRIMAL_THRESHOLD * tol) * self.u_scale
        self.primal_bound, self.dual_bound = bound / self.s, bound * -self.c

    def solution(self, Z: Tensor) -> tuple[Tensor, Tensor]:
        """The rows ``v = S z`` (clamped to ``v ≥ u``) and which are solved: their KKT residual on
        ``G`` (as :func:`~torchjd.linalg._kkt.kkt_residual` measures it) is at most ``tol``. A
        face solution whose gradient does not vanish on its free set (rounding on an
        ill-conditioned face) fails the complementarity term."""
        X = torch.maximum(self.s * Z, self.U)
        relative_gradient = (X @ self.G) * (self.s / self.c) / self.u_scale
        excess = (X - self.U) / self.u_scale
        residual = torch.maximum(-relative_gradient, relative_gradient.abs() * excess)
        return X, residual.amax(dim=1) <= self.tol


class UnitRows(ScaledProblem):
    """The ``m`` problems ``u = e_i`` on a float64 ``G`` (UPGrad's, up to their scale ``p_i``:
    ``v(p_i e_i) = p_i v(e_i)``), with fewer operations than the general case: ``max|u| = 1``,
    ``û = diag(√G_jj)``, one bound for the gradients of all rows, and the final check in the
    scaled variables."""

    def __init__(self, G: Tensor, tol: float) -> None:
        self.G, self.tol = G, tol
        diagonal = G.diagonal()
        # S⁻¹ = diag(√G_jj): v = z / √G_jj, so that v_i ≥ 1 exactly where z_i ≥ û_i = √G_ii
        # (division is monotonic).
        self.root = root = diagonal.sqrt()
        self.G_hat = G / torch.outer(root, root)
        self.U_hat = torch.diag(root)
        # tol √(max_l G_ll) (the square root is monotonic and correctly rounded): the bound of the
        # final check on the scaled gradients, and a fraction of it that of pivoting (shape [1]).
        self.threshold = tol * root.amax(0, keepdim=True)
        self.primal_bound = (_PRIMAL_THRESHOLD * tol) * root
        self.dual_bound = self.threshold * -_PRIMAL_THRESHOLD

    def solution(self, Z: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`ScaledProblem.solution`, checked in the scaled variables:
        ``(G v)_j / s_j = (Ĝ z)_j``."""
        Z = torch.maximum(Z, self.U_hat)
        gradient = Z @ self.G_hat
        excess = (Z - self.U_hat) / self.root
        residual = torch.maximum(-gradient, gradient.abs() * excess)
        return Z / self.root, residual.amax(dim=1) <= self.threshold


class _Faces:
    """The face solutions ``z`` of all rows (see the module docstring), each step on the side that
    makes the widest system the smaller: the active sets (dual, from ``H``) or the free sets
    (primal, from ``Ĝ``); from :data:`_MIXED_MIN_M` on, each row on its own smaller side when
    that narrows the widest system. The blocks are indexed from ``diag(H, I)``, ``diag(Ĝ, I)``
    or ``diag(H, Ĝ, I)`` (built on first use), whose identity pads them to a common width with no
    masking."""

    def __init__(self, G_hat: Tensor, L: Tensor) -> None:
        self.G_hat, self.L, self.m = G_hat, L, G_hat.shape[0]

    @cached_property
    def eye(self) -> Tensor:
        return _eye(self.G_hat)

    @cached_property
    def H(self) -> Tensor:
        return self._inverse(self.L)

    def _inverse(self, L: Tensor) -> Tensor:
        """``L⁻ᵀ L⁻¹`` for a lower Cholesky factor ``L``, from one triangular solve and a product:
        the kernels of the face solves, and no check of the factor read on the host
        (``torch.cholesky_inverse`` makes one)."""
        inverse = torch.linalg.solve_triangular(L, self.eye, upper=False)
        return inverse.mT @ inverse

    @cached_property
    def dual_blocks(self) -> Tensor:
        return torch.block_diag(self.H, self.eye)

    @cached_property
    def primal_blocks(self) -> Tensor:
        return torch.block_diag(self.G_hat, self.eye)

    @cached_property
    def mixed_blocks(self) -> Tensor:
        return torch.block_diag(self.H, self.G_hat, self.eye)

    def solve_groups(self, U_hat: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`solve` for the rows of ``U_hat = diag(û)`` on faces ``groups`` that partition
        the indices: the dual systems ``H_AA μ_A = û_i e_i`` of all rows are those of one
        block-diagonal (up to a permutation) matrix ``M = H ⊙ groups``, whose inverse holds the
        blocks' inverses: ``μ`` (row ``i``) ``= û_i M⁻¹ e_i``, from one ``m × m``
        factorisation."""
        M = torch.where(groups, self.H, 0.0)
        mu = U_hat.diagonal().unsqueeze(1) * self._inverse(torch.linalg.cholesky_ex(M)[0])
        return torch.where(groups, U_hat, mu @ self.H), mu

    def widths(self, n_active: list[float]) -> list[int]:
        """What :meth:`solve` needs to know of the faces, from the sizes of the rows' active sets
        (read on the host together with other numbers: :func:`_sizes`): the most and the fewest
        active indices of a row and, from :data:`_MIXED_MIN_M` on, the widest of the rows'
        smaller sides."""
        m = self.m
        most, fewest = int(max(n_active)), int(min(n_active))  # the caller's solve takes m − low
        if m < _MIXED_MIN_M:
            return [most, fewest]
        # max_i min(s_i, m − s_i): the largest size at most m / 2, or m minus the smallest at
        # least m / 2 (builtins over the sorted sizes: no Python loop over the rows)
        sizes = sorted(n_active)
        k = bisect_right(sizes, m / 2)
        below = sizes[k - 1] if k > 0 else 0.0
        above = m - sizes[k] if k < len(sizes) else 0.0
        return [most, fewest, int(max(below, above))]

    def solve(self, U_hat: Tensor, active: Tensor, widths: list[int]) -> tuple[Tensor, Tensor]:
        """The face solutions ``z`` of the rows and their gradients ``Ĝ z`` (for the dual side,
        the multipliers ``μ``: ``Ĝ z = μ`` up to rounding, which the caller's final check on
        ``G`` bounds), given :meth:`widths` (or upper bounds on them)."""
        m = self.m
        most_active, fewest_active, *narrowest = widths
        most_free = m - fewest_active
        width = min(most_active, most_free)
        if width == 0:  # no active index in any row (then z = 0), or no free index (z = û)
            U_active = U_hat * active
            return U_active, U_active @ self.G_hat
        if narrowest and narrowest[0] < _MIXED_GAIN * width:
            dual = active.sum(dim=1, keepdim=True) <= m // 2  # (2 |A| ≤ m)
            return self._mixed(U_hat, active, U_hat * active, dual, narrowest[0])
        if most_active <= most_free:  # dual: μ on A, z = H μ, and z_A = û_A exactly
            solution = self._solve_blocks(self.dual_blocks, active, U_hat, width, 0)
            return torch.where(active, U_hat, solution @ self.H), solution
        U_active = U_hat * active
        rhs = (U_active @ self.G_hat).neg_()
        Z = U_active + self._solve_blocks(self.primal_blocks, ~active, rhs, width, 0)
        return Z, Z @ self.G_hat

    def _mixed(
        self, U_hat: Tensor, active: Tensor, U_active: Tensor, dual: Tensor, width: int
    ) -> tuple[Tensor, Tensor]:
        """Each row on its own smaller side (``dual``: ``[k, 1]``)."""
        rhs = torch.where(dual, U_hat, (U_active @ self.G_hat).neg_())
        solution = self._solve_blocks(self.mixed_blocks, active == dual, rhs, width, dual)
        Z = torch.where(active, U_hat, torch.where(dual, solution @ self.H, solution))
        return Z, torch.where(dual, solution, Z @ self.G_hat)

    def _solve_blocks(
        self, blocks: Tensor, side: Tensor, rhs: Tensor, width: int, dual: Tensor | int
    ) -> Tensor:
        """``x`` on each row's ``side`` (zero elsewhere) with ``B_SS x_S = rhs_S``, the blocks
        ``B_SS`` of ``blocks`` padded by its trailing identity; with a ``dual`` mask, the rows
        where it is False take their blocks ``m`` further (``Ĝ`` in ``diag(H, Ĝ, I)``)."""
        m = self.m
        # The side's indices, then padding ones (m and beyond): scores 1 and 1/2.
        scores = torch.constant_pad_nd(side.to(rhs.dtype), (0, m), 0.5)
        index = torch.topk(scores, width, dim=1, sorted=False).indices
        offset = (
            index if isinstance(dual, int) else torch.where(dual & (index < m), index, index + m)
        )
        # One gather from the flattened blocks (one and a half to two times faster than a
        # two-dimensional index, with no larger intermediate).
        flat = torch.add(offset.unsqueeze(1), offset.unsqueeze(2), alpha=blocks.shape[1])
        B = blocks.view(-1).take(flat)
        b = torch.constant_pad_nd(rhs, (0, m)).gather(1, index)
        x = cholesky_solve(torch.linalg.cholesky_ex(B)[0], b)
        return rhs.new_zeros(rhs.shape[0], 2 * m).scatter_(1, index, x)[:, :m]


def _groups(active: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Groups of indices from the faces ``active`` (``[m, m]``, each holding its own index):
    ``i`` and ``j`` are grouped when their faces share more than half of the larger one. Returns
    the groups (symmetric, ``[m, m]``), the sizes of the faces and of the groups (``[m]`` each),
    and ``Σ_ij g_ij |g_i ∩ g_j|`` (``[1]``), which equals ``Σ_i |g_i|²`` exactly when the groups
    partition the indices (each ``|g_i ∩ g_j| ≤ |g_i|``, with equality for every ``j ∈ g_i``
    exactly when ``g_j = g_i``: an equivalence relation). The counts are exact in float32 (below
    ``2²⁴``)."""
    faces = active.to(torch.float32)
    shared = faces @ faces.mT
    sizes = shared.diagonal()
    groups = shared > 0.5 * torch.maximum(sizes.unsqueeze(1), sizes)
    grouped = groups.to(torch.float32)
    overlaps = grouped @ grouped
    paths = torch.dot(grouped.view(-1), overlaps.view(-1)).reshape(1)
    return groups, sizes, overlaps.diagonal(), paths


def _conditioned(L: Tensor, info: Tensor, active: Tensor) -> tuple[float, list[float]] | None:
    """The smallest pivot of ``L`` and the sizes of the rows' active sets, read on the host
    together with the outcome of the factorisation ``L`` of ``Ĝ`` (one synchronisation); None
    when it failed or a pivot is below :data:`_MIN_PIVOT`."""
    # (a zero or negative diagonal entry gives an infinite or NaN s, hence a failed factorisation;
    # the smallest pivot, zero when the factorisation failed, is read as a float together with
    # the sizes of the active sets)
    pivot, *n_active = torch.cat(
        [L.diagonal().amin(0, keepdim=True) * (info == 0), _sizes(active)]
    ).tolist()
    return (pivot, n_active) if pivot >= _MIN_PIVOT else None


def _descent_guess(G_hat: Tensor, U_hat: Tensor, start: Tensor, steps: int) -> Tensor:
    """The active sets ``{j : z_j = û_j}`` of the rows ``z`` of ``U_hat`` after ``steps`` steps of
    accelerated projected gradient (FISTA: Beck & Teboulle, 2009) on ``min_{z ≥ û} ½ zᵀ Ĝ z``
    from ``max(start, û)``, all rows at once (three operations a step), with the step ``1 / b``
    for ``b²`` the largest absolute row sum of ``Ĝ²`` (Gershgorin: at least the square of ``Ĝ``'s
    largest eigenvalue). In float32: the faces are only a guess, solved in float64 by the steps
    that follow (a wrong index costs a step, not accuracy)."""
    G32, U32 = G_hat.to(torch.float32), U_hat.to(torch.float32)
    step = G32 / (G32 @ G32).abs().sum(dim=1).amax().sqrt()
    Z = Y = torch.maximum(start.to(torch.float32), U32)
    t = 1.0
    for _ in range(steps):
        Z_next = torch.maximum(torch.addmm(Y, Y, step, alpha=-1.0), U32)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        Y = torch.lerp(Z, Z_next, 1.0 + (t - 1.0) / t_next)
        Z, t = Z_next, t_next
    return Z <= U32


def _sizes(active: Tensor) -> Tensor:
    """The number of active indices of each row, in floating point (read with other numbers)."""
    return active.sum(dim=1, dtype=torch.float64)


def _eye(like: Tensor) -> Tensor:
    return torch.eye(like.shape[0], dtype=like.dtype, device=like.device)

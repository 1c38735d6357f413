r"""Batched solver of the lower-bounded quadratic programs behind the dual-cone projection.

For each row :math:`u` of ``U`` (shape ``[k, m]``) and one shared positive semi-definite ``G``
(shape ``[m, m]``), the solver returns

.. math::

    v^\star(u) = \operatorname*{argmin}_{v \ge u} \; v^\top G v .

With ``G = J Jᵀ``, :math:`J^\top v^\star` is the projection of :math:`J^\top u` onto the dual cone
``{d : J d ≥ 0}`` of the rows of ``J`` (Quinton & Rey, 2024, Proposition 1). The KKT conditions
are: ``v ≥ u``, ``G v ≥ 0`` and ``(G v) ⊙ (v − u) = 0``.

Method
------
Default mode, ``m ≤ 64`` (UPGrad over a few tasks, or over a batch of per-sample losses): every
row is solved at once, in float64, with a fixed few dozen operations per step
(:func:`_small_default_route`): up to ``m = 8`` rows, by trying every active set at once
(:mod:`torchjd.linalg._enumeration`: one batched LU factorisation of ``2^m`` small systems);
up to ``m = 24``, by single principal pivots on the whole ``[k, m, m]`` tableau, from its
transform on the free set of ``v = u`` (:mod:`torchjd.linalg._tableau_pivoting`: a dozen
operations per pivot); beyond, by block principal pivoting from the active set of ``v = u`` (the
indices where ``G u > 0``), each face solved on its smaller side, through ``G⁻¹``
(``|A| × |A|``) or ``G`` (``|F| × |F|``), all rows in one batched factorisation per step
(:mod:`torchjd.linalg._small_pivoting`). Rows without conflict need no search: their guess is
right at once. Each row is checked on ``G``; the rows left (non-finite entries, a ``G`` too
ill-conditioned for ``G⁻¹``, rounding) take the general route below. The published library's
solver runs one row at a time (``quadprog``, in C); these batched steps cost about as much as a
few dozen small torch operations each, which is what a call costs at these sizes (on one CPU
thread, 3 to 8 µs an operation, plus about 1 µs per small matrix of a batched factorisation).
UPGrad's problems (``U = diag(p)``, ``p ≥ 0``) are solved as those of the unit vectors,
``v(p_i e_i) = p_i v(e_i)``, whose scaled problem needs fewer operations
(:func:`_small_unit_route`, called by ``TorchProjector._summed_projections``): the weights of a
per-sample Gramian of 64 rows at initialisation (one step: the guess is right) take about 80
operations, against about 110 for the general rows. Beyond ``m = 64``, the unit vectors'
problems are solved through ``G⁻¹`` when their initial faces ``{j : G_ij > 0}`` are small (at
most ``m / 4`` active indices) and shared (few distinct ones: per-sample Gramians whose rows share
the face of their class), with one small inverse per distinct face
(:func:`_large_unit_route`, :mod:`torchjd.linalg._unit_schur`, up to ``m = 512``); otherwise, and
for the rows it leaves, by the general route.

General route (larger problems, the exact mode, and the rows left above):

1. ``v = u`` is optimal exactly when ``G u ≥ 0`` (no row of ``J`` conflicts with ``Jᵀ u``): one
   shared matrix product finds these rows, which are returned unchanged.
2. Up to ``m = 8`` rows, the rows that the enumeration above left (their best candidate missed
   the tolerance: rounding on an ill-conditioned ``G``) go to ADMM and its polish. Small
   problems (``m ≤ 64``) are solved exactly by block principal pivoting
   (:mod:`torchjd.linalg._principal_pivoting`), starting from the active set of one primal-dual
   step from ``v = u``. From ``m = 33`` on, when ``G`` is well-conditioned, the faces are solved
   through ``G⁻¹`` (:func:`~torchjd.linalg._schur_pivoting.schur_pivoting`: one ``|A| × |A|``
   system per row, or per distinct face when rows share theirs, and one shared product), in the
   dtype of ``G`` when it is well enough conditioned for it (float32: about ``κ ≤ 100``), and
   the answer is checked on ``G`` itself; the rows it leaves, and all rows below ``m = 33``, by
   pivoting on the faces of ``G`` in float64.
3. Larger problems are solved the same way when the distinct faces of the initial guess are
   cheap (:func:`~torchjd.linalg._schur_pivoting.face_cost`: a few free indices per row, when
   the rows of ``J`` share a strong common direction; or a few distinct faces, as in per-sample
   Gramians at initialisation, where the samples of a class share theirs) and ``G`` is
   well-conditioned. The others, and rows
   where pivoting fails (a singular or too large face, too many steps), are solved by ADMM with one
   factorisation shared by all rows (:mod:`torchjd.linalg._admm`); in float64 from ``m = 256`` on,
   from the state that ADMM reaches in float32 (whose products cost half as much), so that only
   the last iterations run in float64; on the Jacobi-scaled problem, with a larger penalty and
   over-relaxation, when that makes it much better conditioned (:func:`_jacobi_scale`: per-sample
   Gramians once gradient norms spread out during training) or when the initial faces are
   lopsided (per-sample Gramians at initialisation: a tenth of the indices active). The active
   set that ADMM finds is
   then polished by principal pivoting, when its free blocks are small enough to be cheap: the
   answer is then exact, as it is in the common case of few conflicts.

The returned ``v`` is always feasible (``v ≥ u`` exactly) and its KKT residual
(:func:`~torchjd.linalg._kkt.kkt_residual`) is below ``tol``: by default ``1e-7`` in float64 and
``2e-5`` in float32. Half-precision inputs are solved in float32. Non-finite entries in ``G`` or
``U`` give NaN rows; they never make the solver loop.

Singular ``G`` (``least_norm=True``)
------------------------------------
When ``G`` is nonsingular, the optimum of each row is unique and the least-norm requirement is
void: when every squared pivot of the Cholesky factor of the Jacobi-scaled ``S G S``
(``S = diag(G)^{-1/2}``) is at least :data:`_NONSINGULAR_MIN_PIVOT` (``10⁻⁶`` in float64,
``10⁻³`` in float32: far from singular, near-duplicate and zero rows excluded), the default mode's
route above runs on ``G`` itself (neither normalised nor regularised) with this mode's tolerance
(up to ``m = 64``, its batched small routes first; for UPGrad's unit vectors, those of
:func:`_small_unit_route`), and each row is accepted when its KKT residual on ``G`` meets it
(:func:`_nonsingular_route`; in float32, ADMM stops early and the rows it leaves run again in
float64). The rows that fail, and every singular ``G``, take the route below.

When ``G`` is singular, the image ``Jᵀv`` of the solutions is unique but ``v`` is not. Beyond
``m = 64``, when the only singular part of ``G`` is zero rows and pairs of opposite rows
(``J_a = −c J_b``), the rows are first solved on the Schur complement of the pairs' directions,
nonsingular, by the route above, and each pair's weights then split by least norm in closed form
(:func:`_paired_route`, :mod:`torchjd.linalg._opposite_pairs`); each row is accepted when its KKT
residual on ``G`` meets the tolerance (in float32, whose rounding leaves the pairs only nearly
opposite: when it conflicts with no row beyond the tolerance and meets it on the Schur
complement). Beyond
``m = 64`` (:data:`_SPANNING_MIN_M`), the route first tests whether the rows of ``J`` positively
span a subspace (their cone is a subspace: many more rows than the rank, pointing every way), in
which case every optimal update is zero and the least-norm weights of each row,
``argmin {Σ_j G_jj v_j² : v ≥ u, Jᵀv = 0}``, come from a semismooth Newton method in the range of
``G`` (:mod:`torchjd.linalg._spanning`: one eigendecomposition of the Jacobi-scaled ``G``, then
``r × r`` systems per row, ``r = rank(G)``, instead of faces of hundreds of indices); a row is
accepted when its KKT residual on ``G`` meets the tolerance (in float32, on the range of ``G``:
the rounding of a float32 ``G`` times the large weights of small rows can exceed it on ``G``
itself, where the pivoting route does worse still). From ``m = 33`` to ``64``, so does a float64
``G`` of rank at most ``m / 3`` (:func:`_small_zero_update_rows`; the problem of ``u = 1``, which
tells whether they span, is solved in the same batch as the rows and stops it when they do not,
unless a projection certifies it first, :func:`_certainly_pointed`): on such ``G``, the
pivoting route's weights can miss the least-norm ones. When they do not and
``rank(G) ≤ 2m / 3`` (many more rows than columns), each row's optimum is often unique (from
``m = 512`` tried first, below only on the rows that the pivoting route below leaves): ADMM (in
float32, Jacobi-scaled) and a few pivots on the faces of ``G`` itself find it, and a row is
accepted when it meets the tolerance with strict complementarity and a nonsingular ``G_PP`` on
its free indices (:mod:`torchjd.linalg._unique_face`). Otherwise, and for the rows they leave,
every method runs on :func:`tikhonov` ``(G) = G + σ diag(G)`` with a tiny ``σ``, whose optimum
tends, as ``σ → 0``, to the optimal weights of least ``Σ_j G_jj v_j²`` (the least-norm weights of
the unit-norm rows); face solutions are then refined towards the exact ``G`` (iterated Tikhonov
regularisation), until every row meets the tolerance on ``G`` and the refinement's steps fall
below ``10⁻⁷ max|v|`` (most rows need one or two of its six steps); up to ``m = 64``, for a
float32 ``G``, whose rounding is far below its Tikhonov term (the steps along its numerical null
space then neither shrink nor lead anywhere), each row keeps its iterate of least KKT residual on
``G``, until every row meets the tolerance or no row short of it improves. Up to ``m = 64``, in
float64
(also for a float32 ``G``: its values, solved once), pivoting (up to ``m = 32`` with masked
full-size face systems, a few operations per step) first finds the optimal face of
``tikhonov(G)`` from the one-step guess (:func:`_refined_least_norm`); the rows it cannot solve
go to the interior point below at once, and so do those that miss the tolerance on ``G`` after
more pivots than the route that follows allows (it would repeat the same pivots: the others
keep their refined face). These faces are optimal for ``G`` but, where the optimum is
degenerate, not always of least energy: in float64, each row is then replaced by the
least-energy weights of its update where these are lighter and meet the tolerance
(:func:`_least_energy_polish`: a Newton method in the range of ``G``, ``r × r`` systems per
row). UPGrad's problems (``U = diag(p)``) are solved as those of the unit
vectors, whose least-norm weights scale with ``p_i`` (:func:`_exact_unit_route`, called by
``TorchProjector._summed_projections``). The route that follows: up to ``m = 64`` (the rows that the
default mode's machinery leaves on a nonsingular ``G``), pivoting gets a few steps from the one-step
guess; beyond, from the active set of ADMM on a better-conditioned Gramian (``G + 10⁻⁴ diag(G)``,
Jacobi-scaled, in float32, its small weights taken as active; from ``m = 512``,
``G + 10⁻⁶ tr(G) I`` in float32; the rows pivoted in chunks: :mod:`torchjd.linalg._warm_start`);
in float64, a row is accepted only when its KKT residual on ``G`` itself meets the tolerance;
in float32, when it conflicts with no row of ``G`` beyond it. Below ``m = 512``, the rows it
leaves are pivoted again in float64 (:func:`_exact_faces`): in float64, on the faces of ``G``
itself, from their last faces (where ``G`` has eigenvalues far below the Tikhonov term, as
near-duplicate rows give, the refinement stalls short of the tolerance on a nearly right face),
then their least-norm weights; in float32, on the float64 values of the Tikhonov Gramian (whose
float32 face solves are too coarse for the signs that pivoting reads: rows wander).
Rows it has not solved by then (it can wander on degenerate problems) go to a batched
interior-point method (:mod:`torchjd.linalg._interior_point`), in float64, whose Newton systems
are solved by the Woodbury identity when ``rank(G) ≤ 2m / 3`` (:mod:`torchjd.linalg._low_rank`);
pivoting then finishes the rows it leaves short of the tolerance, reading the active set off the
interior solution at several thresholds. Each face costs ``O(|F|³)``
per row: at ``m = 1024``, with faces of a few hundred indices, a call whose rows reach this
route takes minutes on one thread. From ``m = 512``, before the unique-face route, the rows of a
singular ``G`` without positive span are first solved in the range of ``G``
(:mod:`torchjd.linalg._range_projection`: a dual active-set method for the update, then a
Newton method for its least-norm weights), which takes seconds when the optimal active sets are
small; so are, before the interior point, the rows that pivoting leaves after the spanning
route. The default
tolerance is then ``1e-9`` in float64.
"""

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from torchjd.linalg._admm import Warm, warm_admm
from torchjd.linalg._autograd import tracked
from torchjd.linalg._enumeration import enumerate_active_sets
from torchjd.linalg._interior_point import interior_point
from torchjd.linalg._kkt import kkt_residual, row_scales, worst_conflict
from torchjd.linalg._lawson_hanson import kkt_best, lawson_hanson_rows
from torchjd.linalg._low_rank import woodbury_factor
from torchjd.linalg._opposite_pairs import opposite_pairs
from torchjd.linalg._principal_pivoting import (
    _MASKED_MAX_M,
    bordered_scaled,
    compacted_blocks,
    least_norm_pivoting,
    principal_pivoting,
    refine,
    scaled_cholesky,
)
from torchjd.linalg._probe import probe_first
from torchjd.linalg._range_projection import (
    least_energy_rows,
    range_projection_rows,
    zero_update_rows,
)
from torchjd.linalg._schur_pivoting import distinct_face_cost, distinct_faces, schur_pivoting
from torchjd.linalg._small_pivoting import (
    _DENSE_MAX_M,
    _DENSE_MAX_STEPS,
    UnitRows,
    small_pivoting,
    unit_dense_pivoting,
    unit_small_pivoting,
)
from torchjd.linalg._spanning import (
    _RESIDUAL,
    null_space_projection,
    range_factor,
    zero_update_weights,
)
from torchjd.linalg._tableau_pivoting import (
    TABLEAU_MAX_M,
    scaled_tableau_pivoting,
    tableau_pivoting,
)
from torchjd.linalg._unique_face import unique_optimum_rows
from torchjd.linalg._unit_schur import unit_schur_pivoting
from torchjd.linalg._warm_start import (
    exact_face_pivoting,
    float64_pivoting,
    warm_started_pivoting,
)

DEFAULT_TOL = {torch.float64: 1e-7, torch.float32: 2e-5}
LEAST_NORM_TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
# Relative Tikhonov term of the least-norm mode: above the rounding of a Gramian computed in the
# dtype, far below the tolerance on conflicts.
TIKHONOV = {torch.float64: 1e-8, torch.float32: 1e-5}
_DIRECT_MAX_M = 64  # up to this size, pivoting alone is exact and the fastest
_POLISH_BUDGET = 8  # polish when Σ_k |F_k|³ costs at most this many [m, m] × [m, m] products
_POLISH_STEPS = 4
# Beyond _DIRECT_MAX_M, pivoting through G⁻¹ runs when Σ_k min(|A_k|, |F_k|)³ of the initial guess
# is at most this many m³, for at most _SCHUR_PIVOTS steps; a row whose face grows beyond m / 4
# leaves it for ADMM. In float64, ADMM needs many more iterations for its tighter tolerance.
_SCHUR_BUDGET = {torch.float32: 0.05, torch.float64: 1.0}
# Faces are lopsided when min(|A|, |F|) is at most this fraction of m on average (per-sample
# Gramians at initialisation: about a tenth).
_LOPSIDED = 0.2
_SCHUR_PIVOTS = 8
# UPGrad's unit-vector problems beyond _DIRECT_MAX_M go through G⁻¹ when Σ |A|³ over the distinct
# initial faces is at most this many m³ (each distinct face costs a few small batched operations;
# beyond, ADMM in float32, or pivoting on every row's face in float64, costs less).
_UNIT_BUDGET = {torch.float32: 0.25, torch.float64: 0.1}
# Beyond this size, the general route: at 1,024 rows of an MLP's per-sample Gramian, the initial
# faces (about 120 indices) are wrong for every row, and the unit route's G⁻¹ and first step are
# spent for nothing.
_UNIT_MAX_M = 512
# In float64 from this size on, ADMM starts from a float32 ADMM solution to _WARM_START_TOL (at
# most _WARM_START_ITERS iterations): its products cost half as much.
_WARM_START_MIN_M = 256
_WARM_START_TOL = 3e-6
_WARM_START_ITERS = 200
_JACOBI_MIN_GAIN = 4.0  # ADMM runs on the Jacobi-scaled problem beyond this estimated gain in κ
_SCHUR_MIN_M = 33  # below, the masked full-size face systems are cheaper
_ENUMERATION_MAX_M = 8  # up to this size, every active set is tried at once (2^m of them)
_LEAST_NORM_ADMM_ITERS = 2_000  # then pivoting takes over the rows left
_LEAST_NORM_PIVOTS = 15  # degenerate rows that pivoting has not solved by then go to interior point
# From m = 33 to 64 (compacted faces), when pivoting solves no row of the batch by this step (from
# 0), the whole batch goes to the interior point at once: in benchmarks/non_conflict.py at m = 64,
# such batches leave most of their rows to it after all _LEAST_NORM_PIVOTS steps (64 of 64, 60 of
# 64), and its batches that solve rows start by step 4 (one run: exact mode 7.35 -> 6.61 ms a call
# in float64, 7.24 -> 6.77 in float32). (Not told apart sooner by their infeasible indices at step
# 0: 5 to 26 a row on average, against 2 to 23 in the batches that solve rows, a seventh of
# which start at step 3 or 4; seeds 0, 1, 2 and 5000.)
_LEAST_NORM_GIVE_UP = 4
_LOW_RANK_FRACTION = 1.5  # Woodbury solves in the interior point when rank(G) ≤ 2m / 3
_CHUNK_ENTRIES = 2**25  # of the interior point's [k, m, m] or [k, r, m] tensors (256 MiB)
# Of tol: the interior point's own tolerance (10⁻¹³ of each row's scale in float64; at 10⁻¹⁵
# its rounding stalls some rows for all its steps). The faces read off a more accurate interior
# solution are more often right, and its weights closer to the least-norm ones: at 10⁻³ tol, as
# many steps in all and more rows left short of tol.
_INTERIOR_TOL = 1e-4
# _least_norm_fallback: the rows tried first by the range route, and the share of them it must
# accept for the others to follow.
_RANGE_PROBE_ROWS = 16
_RANGE_PROBE_SHARE = 0.5
# Relative to max|u|: weights at their bound, in the order tried. The loosest first: on the rows
# that reach the interior point in benchmarks/non_conflict.py (m = 64, float64), it gives 92% of
# those it leaves short of tol their face, against 82% for 10⁻⁶.
_ACTIVE_THRESHOLDS = (1e-4, 1e-6, 1e-9)
# Exact mode: the least squared pivot of the Jacobi-scaled Cholesky factor of G for which G counts
# as nonsingular (its optimum unique and well determined): far above the rounding of a Gramian
# computed in the dtype and above the least-norm mode's Tikhonov term.
# From this size on, the least-norm route first tests whether the rows of J positively span a
# subspace (one eigendecomposition of G and a Newton solve of one row).
_SPANNING_MIN_M = 64
# From this size on, the exact mode's rows on a singular G are solved in the range of G first, and
# those that warm-started pivoting leaves there before the interior point (whose O(m r²) steps per
# row cost far more; at m = 256, about as much as the range route).
_RANGE_MIN_M = 512
# From this size on, the rows of a singular G without positive span (rank at most 2m / 3) are first
# solved on G itself where their optimum is unique (_unique_face). Below, warm-started pivoting on
# all of them costs less than its float32 ADMM on a singular G, which then gets only the rows that
# pivoting leaves: on the hard Jacobians of benchmarks/non_conflict.py at m = 256 that took it
# first (two per dtype; half the rows certified), the calls took 0.4-0.6 of their time, with the
# same weights (within 3·10⁻¹⁵ in energy).
_UNIQUE_MIN_M = 512
# Exact mode, from this size to m = 64: a singular float64 G of rank at most
# m / _SMALL_SPANNING_RANK is first tested for a positive span (_small_zero_update_rows). (Gramians
# of higher rank seldom have one: none among those of benchmarks/non_conflict.py at m = 64, seed 0.
# Up to m = 32, through zero_update_rows: with the Newton method of _spanning instead, from m = 9,
# its float64 calls at m = 16 took 1.36 times as long as by pivoting. In float32 at m = 64, 0.96
# times, but with rows up to 1.5 times heavier.)
_SMALL_SPANNING_MIN_M = 9
# (By whether m ≤ _MASKED_MAX_M: up to m = 32, at rank m / 3 and m / 2.5, the float64 calls of
# benchmarks/non_conflict.py at m = 16 took 445 and 420 torch operations on average; at m / 2, 430.)
_SMALL_SPANNING_RANK = {False: 3.0, True: 2.5}
# Of max|c|: the least entry of c, on the rows of nonzero norm, that _certainly_pointed takes as
# positive (far above the rounding of its products).
_POINTED_MARGIN = 1e-6
_NONSINGULAR_MIN_PIVOT = {torch.float64: 1e-6, torch.float32: 1e-3}
_FAST_FLOAT32_ITERS = 200  # of ADMM on a nonsingular G in float32, before float64 takes over
_ROUNDED_UNIT_MAX_M = 16  # singular float32 G: faces from the unit route (_rounded_unit_least_norm)
# Exact mode, a singular float64 G up to m = 64 (_least_energy_polish): of s_j max|u|, the (G v)_j
# of the indices whose weights may leave their bound (the tight set; above the rounding of an
# update computed to the tolerance, far below the conflicts it allows), and, of tol, the KKT
# residual at which the Newton method of its least-energy weights stops. Gramians with a row
# whose least-energy certificate (a linear program) misses 1e-6, among the 88, 90, 95 and 87
# singular Gramians of 100 from non_conflict.hard_jacobian at m = 8, 16, 32, 64 (seed m): 1, 2,
# 1, 7 with these; 1, 2, 2, 10 with the tolerance (1e-9) and 0.1 tol (those of the fallback's
# call); 1, 2, 2, 10 with 1e-6 and 1.0.
_POLISH_TIGHT = 1e-8
_POLISH_TARGET = 1.0
# _paired_route: rows of the reduced problem above this fraction of tol are polished by pivoting.
_REDUCED_TOL = 1e-3
_FLOAT32_MAX_SPREAD = 1e4  # of diag(G) (row norms over two decades): beyond, float64 at once


RangeFactor = Callable[[], tuple[Tensor, Tensor] | None]
"""A function returning :func:`~torchjd.linalg._spanning.range_factor` of ``G_exact`` (None when
``G_exact`` has full rank), formed once for the whole route: already formed (:func:`_formed`),
or at its first call (:func:`_lazy_range_factor`)."""


def _formed(factor: tuple[Tensor, Tensor] | None) -> RangeFactor:
    """The range factor already formed, as a :data:`RangeFactor`."""
    return lambda: factor


def solve_lower_bounded_qp(
    G: Tensor,
    U: Tensor,
    *,
    tol: float | None = None,
    max_iters: int = 10_000,
    least_norm: bool = False,
) -> Tensor:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` for each row ``u`` of ``U`` (see the module docstring).

    With ``least_norm``, ``G`` may be singular: each row is then the optimum of
    :func:`tikhonov` (``G``), which tends to the optimal weights of least scaled norm, with a
    tighter default tolerance.
    """
    out_dtype = U.dtype
    work_dtype = G.dtype if G.dtype in DEFAULT_TOL else torch.float32
    G = G.to(work_dtype)
    U = U.to(work_dtype)
    if tol is None:
        tol = (LEAST_NORM_TOL if least_norm else DEFAULT_TOL)[work_dtype]

    if U.shape[0] == 0:  # no problem to solve
        return U.to(out_dtype)
    G = (G + G.T) / 2
    if not least_norm and G.shape[0] <= _DIRECT_MAX_M:
        # Small problems: every row at once (no search for the rows without conflict: their guess
        # is right at the first step); the rows left, by the general route below.
        X, converged = _small_default_route(G, U, tol)
        if bool(converged.all()):
            return X.to(out_dtype)
        rows = (~converged).nonzero().squeeze(1)
        X[rows] = _solve(G, U[rows], tol, max_iters, least_norm).to(X.dtype)
        return X.to(out_dtype)
    return _solve(G, U, tol, max_iters, least_norm).to(out_dtype)


def _solve(G: Tensor, U: Tensor, tol: float, max_iters: int, least_norm: bool) -> Tensor:
    """The general route, on a symmetric ``G`` in the working dtype."""
    G_exact = G if least_norm else None
    if least_norm:
        G = tikhonov(G)
    GU = _times(U, G)
    # Rows with a non-finite entry (in G, u or G u) have a NaN sum once scaled by zero: cheaper
    # than boolean reductions.
    non_finite = ((G * 0).sum() + (U * 0 + GU * 0).sum(dim=1)).isnan()
    conflicted = (GU.amin(dim=1) < 0) & ~non_finite
    rows = conflicted.nonzero().squeeze(1)
    V = U  # the rows without conflict (NaN where not finite); built only when some row is one
    if rows.numel() < U.shape[0]:
        V = torch.where(non_finite.unsqueeze(1), torch.nan, U)
        if rows.numel() == 0:
            return V
        U, GU = U[rows], GU[rows]
    else:
        rows = slice(None)  # type: ignore[assignment]
    if least_norm:
        # A nonsingular G has one optimum per row: the least-norm requirement is void, and the
        # default mode's machinery runs on G itself (see _nonsingular_route).
        if _nonsingular(G_exact):
            X = _nonsingular_route(G_exact, U, GU, tol, max_iters)
        else:
            # (up to m = 64, with the least-energy polish: _small_least_norm_route)
            X = _least_norm_route(G, G_exact, U, GU, tol, max_iters)
    else:
        X = _default_route(G, U, GU > 0, tol, max_iters)
    if isinstance(rows, slice):  # every row conflicted
        return torch.maximum(X, U)
    V[rows] = torch.maximum(X, U)
    return V


def _small_default_route(G: Tensor, U: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Default mode, ``m ≤ 64``, every row, in float64: the enumeration of all active sets up to
    ``m = 8``, single pivots on the tableau up to ``m = 24`` (:func:`tableau_pivoting`), else
    block pivoting with each face solved on its smaller side (:func:`small_pivoting`) from the
    active set of ``v = u``. Returns the rows (``v ≥ u``, in the dtype of ``G``) and
    which of them are solved."""
    m = G.shape[0]
    if m <= _ENUMERATION_MAX_M:
        U64 = U.double()
        X, residual = enumerate_active_sets(G.double(), U64)
        return torch.maximum(X, U64).to(G.dtype), residual <= tol
    if m <= TABLEAU_MAX_M:
        X, converged = tableau_pivoting(G, U, tol, 3 * m + 10)
        return X.to(G.dtype), converged
    result = small_pivoting(G, U, U @ G > 0, tol, 3 * m + 10)
    if result is None:
        return U.clone(), torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    X, converged = result
    return X.to(G.dtype), converged


def _small_unit_route(G: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """:func:`_small_default_route` on the rows of the identity, ``v(e_i)`` for every ``i``
    (UPGrad's problems up to their scale: ``v(p_i e_i) = p_i v(e_i)`` for ``p_i ≥ 0``), in
    float64, with fewer operations: the Jacobi-scaled problem is built from ``û = diag(√G_jj)``
    (:class:`~torchjd.linalg._small_pivoting.UnitRows`), and solved by dense steps up to
    ``m = 24`` (:func:`~torchjd.linalg._small_pivoting.unit_dense_pivoting`; single pivots on
    the tableau when it declines), else by
    :func:`~torchjd.linalg._small_pivoting.unit_small_pivoting` (block pivoting from the initial
    active set ``{j : G_ij > 0}``, sharpened when these faces are small). Returns the rows
    (float64, ``[m, m]``) and which are solved."""
    m = G.shape[0]
    G = G.double()
    if m <= _ENUMERATION_MAX_M:
        return _small_default_route(G, torch.eye(m, dtype=G.dtype, device=G.device), tol)
    problem = UnitRows(G, tol)
    if m <= _DENSE_MAX_M:
        result = unit_dense_pivoting(problem, _DENSE_MAX_STEPS)
        if result is None:  # ill-conditioned, or not converged: single pivots on the tableau
            return scaled_tableau_pivoting(problem, 3 * m + 10)
        return result
    result = unit_small_pivoting(problem, 3 * m + 10)
    if result is None:
        eye = torch.eye(m, dtype=G.dtype, device=G.device)
        return eye, torch.zeros(m, dtype=torch.bool, device=G.device)
    return result


def _exact_unit_route(G: Tensor, tol: float, max_iters: int) -> Tensor:
    """Exact mode (``least_norm``): the rows of :func:`_solve` for the unit vectors, ``v(e_i)``
    for every ``i`` (UPGrad's problems up to their scale: the least-norm weights of ``p_i e_i``
    are ``p_i v(e_i)``, as the constraints, the objective and the least-norm tie-break all scale
    with ``p_i``). ``G``: symmetric, in the working dtype. Returns the rows (``[m, m]``,
    ``v ≥ u``; NaN rows where not finite) in that dtype.

    On a nonsingular ``G``, the default mode's batched route of the unit vectors
    (:func:`_small_unit_route`, fewer operations than the general rows' route) runs on ``G``
    itself with this mode's tolerance; the rows it leaves take :func:`_nonsingular_route`."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    G_exact, G = G, tikhonov(G)
    # The steps of _solve, with fewer operations on the unit vectors: u G = G_i (its row), and
    # a row has a non-finite entry in G, u or u G exactly when G has one (every row NaN).
    if not bool(G.isfinite().all()):
        return torch.full_like(G, torch.nan)
    (rows,) = (G.amin(dim=1) < 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return eye
    every_row = rows.numel() == G.shape[0]
    U, GU = (eye, G) if every_row else (eye[rows], G[rows])

    def unit_route(G_route: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`_small_unit_route` on ``G_route``, for the conflicted rows."""
        X, solved = _small_unit_route(G_route, tol)
        return (X, solved) if every_row else (X[rows], solved[rows])

    if _nonsingular(G_exact):
        # One optimum per row: the default mode's batched route of the unit vectors, on G itself
        # with this mode's tolerance (its rows are checked on G); the rows it leaves, as by
        # _solve.
        X, solved = unit_route(G_exact)
        X = X.to(G.dtype)
        (left,) = (~solved).nonzero(as_tuple=True)
        if left.numel() > 0:
            X[left] = _nonsingular_route(G_exact, U[left], GU[left], tol, max_iters)
    else:
        # (Float64 takes the least-norm route: pivoting on the faces of tikhonov(G), then the
        # polish, twice the operations of the float32 route below at m = 16. The unit route
        # declines tikhonov(G) there (σ = 10⁻⁸: too ill-conditioned for H), and its tableau steps
        # took 1.95 times as long; the faces of its solve of G + 10⁻⁵ diag(G), refined on
        # tikhonov(G) or as the start of pivoting, 0.99 to 1.04 times (12 of 41 calls had rows on
        # another face). benchmarks/non_conflict.py, float64, m = 16, seed 0.)
        if G.dtype == torch.float32 and G.shape[0] <= _ROUNDED_UNIT_MAX_M:
            X64, solved = unit_route(G)
            X = _rounded_unit_least_norm(G, G_exact, U, GU, X64, solved, tol, max_iters)
        else:  # (with the least-energy polish: _small_least_norm_route)
            X = _least_norm_route(G, G_exact, U, GU, tol, max_iters)
    X = torch.maximum(X, U)
    if every_row:
        return X
    eye[rows] = X
    return eye


def _least_energy_polish(
    G: Tensor, U: Tensor, X: Tensor, tol: float, factor: RangeFactor | None = None
) -> Tensor:
    r"""Exact mode, a singular float64 ``G`` up to ``m = 64``: the optimal rows ``X``
    (``v ≥ u``) of the least-norm route (at the end of :func:`_small_least_norm_route`, which
    also takes the rows that the route of a nonsingular ``G`` leaves), each replaced by the
    optimal weights of least :math:`\sum_j G_{jj} v_j^2` with the same update where these meet
    ``tol`` on ``G`` and are lighter
    (:func:`~torchjd.linalg._range_projection.least_energy_rows`; its tight set and Newton target:
    :data:`_POLISH_TIGHT`, :data:`_POLISH_TARGET`). Unchanged otherwise: a float32 ``G``
    (whose rounding blurs its rank) and, beyond ``m = 64``, rows whose routes were not measured
    against the least-energy conditions.

    The route's faces of the regularised ``G`` are optimal for ``G`` but not always of least
    energy: where the optimum is degenerate (rows that positively span a subspace, duplicate
    rows, indices at their bound with a zero gradient), its face can miss indices whose weights
    the least-energy optimum moves off their bound, and its refinement (iterated Tikhonov) can
    leave weights along the null space of ``G``. Rows whose optimal weights are unique
    (:func:`_unique_rows`: one small Cholesky factorisation a row) are left as they are, and when
    every row is, so is ``X`` (no eigendecomposition, no Newton step: about a third of the
    singular Gramians at 16 rows, a fifth at 64, of ``benchmarks/non_conflict.py``). Each other
    row costs an ``r × r`` system (``r = rank(G)``) and one check when it is already of least
    energy, a few Newton steps when it is not; one eigendecomposition of ``G`` in all. The rows,
    feasible and optimal, are not checked again (``optimal``), and the Newton steps run with
    fewer operations (see :func:`~torchjd.linalg._range_projection._least_norm`): on the
    float64 calls of ``benchmarks/non_conflict.py`` (their inputs captured, old and new run in
    turn), 0.56 of the time of its first version at ``m = 16`` and 0.82 at ``m = 64``, with the
    same least-energy certificates (Gramians with a row above 10⁻⁶, among 100 Jacobians of
    ``hard_jacobian`` at ``m = 8, 16, 32, 64``: 1, 3, 1, 5 from seed ``m``, 0, 2, 1, 2 from seed
    ``m + 1000``, before and after). ``factor``: the route's :data:`RangeFactor` of ``G``, when
    it has one (the range factor is then formed once for both)."""
    if G.dtype != torch.float64 or G.shape[0] > _DIRECT_MAX_M:
        return X
    (rows,) = (~_unique_rows(G, U, X)).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return X
    factor = range_factor(G, G.dtype) if factor is None else factor()
    if factor is None:
        return X
    if rows.numel() == X.shape[0]:
        return least_energy_rows(G, U, X, tol, factor, _POLISH_TIGHT, _POLISH_TARGET, optimal=True)
    X = X.clone()
    X[rows] = least_energy_rows(
        G, U[rows], X[rows], tol, factor, _POLISH_TIGHT, _POLISH_TARGET, optimal=True
    )
    return X


def _unique_rows(G: Tensor, U: Tensor, X: Tensor) -> Tensor:
    r"""Which optimal rows ``X`` of :func:`_least_energy_polish` are its problem's only feasible
    point, hence of least energy already: with ``T`` a row's tight set (``(G v)_j`` at most
    :data:`_POLISH_TIGHT` times ``√(G_jj G_max) max|u|``, as the polish reads it) and every
    weight off ``T`` at its bound, any other optimal ``v'`` (same update, so ``G v' = G v``, and,
    by complementarity, ``v'_j = u_j`` where ``(G v)_j > 0``) differs from ``v`` on ``T`` only,
    by a vector ``δ`` with ``G_TT δ = 0``: none but zero when ``G_TT`` is nonsingular. Checked by
    one batched Cholesky factorisation of the rows' Jacobi-scaled blocks
    (:func:`~torchjd.linalg._principal_pivoting.compacted_blocks`, padded with the identity),
    every squared pivot at least :data:`_NONSINGULAR_MIN_PIVOT`. Indices of zero rows of
    ``J`` (``G_jj = 0``), on which ``v`` has no effect, must have their weights at their bounds
    (as the polish sets them) and stay out of ``T``. Rows whose optimal face is a set of linearly
    independent rows of ``J``, with ``(G v)_j`` clearly positive elsewhere, qualify (tall
    full-rank Jacobians, typically); rows that positively span a subspace, duplicate free rows
    and nearly tight indices do not."""
    diagonal = G.diagonal()
    positive = diagonal > 0
    sqrt_diagonal = torch.where(positive, diagonal, 1.0).sqrt()
    u_scale = U.abs().amax(dim=1, keepdim=True)
    threshold = (_POLISH_TIGHT * sqrt_diagonal.amax()) * (sqrt_diagonal * u_scale)
    gradient = X @ G
    tight = (gradient <= threshold) & positive
    at_bound = (tight | (X == U)).all(dim=1)
    # Each row's block on T, its indices first (padded with the identity to the largest T).
    sizes = tight.sum(dim=1)
    width, count = torch.stack((sizes.amax(), positive.sum())).tolist()  # one host read
    if width == 0:
        return at_bound
    if width == count:
        # A row with every index of positive norm tight (typically a positive span, zero update):
        # G_TT is G without its zero rows, singular unless those were G's only singular part (a
        # row then left to the polish, which keeps it); the polish runs on every row.
        return torch.zeros_like(at_bound)
    order = torch.argsort((~tight).to(torch.uint8), dim=1, stable=True)[:, :width]
    slots = torch.arange(width, device=G.device)
    index = torch.where(slots < sizes.unsqueeze(1), order, G.shape[0] + slots)  # pads: identity
    factor, info = torch.linalg.cholesky_ex(compacted_blocks(bordered_scaled(G)[1], index))
    pivots = factor.diagonal(dim1=1, dim2=2)
    least_pivot = (pivots * pivots).amin(dim=1)
    return at_bound & (info == 0) & (least_pivot >= _NONSINGULAR_MIN_PIVOT[G.dtype])


def _rounded_unit_least_norm(
    G: Tensor,
    G_exact: Tensor,
    U: Tensor,
    GU: Tensor,
    X64: Tensor,
    solved: Tensor,
    tol: float,
    max_iters: int,
) -> Tensor:
    """:func:`_exact_unit_route` on a singular float32 ``G_exact`` up to
    :data:`_ROUNDED_UNIT_MAX_M`
    (``G``: its Tikhonov regularisation; ``U``, ``GU``: the conflicted unit rows): the faces of
    ``G`` come from the default mode's batched route of the unit vectors (``X64``, ``solved``: its
    rows and which it solved, :func:`_small_unit_route` of ``G``, in float64; the float32
    Tikhonov term keeps ``G`` well enough conditioned for it), each row's face solution is then
    refined towards
    ``G_exact`` as by :func:`_refined_least_norm` (which, in float32, also keeps every row whose
    face it found, whatever its residual on ``G_exact``); the rows whose face it did not find
    take :func:`_least_norm_route`. On the float32 Jacobians of
    ``benchmarks/non_conflict.py`` at ``m = 16``, the route's rows take about half the time of
    :func:`_refined_least_norm`, with weights that differ by float32 rounding (on 3 of the 50,
    each row's least-energy sum within 10⁻³ of that route's). (Not beyond: from
    ``m = 24`` on, rows of rank-deficient ``G`` came out up to 0.4% heavier, at ``m = 32`` 1.7%.)"""
    G64, U64 = G.double(), U.double()
    active = X64 <= U64
    X = refine(G_exact.double(), G64, U64, X64, active, tol, True, None, True)[0].to(G.dtype)
    (left,) = (~solved).nonzero(as_tuple=True)
    if left.numel() > 0:
        X[left] = _least_norm_route(G, G_exact, U[left], GU[left], tol, max_iters)
    return X


def _large_unit_route(G: Tensor, tol: float, max_iters: int) -> Tensor | None:
    """The rows ``v(e_i)`` (``[m, m]``) for ``m > 64`` in the default mode (UPGrad's problems up
    to their scale), when the initial faces ``{j : G_ij > 0}`` of the conflicted rows are cheap
    through ``G⁻¹`` (:func:`~torchjd.linalg._unit_schur.unit_schur_pivoting`: per-sample Gramians
    whose rows share the face of their class); the rows it leaves take the general route. None
    when it declines: the caller then takes the general route with every row."""
    m = G.shape[0]
    if m > _UNIT_MAX_M:
        return None
    result = unit_schur_pivoting(G, tol, _SCHUR_PIVOTS, m // 4, _UNIT_BUDGET[G.dtype])
    if result is None:
        return None
    X, solved = result
    if not bool(solved.all()):
        rows = (~solved).nonzero().squeeze(1)
        eye = torch.eye(m, dtype=G.dtype, device=G.device)
        X[rows] = _solve(G, eye[rows], tol, max_iters, False)
    return X


def _nonsingular(G: Tensor) -> bool:
    """Whether ``G`` is far enough from singular for its optimum to be computed without the
    least-norm regularisation: the Cholesky factor of the Jacobi-scaled ``G``
    (:func:`~torchjd.linalg._principal_pivoting.scaled_cholesky`) has every squared pivot at least
    :data:`_NONSINGULAR_MIN_PIVOT` (zero rows and near-duplicate rows fail it)."""
    return scaled_cholesky(G, _NONSINGULAR_MIN_PIVOT[G.dtype]) is not None


def _nonsingular_route(G: Tensor, U: Tensor, GU: Tensor, tol: float, max_iters: int) -> Tensor:
    """Exact mode, nonsingular ``G`` (:func:`_nonsingular`): each row's optimum is unique, so the
    default mode's route (pivoting through ``G⁻¹``, ADMM and its polish) runs on ``G`` itself with
    the exact mode's tolerance, and each row is checked on ``G``. In float32, ADMM on an
    unregularised ``G`` with row norms spread over decades can stall above the tolerance: it
    stops after :data:`_FAST_FLOAT32_ITERS` iterations, and the rows it leaves run again in
    float64; a diagonal spread beyond :data:`_FLOAT32_MAX_SPREAD` runs in float64 from the start.
    The rows left then take the least-norm route (:func:`_least_norm_route`). Up to
    ``m = 64``, the default mode's batched small routes (:func:`_small_default_route`, in float64,
    checked on ``G`` with this mode's tolerance) go first."""
    if G.shape[0] <= _DIRECT_MAX_M:
        X, solved = _small_default_route(G, U, tol)
        left = (~solved).nonzero().squeeze(1)
        if left.numel() == 0:
            return X
        X[left] = _nonsingular_route_rows(G, U[left], GU[left], tol, max_iters)
        return X
    return _nonsingular_route_rows(G, U, GU, tol, max_iters)


def _nonsingular_route_rows(G: Tensor, U: Tensor, GU: Tensor, tol: float, max_iters: int) -> Tensor:
    """The general part of :func:`_nonsingular_route`."""
    X = U.clone()
    left = torch.arange(U.shape[0], device=U.device)
    diagonal = G.diagonal()
    spread = bool(diagonal.amax() > _FLOAT32_MAX_SPREAD * diagonal.amin())
    dtypes = (
        (G.dtype,)
        if G.dtype == torch.float64
        else (torch.float64,)
        if spread
        else (G.dtype, torch.float64)
    )
    for dtype in dtypes:
        G_work, U_left = G.to(dtype), U[left].to(dtype)
        iters = max_iters if dtype == torch.float64 else min(max_iters, _FAST_FLOAT32_ITERS)
        X_left = torch.maximum(_default_route(G_work, U_left, GU[left] > 0, tol, iters), U_left)
        solved = kkt_residual(G_work, U_left, X_left, X_left @ G_work) <= tol
        X[left] = X_left.to(G.dtype)
        left = left[~solved]
        if left.numel() == 0:
            return X
    G_regularised = tikhonov(G)
    U_left = U[left]
    X[left] = _least_norm_route(
        G_regularised, G, U_left, _times(U_left, G_regularised), tol, max_iters
    )
    return X


def _default_route(G: Tensor, U: Tensor, active: Tensor, tol: float, max_iters: int) -> Tensor:
    """The default mode's solve of the conflicted rows. Up to ``m = 64``, the rows come here only
    after :func:`_small_default_route` left them: up to ``m = 8``, rows whose best candidate of
    the enumeration missed the tolerance (rounding on an ill-conditioned ``G``), which ADMM and
    its polish solve."""
    m = G.shape[0]
    if m <= _ENUMERATION_MAX_M:
        return _admm_then_polish(G, U, tol, max_iters, None)
    if _SCHUR_MIN_M <= m <= _DIRECT_MAX_M:
        return _schur_then_principal_pivoting(G, U, active, tol, max_iters)
    if m <= _DIRECT_MAX_M:
        G64 = G.double()
        X, converged = principal_pivoting(G64, U.double(), active, row_scales(G64), tol, 3 * m + 10)
        X = X.to(G.dtype)
        if not converged.all():
            left = (~converged).nonzero().squeeze(1)
            X[left] = _admm_then_polish(G, U[left], tol, max_iters, None)
        return X
    return _schur_pivoting_then_admm(G, U, active, tol, max_iters)


def _least_norm_route(
    G: Tensor, G_exact: Tensor, U: Tensor, GU: Tensor, tol: float, max_iters: int
) -> Tensor:
    """The least-norm mode's solve of the conflicted rows (``G``: the Tikhonov-regularised
    ``G_exact``): beyond ``m = 64``, :func:`_paired_route` first (zero rows and opposite pairs: at
    ``m = 256``, on the hard Jacobians of ``benchmarks/non_conflict.py`` whose rank deficiency
    comes from these alone, 0.1 to 0.3 of the time of the general route), then
    :func:`_general_least_norm_route` for the rows it leaves, or every row when it declines."""
    if G.shape[0] > _SPANNING_MIN_M:
        paired = _paired_route(G_exact, U, tol, max_iters)
        if paired is not None:
            X, solved = paired
            if bool(solved.all()):
                return X
            left = (~solved).nonzero().squeeze(1)
            X[left] = _general_least_norm_route(G, G_exact, U[left], GU[left], tol, max_iters)
            return X
    return _general_least_norm_route(G, G_exact, U, GU, tol, max_iters)


def _general_least_norm_route(
    G: Tensor, G_exact: Tensor, U: Tensor, GU: Tensor, tol: float, max_iters: int
) -> Tensor:
    """The least-norm route without :func:`_paired_route`. When the rows of ``J`` positively span
    a subspace (every update is zero:
    :mod:`torchjd.linalg._spanning`), the least-norm weights come from a Newton method in the
    range of ``G``. When they do not and ``rank(G) ≤ 2m / 3`` (many more rows than columns), the
    optima are often unique and are found on ``G`` itself, each row kept when certified
    (:mod:`torchjd.linalg._unique_face`). The rows left, and every row otherwise, come from
    pivoting and its fallbacks (up to ``m = 64``, :func:`_small_least_norm_route`)."""
    m = G.shape[0]
    known = None  # beyond m = 64, the range factor, also for the interior point's polish
    if m > _SPANNING_MIN_M:
        G64, U64 = G_exact.double(), U.double()
        factor = range_factor(G64, G.dtype)
        known = _formed(factor)
        spanning = None if factor is None else zero_update_weights(G64, U64, tol, G.dtype, factor)
        if spanning is None and factor is not None:
            # No positive span: from m = 512 on, the update in the range of G and its
            # least-norm weights (_range_projection); then, with a large null space, the optima
            # are often unique (see _unique_face), then found on G itself.
            rank = factor[0].shape[1]
            X, solved = U64.clone(), torch.zeros_like(GU[:, 0], dtype=torch.bool)
            if m >= _RANGE_MIN_M:
                X, solved = range_projection_rows(G64, U64, tol, factor, G.dtype)
            left = (~solved).nonzero().squeeze(1)
            if left.numel() > 0 and rank <= m / _LOW_RANK_FRACTION and m >= _UNIQUE_MIN_M:
                X[left], solved[left] = unique_optimum_rows(G64, U64[left], tol, rank)
            X = X.to(G.dtype)
            left = (~solved).nonzero().squeeze(1)
            if left.numel() > 0:
                X[left] = _pivoting_route(G, G_exact, U[left], GU[left], tol, max_iters, known)
            return X
        if spanning is not None:
            V, converged = spanning
            V = V.to(G.dtype)
            # In float32, Newton's own check (on the range of G, in float64) stands: the
            # rounding of a float32 G has no low rank, and its product with the large weights of
            # small rows can exceed tol on G itself, where pivoting (checked in float32 for
            # conflicts only) does worse still.
            if G.dtype == torch.float64:
                converged &= kkt_residual(G_exact, U, V, V @ G_exact) <= tol
            if bool(converged.all()):
                return V
            left = (~converged).nonzero().squeeze(1)
            V[left] = _pivoting_route(
                G, G_exact, U[left], GU[left], tol, max_iters, known, range_retry=True
            )
            return V
    if m <= _DIRECT_MAX_M:
        return _small_least_norm_route(G, G_exact, U, GU, tol, max_iters)
    return _pivoting_route(G, G_exact, U, GU, tol, max_iters, known)


def _paired_route(G: Tensor, U: Tensor, tol: float, max_iters: int) -> tuple[Tensor, Tensor] | None:
    """Exact mode beyond ``m = 64``, a singular ``G`` whose only singular part is zero rows and
    pairs of opposite rows (:mod:`torchjd.linalg._opposite_pairs`): the rows solved on the
    reduced Gramian ``G̃`` (of the other rows) when it is nonsingular (:func:`_nonsingular`),
    by :func:`_solve`, whose rows short of an exact face solution (the default route's ADMM rows,
    within ``tol`` on ``G̃`` but, on its ill-conditioned directions, off its unique optimum by up
    to a thousandth of their energy) are polished by pivoting from their active sets; then each
    pair's weights split by least norm. All in float64 (also for a float32 ``G``: its values).
    Returns the rows (in the dtype of ``G``) and which meet ``tol`` on ``G`` itself (the others:
    the caller's route; in float32, which conflict with no row beyond ``tol`` on ``G`` and meet
    it on ``G̃``: on the float32 hard Jacobians of ``benchmarks/non_conflict.py`` at ``m = 256``
    with opposite pairs, a tenth of the rows exceed it on ``G`` by complementarity alone, by up
    to ``6·10⁻³``, as those of the routes below do, by up to ``5·10⁻³``; their conflicts are
    below ``2·10⁻⁷``, against up to ``7·10⁻⁶`` there; on pairs only nearly opposite or of very
    unequal norms, the excess can reach ``5·10⁻²`` or more, the conflicts still within ``tol``),
    or None when ``G`` has no such structure
    or ``G̃`` is singular
    (its Jacobi-scaled Cholesky factor has a squared pivot below
    :data:`_NONSINGULAR_MIN_PIVOT` of the dtype of ``G``)."""
    G64 = G.double()
    structure = opposite_pairs(G64, G.dtype)
    if structure is None:
        return None
    G_rest = structure.reduced
    U64 = U.double()
    if structure.rest.numel() == 0:
        V = structure.weights(U64, U64[:, structure.rest])
        reduced_residual = torch.zeros_like(U64[:, 0])
    else:
        if scaled_cholesky(G_rest, _NONSINGULAR_MIN_PIVOT[G.dtype]) is None:
            return None
        U_rest = U64[:, structure.rest]
        V_rest = torch.maximum(_solve(G_rest, U_rest, tol, max_iters, True), U_rest)
        # The default route's ADMM rows meet tol on G̃, short of its exact face solution: polished.
        reduced_residual = kkt_residual(G_rest, U_rest, V_rest, V_rest @ G_rest)
        (rows,) = (~(reduced_residual <= _REDUCED_TOL * tol)).nonzero(as_tuple=True)
        if rows.numel() > 0:
            U_rows, V_rows = U_rest[rows], V_rest[rows]
            X, polished = principal_pivoting(
                G_rest, U_rows, V_rows <= U_rows, row_scales(G_rest), tol, _POLISH_STEPS
            )
            V_rest[rows] = torch.where(polished.unsqueeze(1), torch.maximum(X, U_rows), V_rows)
            reduced_residual[rows] = kkt_residual(
                G_rest, U_rows, V_rest[rows], V_rest[rows] @ G_rest
            )
        V = structure.weights(U64, V_rest)
    GV = V @ G64
    if G.dtype == torch.float64:
        solved = kkt_residual(G64, U64, V, GV) <= tol
    else:
        # The pairs of a float32 G are opposite up to its rounding, which, times the large weights
        # of some pairs, exceeds tol in the complementarity of their indices (as it does for the
        # routes below); the rows are checked for conflicts on G and for optimality on G̃.
        solved = (worst_conflict(G64, U64, GV) <= tol) & (reduced_residual <= tol)
    return V.to(G.dtype), solved


def _lazy_range_factor(G_exact: Tensor) -> RangeFactor:
    """The :data:`RangeFactor` of ``G_exact`` (:func:`~torchjd.linalg._spanning.range_factor` of
    its float64 values, its rank read at the rounding of its dtype), formed at its first call and
    kept: the routes of one call up to ``m = 64`` (:func:`_small_spanning_factor`,
    :func:`_least_norm_fallback`, :func:`_least_energy_polish`) share one eigendecomposition."""
    return functools.cache(lambda: range_factor(G_exact.double(), G_exact.dtype))


def _small_least_norm_route(
    G: Tensor, G_exact: Tensor, U: Tensor, GU: Tensor, tol: float, max_iters: int
) -> Tensor:
    """:func:`_general_least_norm_route` up to ``m = 64``: the zero-update route
    (:func:`_small_zero_update_rows`) when the rows of ``J`` may positively span a subspace, else
    :func:`_refined_least_norm`, then the general route (:func:`_pivoting_route`) for the rows it
    leaves, for every row or those that the zero-update route leaves; last, the least-energy
    polish (:func:`_least_energy_polish`; ``v ≥ u``) of every row, or, up to
    :data:`_MASKED_MAX_M`, of the pivoted rows only (the zero-update route's rows are of least
    energy already, see :func:`~torchjd.linalg._range_projection.zero_update_rows`). The routes
    that need the range factor of ``G_exact`` share one (:func:`_lazy_range_factor`): at
    ``m = 64``, on the float64 hard Jacobians of ``benchmarks/non_conflict.py`` (seed 64), 34
    factors instead of 78 for the same rows."""
    factor = _lazy_range_factor(G_exact)

    def pivoted(rows: Tensor | slice) -> Tensor:
        """The rows ``rows`` by pivoting, ``v ≥ u``."""
        U_rows, GU_rows = U[rows], GU[rows]
        X, solved = _refined_least_norm(G, G_exact, U_rows, GU_rows, tol, factor)
        if not bool(solved.all()):
            left = (~solved).nonzero().squeeze(1)
            X[left] = _pivoting_route(
                G, G_exact, U_rows[left], GU_rows[left], tol, max_iters, factor
            )
        return torch.maximum(X, U_rows)

    formed = _small_spanning_factor(G_exact, factor)
    zero_update = None if formed is None else _small_zero_update_rows(G_exact, U, tol, formed)
    if zero_update is None:
        return _least_energy_polish(G_exact, U, pivoted(slice(None)), tol, factor)
    X, solved, optimal = zero_update
    (left,) = (~optimal).nonzero(as_tuple=True)  # (the optimal ones are polished unpivoted)
    if left.numel() > 0:
        X[left] = pivoted(left)
    if G.shape[0] > _MASKED_MAX_M:
        return _least_energy_polish(G_exact, U, X, tol, factor)
    (rows,) = (~solved).nonzero(as_tuple=True)
    if rows.numel() > 0:
        X[rows] = _least_energy_polish(G_exact, U[rows], X[rows], tol, factor)
    return X


def _small_spanning_factor(G: Tensor, factor: RangeFactor) -> tuple[Tensor, Tensor] | None:
    """The range factor (``factor()``: :func:`~torchjd.linalg._spanning.range_factor`) of a
    float64 ``G`` (exact mode, :data:`_SMALL_SPANNING_MIN_M` ``≤ m ≤ 64``) whose rows might
    positively span a subspace, for :func:`_small_zero_update_rows`; None otherwise (another dtype
    or size, ``G`` of full rank, or a nonzero row of ``G`` without a negative entry: ``J d ≥ 0``
    for ``d = J_i``, which they would not have were they to span)."""
    if G.dtype != torch.float64 or G.shape[0] < _SMALL_SPANNING_MIN_M:
        return None
    if bool(((G.diagonal() > 0) & (G.amin(dim=1) >= 0)).any()):
        return None
    return factor()


def _small_zero_update_rows(
    G: Tensor, U: Tensor, tol: float, factor: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Exact mode, :data:`_SMALL_SPANNING_MIN_M` ``≤ m ≤ 64``, a singular float64 ``G`` of rank at
    most ``m /`` :data:`_SMALL_SPANNING_RANK` (``factor``: :func:`_small_spanning_factor`): when
    the rows of ``J`` positively span a subspace (every optimal update zero), the least-norm
    weights of each row, in the range of ``G``, each row accepted when its update is zero and its
    KKT residual on ``G`` meets ``tol``; returns ``(X, accepted, optimal)`` (``X``: the rows,
    ``u`` where not optimal; ``optimal``: the accepted rows and, up to :data:`_MASKED_MAX_M`,
    those refined to ``tol`` on their face, optimal but not always of least energy), or None when
    the rows do not span (or the rank is higher).

    The test: first :func:`_certainly_pointed` (a projection: no solve when it certifies that they
    do not span). Up to :data:`_MASKED_MAX_M`, the rows are then solved by the primal-dual
    active-set method of :func:`~torchjd.linalg._range_projection.zero_update_rows` (a few
    operations a step; on a span, most rows accepted after a few steps, the others refined or left
    to the pivoting route, as are all on a Gramian without span). Beyond, by the Newton method of
    :mod:`torchjd.linalg._spanning`, with the problem of ``u = 1``, feasible exactly when they
    span, as the first row of the same batch, which stops as soon as that row certifies that they
    do not (see :func:`~torchjd.linalg._spanning.null_space_projection`). The weights of the
    pivoting route (:func:`_refined_least_norm`) are not always those of least energy on such
    ``G``: on 18 of the 46 singular float64 Gramians of ``benchmarks/non_conflict.py``'s hard
    Jacobians at ``m = 64`` (seed 0), some rows missed the optimality conditions of the
    least-energy weights by up to 0.9 of their scale (a linear program, HiGHS); this route meets
    them on 16. On those of ``m = 16`` (seed 16), the 17 of 50 whose rows positively span took
    0.79 ms a call against 1.18 by pivoting and the least-energy polish (medians of three runs, one
    thread; 15 of them of rank at most ``m / 3``), with the same weights or lighter (4 rows, by
    more than ``10⁻⁶`` of their energy)."""
    m = G.shape[0]
    ell, sqrt_weights = factor
    small = m <= _MASKED_MAX_M
    rank = _SMALL_SPANNING_RANK[small]
    if not 0 < ell.shape[1] <= m / rank or _certainly_pointed(G, ell, sqrt_weights):
        return None
    if small:
        V, converged, optimal = zero_update_rows(G, tikhonov(G), U, tol, factor, TIKHONOV[G.dtype])
        return torch.where(optimal.unsqueeze(1), V, U), converged, optimal
    rows = torch.cat([torch.ones_like(U[:1]), U])
    V, converged = null_space_projection(
        ell, sqrt_weights, rows, tol, _RESIDUAL[G.dtype], feasibility=True, sentinel=True
    )
    if not bool(converged[0]):
        return None
    V, converged = V[1:], converged[1:]
    converged &= kkt_residual(G, U, V, V @ G) <= tol
    return torch.where(converged.unsqueeze(1), V, U), converged, converged


def _certainly_pointed(G: Tensor, ell: Tensor, sqrt_weights: Tensor) -> bool:
    r"""Whether a vector of the range of ``ℓ`` certifies that the rows of ``J`` (``G = J Jᵀ``) do
    not positively span a subspace (``ℓ ℓᵀ = W^{-1/2} G W^{-1/2}``, ``√W``: ``sqrt_weights``,
    positive; :func:`~torchjd.linalg._spanning.range_factor`): some ``c = ℓ y`` with ``c_j > 0``
    on every index of nonzero norm (``G_jj > 0``; ``ℓ_j = 0`` elsewhere). Then ``J d = √W ⊙ c``
    for ``d = Jᵀ W^{-1/2} ℓ (ℓᵀℓ)⁻¹ y``, positive on every nonzero row of ``J``, which rules out
    any ``w`` positive on those rows with ``Jᵀ w = 0`` (``wᵀ J d > 0``: Gordan's alternative).
    A sufficient condition only: ``c`` is the projection onto the range of ``ℓ`` of the all-ones
    vector and of ``√W`` (the bound of the problem of ``u = 1`` in
    :func:`_small_zero_update_rows`), with every entry above :data:`_POINTED_MARGIN` of its
    largest (far above the rounding of the products). A few small products, where the batch's
    sentinel takes ten float32 steps of every row or more (about 2 ms at ``m = 64``) to certify:
    on the float64 hard Jacobians of ``benchmarks/non_conflict.py`` at ``m = 64`` (seeds 64 to
    71, 400 of them), 146 reach the batch with a rank of at most ``m / 3``, 21 of them without a
    positive span (a linear program), of which this certifies 18, and none of the 125 others."""
    squares = (ell * ell).sum(dim=0)  # ℓᵀℓ is diagonal (scaled eigenvectors)
    B = torch.stack([torch.ones_like(sqrt_weights), sqrt_weights], dim=1)
    C = ell @ ((ell.T @ B) / squares.unsqueeze(1))
    margin = _POINTED_MARGIN * C.abs().amax(dim=0)
    positive = (margin < C) | (G.diagonal() <= 0).unsqueeze(1)
    return bool(positive.all(dim=0).any())


def _refined_least_norm(
    G: Tensor, G_exact: Tensor, U: Tensor, GU: Tensor, tol: float, factor: RangeFactor | None = None
) -> tuple[Tensor, Tensor]:
    """The least-norm mode up to ``m = 64``, in float64 (also for a float32 ``G``: one solve of
    its values, rather than one in float32 and another for the rows that its rounding leaves):
    pivoting (up to ``m = 32`` with masked full-size face systems: a few operations per step)
    finds the optimal face of the regularised ``G`` from the one-step guess, whose solution is
    then refined towards ``G_exact`` until it settles
    (:func:`~torchjd.linalg._principal_pivoting.least_norm_pivoting`; for a float32 ``G``, each
    row's iterate of least residual). The rows where pivoting fails (it wanders on degenerate
    problems; from ``m = 33``, every row of a batch of compacted faces where it solves none by
    step :data:`_LEAST_NORM_GIVE_UP`) go to the interior point at once, which is where the general
    route (:func:`_pivoting_route`), repeating the same first pivots, would send them; so do
    the rows whose refined face misses ``tol`` on ``G_exact`` (float64) after more steps than
    the general route's :data:`_LEAST_NORM_PIVOTS`, while those found within them
    are kept as they are: the general route would find the same face and refinement again
    (those of a float64 ``G`` above ``tol`` on ``G_exact`` are then finished by
    :func:`_last_resort`: on ``benchmarks/non_conflict.py``'s float64 stream at ``m = 64``, #84,
    a row at 8·10⁻⁷). Returns the rows (``v ≥ u``) and which are final (all). ``factor``: the
    :data:`RangeFactor` of ``G_exact``, for the fallback."""
    m = G.shape[0]
    G64, G_exact64, U64 = G.double(), G_exact.double(), U.double()
    # Masked steps are cheap: as many as the default mode takes; compacted ones, the general
    # route's few.
    steps = 3 * m + 10 if m <= _MASKED_MAX_M else _LEAST_NORM_PIVOTS
    X, found, residual, finished = least_norm_pivoting(
        G64,
        U64,
        GU > 0,
        row_scales(G64),
        tol,
        steps,
        G_exact64,
        G.dtype == torch.float32,
        _LEAST_NORM_GIVE_UP,
    )
    # The rows that the general route, repeating these pivots for at most _LEAST_NORM_PIVOTS
    # steps, would find again (the rounding of a float32 G can keep a row above tol whatever
    # its weights: in float32, every row found).
    # Kept: the rows found within them, or found and meeting tol (without a limit on the steps
    # within which they count, every row found).
    kept = found
    if G.dtype == torch.float64 and finished is not None and steps > _LEAST_NORM_PIVOTS:
        kept = found & ((residual <= tol) | (finished < _LEAST_NORM_PIVOTS))
    X = X.to(G.dtype)
    if G.dtype == torch.float64:
        # A float64 row kept above tol on G_exact (its face, optimal for G, refined short of
        # G_exact's optimum) is finished on G_exact by the fallback's last resort.
        (short,) = (kept & ~(residual <= tol)).nonzero(as_tuple=True)
        if short.numel() > 0:
            X[short] = _last_resort(G_exact64, U64[short], X[short], tol)
    (left,) = (~kept).nonzero(as_tuple=True)
    if left.numel() > 0:
        X[left] = _least_norm_fallback(G, G_exact, U[left], tol, factor)
    return X, torch.ones_like(found)


def _pivoting_route(
    G: Tensor,
    G_exact: Tensor,
    U: Tensor,
    GU: Tensor,
    tol: float,
    max_iters: int,
    factor: RangeFactor | None = None,
    range_retry: bool = False,
) -> Tensor:
    """The least-norm mode's pivoting: from the one-step guess up to ``m = 64``, else warm-started
    by ADMM (:mod:`torchjd.linalg._warm_start`), the rows it leaves then solved in the range of
    ``G`` with ``range_retry`` (from ``m = 512``; ``factor`` then returns the range factor:
    :mod:`torchjd.linalg._range_projection`); the rows left go to the interior point
    (:func:`_least_norm_fallback`, given ``factor``)."""
    m = G.shape[0]
    if m <= _DIRECT_MAX_M:
        G64 = G.double()
        X, converged = principal_pivoting(
            G64, U.double(), GU > 0, row_scales(G64), tol, _LEAST_NORM_PIVOTS, G_exact.double()
        )
        X = X.to(G.dtype)
    else:
        X, converged = warm_started_pivoting(G, G_exact, U, tol, max_iters)
        left = (~converged).nonzero().squeeze(1)
        if m < _RANGE_MIN_M and left.numel() > 0:
            X_left, converged[left] = _exact_faces(G, G_exact, U[left], X[left], tol, factor)
            X[left] = X_left
            left = (~converged).nonzero().squeeze(1)
            # Below _UNIQUE_MIN_M, the unique-face route comes after pivoting, for its rows left
            # (not those of a positive span, never unique): a tall Jacobian of very low rank can
            # leave it some (at m = 128, rank 32: 28 of 128 rows, 0.06 s of fallback, all unique).
            unique = left.numel() > 0 and m < _UNIQUE_MIN_M and not range_retry
            ranked = factor() if unique and factor is not None else None
            rank = m if ranked is None else ranked[0].shape[1]
            if rank <= m / _LOW_RANK_FRACTION:
                X_left, converged[left] = unique_optimum_rows(
                    G_exact.double(), U[left].double(), tol, rank
                )
                X[left] = X_left.to(G.dtype)
                left = (~converged).nonzero().squeeze(1)
        formed = factor() if range_retry and factor is not None else None
        if formed is not None and m >= _RANGE_MIN_M and left.numel() > 0:
            X_left, converged[left] = range_projection_rows(
                G_exact.double(), U[left].double(), tol, formed, G.dtype
            )
            X[left] = X_left.to(G.dtype)
    if not converged.all():
        left = (~converged).nonzero().squeeze(1)
        X[left] = _least_norm_fallback(G, G_exact, U[left], tol, factor)
    return X


def _exact_faces(
    G: Tensor, G_exact: Tensor, U: Tensor, X: Tensor, tol: float, factor: RangeFactor | None
) -> tuple[Tensor, Tensor]:
    """Exact mode, ``64 < m < 512``: the rows ``X`` that warm-started pivoting left (``G``: the
    Tikhonov regularisation of ``G_exact``) pivoted again, in float64: on the faces of ``G_exact``
    itself (:func:`~torchjd.linalg._warm_start.exact_face_pivoting`) for a float64 ``G``; on ``G``
    for a float32 one (:func:`~torchjd.linalg._warm_start.float64_pivoting`). In float64, the
    rows solved are then replaced by the least-norm weights of their update where these are
    lighter and meet ``tol`` (:func:`~torchjd.linalg._range_projection.least_energy_rows`, as by
    :func:`_least_norm_fallback`, which the others take). Returns the rows (in the dtype of
    ``G``) and which are solved: those that meet ``tol`` on ``G_exact`` (float64) or conflict
    with no row of it beyond ``tol`` (float32)."""
    G64 = G_exact.double()
    if G.dtype != torch.float64:
        # (Not polished: on the float32 call of float64_pivoting's docstring, the polish would
        # cost 0.36 s for its 54 rows, and leave them up to 1.9·10⁻⁴ heavier in energy than the
        # fallback's instead of 8.9·10⁻⁴; their conflicts are lower than the fallback's.)
        return float64_pivoting(G, G64, U, X, tol)
    X, solved = exact_face_pivoting(G64, U, X, tol)
    formed = None if factor is None else factor()
    (rows,) = solved.nonzero(as_tuple=True)
    if formed is not None and rows.numel() > 0:
        X[rows] = least_energy_rows(G64, U[rows], X[rows], tol, formed, optimal=True)
    return X, solved


def _times(U: Tensor, G: Tensor) -> Tensor:
    """``U G`` for a symmetric ``G``; a scaling of the rows of ``G`` when ``U`` is diagonal (the
    problems of UPGrad), which is checked."""
    if U.shape[0] == U.shape[1] and torch.equal(U, torch.diag(U.diagonal())):
        return U.diagonal().unsqueeze(1) * G
    return U @ G


def _schur_then_principal_pivoting(
    G: Tensor, U: Tensor, active: Tensor, tol: float, max_iters: int
) -> Tensor:
    """Default mode, ``m ≤ 64``: pivoting with face solves through ``G⁻¹`` when ``G`` is
    well-conditioned; the rows it leaves, by pivoting on the faces of ``G`` in float64, then ADMM
    and its polish."""
    m = G.shape[0]
    result = schur_pivoting(G, U, active, tol, 3 * m + 10, m)
    if result is None:
        X, converged = U.clone(), torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    else:
        X, converged = result
    if bool(converged.all()):
        return X
    left = (~converged).nonzero().squeeze(1)
    G64 = G.double()
    X_left, solved = principal_pivoting(
        G64, U[left].double(), active[left], row_scales(G64), tol, 3 * m + 10
    )
    X_left = X_left.to(G.dtype)
    if not bool(solved.all()):
        rows = (~solved).nonzero().squeeze(1)
        X_left[rows] = _admm_then_polish(G, U[left][rows], tol, max_iters, None)
    X[left] = X_left
    return X


def tikhonov(G: Tensor) -> Tensor:
    r"""``G + σ diag(G)`` (``σ`` from :data:`TIKHONOV`), with ``σ · 10⁻⁶ max_j G_jj`` on the
    diagonal of zero rows: positive definite, and, as ``σ → 0``, its optimum tends to the optimal
    weights of ``G`` that minimise :math:`\sum_j G_{jj} v_j^2 = \sum_j \|v_j J_j\|^2` (the
    energy of each row's contribution to the update), ties on zero rows broken by least norm."""
    diagonal = G.diagonal()
    weights = torch.where(diagonal > 0, diagonal, 1e-6 * diagonal.amax())
    return G + torch.diag(TIKHONOV[G.dtype] * weights)


def _least_norm_fallback(
    G: Tensor,
    G_exact: Tensor,
    U: Tensor,
    tol: float,
    factor: RangeFactor | None = None,
) -> Tensor:
    """The rows that pivoting left, in the least-norm mode: the interior point in float64, with
    Woodbury solves when ``rank(G_exact) ≤ 2m / 3``. On a singular ``G_exact``, its weights
    (those of the Tikhonov term's limit, only approached) are then replaced by the least-norm
    ones of the same update (:func:`~torchjd.linalg._range_projection.least_energy_rows`, from
    the range factor that ``factor`` returns, formed here when not given) where these meet
    ``tol`` on ``G_exact`` and are lighter (also on the rows of the range route below). Before
    that, in float64, the rows still above ``tol`` on ``G_exact`` go to :func:`_last_resort`.

    Between ``m = 64`` and :data:`_RANGE_MIN_M` (from which the callers have tried it already),
    the rows of a float64 ``G`` first go to the range route
    (:func:`~torchjd.linalg._range_projection.range_projection_rows`, through
    :func:`_range_rows_first`), the interior point taking those it leaves. On the rows that reach
    this fallback at ``m = 256`` (float64; ``non_conflict.hard_jacobian``'s stream from seed 0,
    304 rows; seed 1, 616; the benchmark's, 111), 0.80, 1.02 and 0.95 of the time, and 9 rows
    above ``tol`` on ``G_exact`` instead of 71, the same 97, and 68 instead of 80; none heavier
    than before by more than 10⁻⁴. Not in float32, where its weights are heavier than those of
    the interior point and its polish (by 3.5% in the median on 155 rows of one call), nor up to
    ``m = 64``, where it takes 1.6 times as long. The interior point's Woodbury factor of a
    float32 ``G`` is that of its range, read at float32 rounding
    (:func:`~torchjd.linalg._low_rank.woodbury_factor`: on the float32 Jacobian of seed 0, #1, of
    ``benchmarks/non_conflict.py`` at ``m = 1024``, rank 351 instead of 441, 361 s -> 287 s a
    call)."""
    m = G.shape[0]
    G64, G_exact64, U64 = G.double(), G_exact.double(), U.double()
    formed = range_factor(G_exact64, G.dtype) if factor is None else factor()
    V, left = U64.clone(), torch.arange(U.shape[0], device=U.device)
    # (Not under autograd, a tracked G: the range route updates its factors in place.)
    range_route = _SPANNING_MIN_M < m < _RANGE_MIN_M and not tracked(G_exact)
    if formed is not None and G.dtype == torch.float64 and range_route:
        V, found = _range_rows_first(G_exact64, U64, tol, formed, G.dtype)
        left = (~found).nonzero().squeeze(1)
    if left.numel() > 0:
        L = woodbury_factor(G_exact64, int(m / _LOW_RANK_FRACTION), G.dtype, formed)
        low_rank = None if L is None else (L, (G64 - G_exact64).diagonal())
        V[left] = _interior_point_then_polish(G64, U64[left], tol, G_exact64, low_rank, G.dtype)
    if G.dtype == torch.float64:
        V = _last_resort(G_exact64, U64, V, tol)
    else:
        V = _conflict_last_resort(G_exact64, U64, V, tol)
    if formed is not None:
        # (Also where _least_energy_polish follows, float64 up to m = 64: without this one, it
        # left 175 rows of benchmarks/non_conflict.py's at m = 64 (seed 0) heavier, by up to
        # 3.6·10⁻³; in float32, where none follows, rows came out up to 2·10³ times heavier.)
        # With keep_free: the interior point's rows keep small weights (about 10⁻⁸ to 10⁻⁶
        # above their bounds) where (G v)_j is small but above the tight set's threshold; set
        # to their bounds, they move the update off the optimum, the lighter candidate misses
        # tol, and the row stayed as heavy as the interior point left it (so did the final
        # polish's). On the hard Jacobians of benchmarks/non_conflict.py at m = 64 (seeds 0 and
        # 5000, 100 of each dtype): float64 rows up to 3·10⁻⁴ heavier than the least-energy
        # weights of their update (quadprog; the certificate of test_xs3_give_up missed by 0.2)
        # and one by 2.7%, float32 rows by up to 0.2%; with the second candidate, 5 float64 and
        # 2 float32 rows lighter by these amounts, none heavier. It ran on 2 to 4 of 50
        # Jacobians per stream (0.1 to 0.3 ms a call on average; the exact mode 2 to 4% slower).
        V = least_energy_rows(G_exact64, U64, V, tol, formed, keep_free=True)
    return V.to(U.dtype)


def _conflict_last_resort(G: Tensor, U: Tensor, V: Tensor, tol: float) -> Tensor:
    """Exact mode, float32: the rows of ``V`` whose update still conflicts with a row of ``J``
    beyond ``tol`` on the float64 values ``G`` of the float32 Gramian
    (:func:`~torchjd.linalg._kkt.worst_conflict`) solved again by the active-set method of
    Lawson and Hanson (:mod:`torchjd.linalg._lawson_hanson`), in float64, on ``G`` with its
    negative eigenvalues set to zero (rounding leaves it slightly indefinite; zero rows kept
    zero; on ``G`` itself as well, it fixed no more rows of the cases below, and on 2 of 50 hard
    Jacobians of ``benchmarks/non_conflict.py`` at ``m = 64`` it took 170-250 ms a call instead
    of 30-40), each row keeping, of the candidate and its own, the one of least conflict bound:
    its worst conflict on ``G`` plus the float32 rounding ``ε Σ_k |G_jk| |v_k|`` of each
    ``(G v)_j`` (a heavy row that ``G`` alone does not tell from optimal is not taken). The
    interior point runs on a Tikhonov-regularised ``G`` (:data:`TIKHONOV`: ``10⁻⁵`` in float32)
    whose bias the polishes leave where the optimal weights are large: with pairs of rows of
    ``J`` opposite up to ``3·10⁻³`` and ``6·10⁻³`` (``m = 96``, float32, 20 Jacobians of
    ``tests/linalg/test_near_opposite_pairs.py``'s family, 12 rows each), 11 had a row in
    conflict beyond ``10⁻⁴`` on the exact Gramian, down to ``−1.9·10⁻⁴``; after, none, the worst
    about ``−3·10⁻⁵`` (seeds 30 to 49 at ``2·10⁻³`` to ``10⁻²``: 17 of 80 before, down to
    ``−2.3·10⁻⁴``; none after, the worst ``−4.3·10⁻⁵``). The candidate can go wrong, which the
    bound rejects (on the raw ``G``: weights of ``5·10⁷`` with conflicts of ``0.34``; on the
    clipped one when its zero rows were not kept zero: weights of ``10¹⁹`` on them)."""
    conflict = worst_conflict(G, U, V @ G)
    (rows,) = (conflict > tol).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return V
    eigenvalues, Q = torch.linalg.eigh(G)
    G_psd = (Q * eigenvalues.clamp_min(0)) @ Q.T
    nonzero = G.diagonal() > 0
    G_psd = (G_psd + G_psd.T) / 2 * (nonzero.unsqueeze(1) & nonzero)
    rounding = torch.finfo(torch.float32).eps * G.abs()

    def bound(G: Tensor, U: Tensor, X: Tensor, GX: Tensor) -> Tensor:
        return worst_conflict(G, U, GX - X.abs() @ rounding)

    X = lawson_hanson_rows(G_psd, U[rows], V[rows], 3 * G.shape[0] + 10)
    V[rows] = kkt_best(G, U[rows], [V[rows], X], score=bound)[0]
    return V


def _last_resort(G: Tensor, U: Tensor, V: Tensor, tol: float) -> Tensor:
    """Exact mode, float64: the rows of ``V`` above ``tol`` on ``G`` solved again by the
    active-set method of Lawson and Hanson on ``G`` itself (:mod:`torchjd.linalg._lawson_hanson`,
    from their free indices), each kept where closer to optimal (else the row of ``V``: where
    the optimal weights are so large that rounding keeps every row above ``tol``, the best one
    found), compared per unit of weight
    (:func:`~torchjd.linalg._kkt.kkt_residual` with ``per_weight``: with pairs of rows of ``J``
    opposite up to ``10⁻⁶``, its exact rows, of weights ``10⁸``, had a plain residual of
    ``7·10⁻²`` from rounding alone, and the interior point's, of weights ``2·10⁴``, of
    ``9·10⁻⁴``, with conflicts of ``−7.6·10⁻⁸`` and an update off by a fifth of ``max‖J_j‖``:
    kept, before). The Tikhonov term biases the other routes where the optimal weights are large
    (near-duplicate rows: on the Jacobian #1 of ``benchmarks/non_conflict.py``'s float64 stream
    at ``m = 64``, weights of norm 10⁵, rows left at 4·10⁻⁴ on ``G``; by this method,
    2·10⁻¹¹)."""
    V, residual = kkt_best(G, U, [V])
    (rows,) = (~(residual <= tol)).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return V
    m = G.shape[0]
    X = lawson_hanson_rows(G, U[rows], V[rows], 3 * m + 10)
    per_weight = functools.partial(kkt_residual, per_weight=True)
    V[rows] = kkt_best(G, U[rows], [V[rows], X], per_weight)[0]
    return V


def _range_rows_first(
    G: Tensor, U: Tensor, tol: float, factor: tuple[Tensor, Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """:func:`~torchjd.linalg._range_projection.range_projection_rows` of the rows ``U`` (float64),
    and which it accepts, when it accepts at least :data:`_RANGE_PROBE_SHARE` of
    :data:`_RANGE_PROBE_ROWS` of them, spread out, tried first (by its cold method alone, without
    the warm start of rows with large active sets: on a call where they fail, cheaper); else
    those only (the others ``u``, not accepted). (At ``m = 256``, on a call where it accepts a
    third of the rows, it takes as long as the interior point on all of them.)"""
    return probe_first(
        U,
        _RANGE_PROBE_ROWS,
        lambda rows: range_projection_rows(G, rows, tol, factor, dtype, warm=False),
        lambda rows: range_projection_rows(G, rows, tol, factor, dtype),
        enough=math.ceil(_RANGE_PROBE_SHARE * _RANGE_PROBE_ROWS),
    )


def _admm_then_polish(
    G: Tensor,
    U: Tensor,
    tol: float,
    max_iters: int,
    G_exact: Tensor | None,
    lopsided: bool = False,
) -> Tensor:
    """ADMM, then an exact polish by pivoting from the active set it found.

    The polish runs on every row when its face solves are cheap. With ``least_norm`` (a barely
    regularised ``G``, on which ADMM can be slow), ADMM stops after ``_LEAST_NORM_ADMM_ITERS``
    iterations and pivoting, whatever its cost, takes over the rows it left.

    ADMM runs on the Jacobi-scaled problem when that makes it much better conditioned
    (:func:`_jacobi_scale`), and also when the rows' faces are ``lopsided`` (few active or few free
    indices, see :func:`_schur_pivoting_then_admm`): its parameters there then suit these
    problems (on per-sample Gramians at initialisation, half the iterations).
    """
    m = G.shape[0]
    least_norm = G_exact is not None
    if least_norm:
        max_iters = min(max_iters, _LEAST_NORM_ADMM_ITERS)
    scale = None if least_norm else _jacobi_scale(G)
    if scale is None and lopsided and bool((G.diagonal() > 0).all()):
        scale = G.diagonal().rsqrt()
    if not least_norm and G.dtype == torch.float64 and m >= _WARM_START_MIN_M:
        Z, converged = _admm_from_float32(G, U, tol, max_iters, scale)
    else:
        Z, converged, _ = warm_admm(G, U, tol, max_iters, scale=scale)
    active = Z <= U
    free_sizes = (m - active.sum(dim=1)).double()
    cheap = float(free_sizes.pow(3).sum()) <= _POLISH_BUDGET * m**3
    if cheap:
        polish = torch.ones_like(converged)
    elif least_norm:
        polish = ~converged
    else:
        return Z
    rows = polish.nonzero().squeeze(1)
    if rows.numel() == 0:
        return Z
    steps = _POLISH_STEPS if bool(converged[rows].all()) else 3 * m + 10
    X, solved = principal_pivoting(G, U[rows], active[rows], row_scales(G), tol, steps, G_exact)
    Z[rows] = torch.where(solved.unsqueeze(1), X, Z[rows])
    return Z


def _jacobi_scale(G: Tensor) -> Tensor | None:
    r"""``diag(G)^{-1/2}`` when the Jacobi scaling makes ``G`` much better conditioned (then ADMM,
    with its scalar ``ρ``, needs fewer iterations), else None.

    The estimate comes from one Cholesky factorisation ``G = L Lᵀ``, whose pivots
    :math:`p_j = L_{jj}^2` bound the smallest eigenvalue; those of ``S G S`` are
    :math:`p_j / G_{jj}`:
    :math:`\kappa(G) \approx \max_j G_{jj} / \min_j p_j` against :math:`\kappa(SGS) \approx 1 /
    \min_j (p_j / G_{jj})`. Per-sample Gramians after some training (gradient norms spread over
    decades) gain a factor 20 to 40; Gramians whose spread diagonal comes from a low rank (the
    regularisation then dominates the small rows) gain nothing."""
    diagonal = G.diagonal()
    if not bool(diagonal.amax() > _JACOBI_MIN_GAIN * diagonal.amin()):
        return None  # the gain is at most the spread of the diagonal: no factorisation needed
    L, info = torch.linalg.cholesky_ex(G)
    pivots = L.diagonal() ** 2
    gain = diagonal.amax() / pivots.amin() * (pivots / diagonal).amin()
    if not bool((info == 0) & (diagonal.amin() > 0) & (gain > _JACOBI_MIN_GAIN)):
        return None
    return diagonal.rsqrt()


def _admm_from_float32(
    G: Tensor, U: Tensor, tol: float, max_iters: int, scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """ADMM in float64 from the state that ADMM in float32 reaches (the rows within
    ``_WARM_START_TOL``, or its last iterate): most iterations then cost half as much."""
    scale32 = None if scale is None else scale.float()
    _, _, (Z, multipliers, rho) = warm_admm(
        G.float(), U.float(), _WARM_START_TOL, _WARM_START_ITERS, scale=scale32
    )
    if not 0.0 < rho < math.inf:
        return warm_admm(G, U, tol, max_iters, scale=scale)[:2]
    usable = (Z.isfinite() & multipliers.isfinite()).all(dim=1, keepdim=True)
    Z = torch.where(usable, torch.maximum(Z.to(G.dtype), U), U)
    multipliers = torch.where(usable, multipliers.to(G.dtype), 0.0)
    out, converged, _ = warm_admm(G, U, tol, max_iters, Warm(Z, multipliers, rho), scale)
    return out, converged


def _schur_pivoting_then_admm(
    G: Tensor, U: Tensor, active: Tensor, tol: float, max_iters: int
) -> Tensor:
    """Pivoting with face solves through ``G⁻¹`` when the initial guess's faces are cheap and
    ``G`` is well-conditioned; ADMM and its polish for the rest, and for the rows that pivoting
    leaves (or solves less accurately than ``tol`` on ``G`` itself)."""
    m = G.shape[0]
    n_active = active.sum(dim=1)

    def admm_then_polish(U: Tensor) -> Tensor:
        lopsided = bool(torch.minimum(n_active, m - n_active).double().mean() <= _LOPSIDED * m)
        return _admm_then_polish(G, U, tol, max_iters, None, lopsided)

    distinct = distinct_faces(active)
    if float(distinct_face_cost(distinct[0])) > _SCHUR_BUDGET[G.dtype] * m**3:
        return admm_then_polish(U)
    result = schur_pivoting(G, U, active, tol, _SCHUR_PIVOTS, m // 4, distinct)
    if result is None:
        return admm_then_polish(U)
    X, converged = result
    if not bool(converged.all()):
        left = (~converged).nonzero().squeeze(1)
        X[left] = admm_then_polish(U[left])
    return X


def _interior_point_then_polish(
    G: Tensor,
    U: Tensor,
    tol: float,
    G_exact: Tensor,
    low_rank: tuple[Tensor, Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """For rows where pivoting wandered: the interior-point method, then, on the rows where it
    does not meet ``tol`` for ``G_exact``, pivoting (with the least-norm refinement) from the active
    set it identifies; its answer is kept where pivoting does not conclude. With ``low_rank``,
    ``(L, t)`` with ``G ≈ L Lᵀ + diag(t)``, its Newton systems are solved by the Woodbury identity.
    The rows go through it in chunks that bound its ``[k, m, m]`` (or ``[k, r, m]``) tensors.
    ``dtype``: that of the Gramian whose values ``G_exact`` holds; the active sets are not read
    at thresholds below its resolution (in float32, no row differs there)."""
    m = G.shape[0]
    width = m if low_rank is None else low_rank[0].shape[1]
    chunk = max(1, _CHUNK_ENTRIES // (m * width))
    V = torch.cat(
        [interior_point(G, rows, _INTERIOR_TOL * tol, low_rank=low_rank) for rows in U.split(chunk)]
    )
    GV = V @ G_exact
    residual = kkt_residual(G_exact, U, V, GV)
    # Rows are polished while above tol on G_exact; of their candidates, each keeps the one of
    # least residual per unit of weight (kkt_residual's per_weight: where the optimal weights are
    # large, rounding inflates the plain residual of the exact rows).
    score = kkt_residual(G_exact, U, V, GV, per_weight=True)
    # The active set is read off the interior solution at several thresholds (its weights are
    # biased by the Tikhonov term, more so when they are large); each row keeps its best polish.
    # Last, from the best rows' own active sets, the faces of G_exact itself: near-duplicate rows
    # (G barely nonsingular, its optimum unique) can leave the Tikhonov solution just short of
    # tol; a singular face gives a NaN row, which is never kept.
    eps = torch.finfo(dtype).eps
    polishes = [(G, threshold, G_exact) for threshold in _ACTIVE_THRESHOLDS if threshold >= eps]
    for G_face, threshold, G_refined in [*polishes, (G_exact, 0.0, None)]:
        rows = (~(residual <= tol)).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        U_left, V_left = U[rows], V[rows]
        active = V_left - U_left <= threshold * U_left.abs().amax(dim=1, keepdim=True)
        X, _ = principal_pivoting(G_face, U_left, active, row_scales(G_face), tol, 20, G_refined)
        X = torch.maximum(X, U_left)
        # Kept where it is closer to optimal for G_exact (per unit of weight), even unconverged
        # on G (the refinement of its last faces removes the Tikhonov bias).
        GX = X @ G_exact
        polished = kkt_residual(G_exact, U_left, X, GX, per_weight=True).nan_to_num(torch.inf)
        better = polished < score[rows].nan_to_num(torch.inf)
        V[rows] = torch.where(better.unsqueeze(1), X, V_left)
        score[rows] = torch.where(better, polished, score[rows])
        plain = kkt_residual(G_exact, U_left, X, GX)
        residual[rows] = torch.where(better, plain, residual[rows])
    return V

r"""Exact solution of ``min_{v ≥ u} vᵀ G v`` by block principal pivoting, for many rows at once.

The KKT conditions form a linear complementarity problem: with ``x = v − u ≥ 0`` and
``y = G v ≥ 0``, ``xᵀy = 0``. A guess of the active set ``A`` (where ``x = 0``) fixes ``v``: on the
free set ``F``, ``G_FF v_F = −G_FA u_A``. The guess is right when ``x_F ≥ 0`` and ``y_A ≥ 0``;
otherwise the infeasible indices are exchanged between ``A`` and ``F``, all at once while their
number decreases, else (after three tries) only the largest one: Júdice & Pires (1994), as used
for non-negative least squares by Kim & Park (2011, Algorithm 1). The exchange of all infeasible
indices is the primal-dual active-set step of Hintermüller, Ito & Kunisch (2002). With a positive
definite ``G`` the method stops after finitely many exchanges, at a face whose solution is exact
up to rounding.

Every row has its own face; each step solves all of them together, as one batched Cholesky
factorisation of masked ``[m, m]`` systems (small ``m``, or few rows), or of the compacted
``|F| × |F|`` blocks (padded to one width up to ``m = 64``, else grouped by size).

The face systems are solved after a symmetric Jacobi scaling (unit diagonal), so that rows of very
different norms are solved equally accurately. ``G`` must be positive definite (the caller adds a
tiny Tikhonov term to a singular one); a face solution that does not zero the gradient on its free
set (a numerically singular face) stops its row, unconverged.
"""

from collections.abc import Callable
from functools import cached_property

import torch
from torch import Tensor

from torchjd.linalg._autograd import tracked
from torchjd.linalg._kkt import feasible_kkt_residual, kkt_scales
from torchjd.linalg._low_rank import cholesky_solve

_FULL_EXCHANGES = 3  # non-improving full exchanges allowed before a single pivot
_MASKED_MAX_M = 32  # up to this size, masked full-size systems beat compacted blocks
_ONE_GROUP_MAX_M = 64  # up to this size, the compacted blocks are padded to one width
# Least-norm mode: masked systems also for few rows, up to this k m³ (4 rows at m = 64).
_MASKED_BUDGET = 2**20
_DUAL_THRESHOLD = 1e-3  # of tol: conflicts that pivoting still corrects
_PRIMAL_THRESHOLD = 1e-3  # of tol: how far below its bound a weight may fall (then clamped)
_REFINEMENTS = 6  # iterated-refinement steps of the least-norm mode, at most
# The refinement stops once its steps are below this fraction of max|v| (and every row meets the
# tolerance): the weights of all _REFINEMENTS steps to about that precision.
_SETTLED = 1e-7
# Smallest squared pivot of the Jacobi-scaled Cholesky factor of G (a bound on its conditioning)
# for which faces are solved through G⁻¹.
_INVERSE_MIN_PIVOT = {torch.float64: 1e-7, torch.float32: 1e-3}
_INVERSE_MAX_ACTIVE = 64  # beyond, the [k, |A|, |A|] blocks of the Schur complements get too big
# compacted_blocks: entries of its [g, width, n] intermediate rows, at most (4 MiB in float64).
_GATHER_ENTRIES = 2**19


def principal_pivoting(
    G: Tensor,
    U: Tensor,
    active: Tensor,
    row_scale: Tensor,
    tol: float,
    max_iters: int,
    G_exact: Tensor | None = None,
    face_solver: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Solves each row from the initial guess ``active`` (``[k, m]`` booleans).

    An index is infeasible when its violation, relative to ``max|u|`` (for ``v ≥ u``) or to
    ``row_scale_j · max|u|`` (for ``(Gv)_j ≥ 0``), exceeds a small fraction of ``tol``. Returns
    the last face solution of every row (clamped to ``v ≥ u``), and which rows ended with no
    infeasible index.

    With ``G_exact`` (the Gramian that ``G`` regularises), the final faces are then re-solved
    for ``G_exact`` by iterated refinement, ``v_F ← v_F − G_FF⁻¹ (G_exact v)_F``: the
    regularisation's bias goes, the (scaled) null-space component of ``v`` stays.

    ``face_solver`` (``(U, active) ↦ (V, G V)``, without ``G_exact``) replaces the default face
    solves.
    """
    if G_exact is not None:
        if face_solver is not None:
            raise ValueError("Expected `face_solver` to be None when `G_exact` is given.")
        X, converged, *_ = least_norm_pivoting(G, U, active, row_scale, tol, max_iters, G_exact)
        return X, converged
    if face_solver is None and U.shape[1] <= _MASKED_MAX_M:
        return _masked_pivoting(G, U, active, row_scale, tol, max_iters)[:2]
    X, converged, *_ = _pivoting(G, U, active, row_scale, tol, max_iters, face_solver, False)
    return X, converged


def least_norm_pivoting(
    G: Tensor,
    U: Tensor,
    active: Tensor,
    row_scale: Tensor,
    tol: float,
    max_iters: int,
    G_exact: Tensor,
    rounded: bool = False,
    give_up: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`principal_pivoting` with ``G_exact``, which also returns the KKT residual of each
    row for ``G_exact`` (:func:`~torchjd.linalg._kkt.kkt_residual`) and, when the faces were
    masked systems, the step (from 0) at which each row left pivoting, else None (each row's
    steps depend neither on the other rows of the batch, nor on ``max_iters`` beyond them). Up to
    :data:`_MASKED_MAX_M`, and for few rows (``k m³`` up to :data:`_MASKED_BUDGET`: the rows that
    other methods leave), with the masked full-size face systems of :func:`_masked_pivoting` (few
    operations per step); else, up to :data:`_ONE_GROUP_MAX_M`, with its compacted variant (the
    same few operations per step, on ``|F| × |F|`` blocks); else with :func:`_pivoting`. The
    refinement reuses the last factors of the compacted faces. ``rounded``: ``G_exact`` holds
    the values of a float32 Gramian (see :func:`refine`). ``give_up``: that of
    :func:`_masked_pivoting` (compacted faces only); with it, when no row converged, the rows are
    returned unrefined (clamped to ``v ≥ u``), their residuals ``+inf`` (on the float64 hard
    Jacobians of ``benchmarks/non_conflict.py`` at ``m = 64``, a refinement of 1 to 1.5 ms on
    each of the 7 of 50 calls whose batch gave up)."""
    k, m = U.shape
    masked = m <= _MASKED_MAX_M or k * m**3 <= _MASKED_BUDGET
    if masked or m <= _ONE_GROUP_MAX_M:
        X, converged, final_active, kept = _masked_pivoting(
            G,
            U,
            active,
            row_scale,
            tol,
            max_iters,
            keep_factors=True,
            compacted=not masked,
            give_up=give_up,
        )
        solve, finished = kept
        if not masked:  # (compacted: wandering rows stop early, their steps depend on max_iters)
            finished = None
            if give_up is not None and not bool(converged.any()):
                # No row converged (the whole batch gave up, see _masked_pivoting): the caller
                # takes every row to its fallback, and the refinement is not run (rows clamped
                # to v ≥ u, residuals +inf).
                return torch.maximum(X, U), converged, torch.full_like(X[:, 0], torch.inf), None
    else:
        X, converged, final_active, solve = _pivoting(
            G, U, active, row_scale, tol, max_iters, None, least_norm=True
        )
        finished = None
    X, residual = refine(G_exact, G, U, X, final_active, tol, masked, solve, rounded)
    return X, converged, residual, finished


def _pivoting(
    G: Tensor,
    U: Tensor,
    active: Tensor,
    row_scale: Tensor,
    tol: float,
    max_iters: int,
    face_solver: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None,
    least_norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor] | None]:
    """The loop of :func:`principal_pivoting` on compacted faces; also returns each row's last
    active set. With ``least_norm`` (a barely regularised ``G``), no face is solved through
    ``G⁻¹``, the rows done leave the batch at once, and so do, unconverged, the rows left to
    single pivots with more infeasible indices than steps left (they wander, on degenerate
    problems: the caller's fallback gets them sooner); beyond :data:`_MASKED_MAX_M`, the rows
    keep the factors of their last faces, whose solve (that of :func:`face_solver`) it also
    returns (else None)."""
    k, m = U.shape
    X = U.clone()
    final_active = active.clone()
    converged = torch.zeros(k, dtype=torch.bool, device=U.device)
    rows = torch.arange(k, device=U.device)
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
    best = torch.full((k,), m + 1, device=U.device)
    tries = torch.full((k,), _FULL_EXCHANGES, device=U.device)
    # Default mode (well-conditioned G), beyond the sizes where masked systems are cheap: faces
    # with few active indices are solved through G⁻¹.
    inverse = _LazyInverse(G) if not least_norm and m > _MASKED_MAX_M else None
    bordered = bordered_scaled(G) if face_solver is None and m > _MASKED_MAX_M else None
    # (rows, L) of the rows that left at each step, per group of faces
    kept: list[tuple[Tensor, Tensor]] | None = [] if least_norm and bordered is not None else None
    for step in range(max_iters):
        if kept is not None:  # (the solve of solve_on_faces, its factors kept)
            V_A = torch.where(active, U, 0.0)
            groups = _compacted_factors(active, bordered)
            V = V_A + _grouped_solve(groups)(-(V_A @ G))
            GV = V @ G
        elif face_solver is None:
            V = solve_on_faces(G, U, active, inverse, bordered)
            GV = V @ G
        else:
            V, GV = face_solver(U, active)
        X[rows] = V
        final_active[rows] = active
        relative_gradient = GV / (row_scale * u_scale)
        infeasible = torch.where(
            active,
            ~(-relative_gradient <= _DUAL_THRESHOLD * tol),  # NaN counts as infeasible
            ~((U - V) / u_scale <= _PRIMAL_THRESHOLD * tol),
        )
        count = infeasible.sum(dim=1)
        # A face solution whose gradient is not zero on its free set cannot be trusted (a
        # numerically singular face): its row stops, unconverged.
        inexact = ~(torch.where(active, 0.0, relative_gradient.abs()).amax(dim=1) <= tol)
        done = (count == 0) | inexact
        converged[rows] = (count == 0) & ~inexact
        if least_norm:
            # Least-norm mode: a row left to single pivots (its count has stopped falling) with
            # more infeasible indices than steps left stops (a wandering row, for the interior
            # point), unconverged.
            done |= (tries < 0) & (count > max_iters - 1 - step)
        if kept is None:
            n_done = int(done.sum())
        else:
            # One host synchronisation: the rows done, and how many in each group (beyond
            # _ONE_GROUP_MAX_M, where kept is used: groups of rows, never None).
            counts = torch.stack([done.sum(), *(done[group].sum() for group, *_ in groups)])
            n_done, *leaving = counts.tolist()
        last = step == max_iters - 1
        if kept is not None and (n_done > 0 or last):  # the rows leaving keep their factors
            for (group, _, _, (L, _)), n_leaving in zip(groups, leaving, strict=True):
                group = group.squeeze(1)
                if last:
                    kept.append((rows[group], L))
                elif n_leaving > 0:
                    # The positions of its rows done, first (:func:`free_first`: no sync).
                    chosen = free_first(~done[group].unsqueeze(0))[0, :n_leaving]
                    kept.append((rows[group[chosen]], L[chosen]))
        if n_done == len(rows):
            break

        active, best, tries = exchange(active, infeasible, count, best, tries)
        # Compact when it halves the work; in the least-norm mode, as soon as a row is done.
        if 2 * n_done >= len(rows) or (n_done > 0 and least_norm):
            keep = ~done
            rows, U, active, u_scale, best, tries = (
                t[keep] for t in (rows, U, active, u_scale, best, tries)
            )
    if kept is None:
        return X, converged, final_active, None
    return X, converged, final_active, _kept_grouped_solver(kept, final_active, bordered[0])


def _masked_pivoting(
    G: Tensor,
    U: Tensor,
    active: Tensor,
    row_scale: Tensor,
    tol: float,
    max_iters: int,
    keep_factors: bool = False,
    compacted: bool = False,
    give_up: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Callable[[Tensor], Tensor], Tensor] | None]:
    r""":func:`principal_pivoting` of the default mode up to :data:`_MASKED_MAX_M`, with few
    operations per step: it works in the Jacobi-scaled variables ``z = S⁻¹ v`` of
    ``Ĝ = S G S``, ``S = diag(G)^{-1/2}`` (scaled once), so that each face system is the full-size
    ``K = [Ĝ_FF, 0; 0, I]`` (one ``torch.where``) and its right-hand side needs no mask:

    .. math::

        K x = -Ĝ z_A, \qquad z = z_A \text{ on } A, \; x \text{ on } F,

    where ``z_A`` is ``S⁻¹ u`` on ``A`` and zero on ``F``. The two feasibility tests
    (``(Gv)_A ≥ 0`` and ``v_F ≥ u_F``, same threshold) are one masked violation; the rows done
    leave the batch, their last face solution kept. Returns the rows, which converged, their last
    active sets and, with ``keep_factors``, ``(solve, steps)``: the face solve of
    :func:`face_solver` on their last faces, from the factors computed here (for the least-norm
    refinement), and the step (from 0) at which each row left; else None.

    ``compacted`` (the least-norm mode, ``32 < m ≤ 64``): the same steps with ``Ĝ_FF`` gathered
    as a compacted block (each row's free indices first, padded by the identity to the widest
    free set of the batch), ``|F|³`` work instead of ``m³``; rows left to single pivots with more
    infeasible indices than steps left stop, unconverged (they wander on degenerate problems: the
    caller's fallback gets them sooner). One host synchronisation per step: the size of each
    row's next free set (−1 for the rows done), from which the count of rows done and the width of
    the next faces follow. With ``give_up`` (compacted), when no row is solved by that step (from
    0; up to it, −2 for the rows solved), every row stops there, unconverged: the whole batch is
    degenerate, and the caller's fallback takes it at once."""
    k, m = U.shape
    s, G_hat = jacobi_scaled(G)
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
    # Per row: S⁻¹ u, and the weights of the violations relative to max|u| (primal) and to
    # row_scale_j · max|u| (dual, negated), in z; one tensor, so that the rows done leave in one
    # index.
    U_hat = U / s
    state = torch.stack([U_hat, s / u_scale, -(s * row_scale * u_scale).reciprocal()])
    # The right-hand sides −Ĝ z_A as (z_A) (−Ĝ): the same products, negated (no negated copy of
    # z_A a step).
    minus_G_hat = -G_hat
    zero = G.new_zeros(())
    eye = torch.eye(m, dtype=G.dtype, device=G.device)
    threshold = _PRIMAL_THRESHOLD * tol
    Z_all = torch.empty_like(U)
    final_active = torch.empty_like(active)
    # (row-major, as upper_cholesky returns them: the triangular solves then round the same way)
    L_all = U.new_empty(k, m, m) if keep_factors and not compacted else None
    kept: list[tuple[Tensor, Tensor]] = []  # compacted: (rows, L) of the rows done at each step
    finished = torch.full((k,), max_iters, device=U.device)
    converged = torch.zeros(k, dtype=torch.bool, device=U.device)
    rows = torch.arange(k, device=U.device)
    positions = torch.arange(1, m + 1, device=U.device)
    compacted &= k > 0  # (no row: nothing to gather)
    if compacted:
        bordered = _bordered(G_hat)
        width = int((~active).sum(dim=1).amax())
        slots = positions - 1
        padding = positions + (m - 1)  # (the identity block of bordered)
    # Per row: the most feasible indices so far (the fewest infeasible ones) and the last step
    # that raised it (:func:`exchange`'s full exchanges left without progress are
    # ``tries = _FULL_EXCHANGES − (step − improved)``); both set at step 0, where every row
    # makes progress (placeholders until then).
    most = improved = positions
    n_rows = k
    n_solved = 0  # compacted, with give_up: the rows solved so far (up to that step)
    U_hat, primal_weight, dual_weight = state.unbind()  # (no Tensor.__iter__)
    for step in range(max_iters):
        free = ~active
        Z_A = torch.where(active, U_hat, zero)
        rhs = Z_A @ minus_G_hat
        if compacted:
            # Each row's free indices first, in increasing order, then 0 (the active indices go
            # to slot m, dropped), padded by the identity block.
            free_before = free.cumsum(dim=1)  # free indices up to and including j
            target = torch.where(free, free_before - 1, m)
            columns = torch.zeros(len(rows), m + 1, dtype=target.dtype, device=U.device)
            columns = columns.scatter_(1, target, slots.expand_as(target))[:, :width]
            mask = slots[:width] < free_before[:, -1:]
            index = torch.where(mask, columns, padding[:width])
            # (indices up to m + width: fewer columns to copy)
            L = upper_cholesky(compacted_blocks(bordered[: m + width, : m + width], index))
            x = cholesky_solve(L, torch.where(mask, rhs.gather(1, columns), 0.0))
            Z = Z_A.scatter_add(1, columns, torch.where(mask, x, 0.0))
        else:
            # K = [Ĝ_FF, 0; 0, I]
            K = torch.where(free.unsqueeze(2) & free.unsqueeze(1), G_hat, eye)
            # (upper_cholesky and cholesky_solve, inlined: fewer calls per step)
            R = torch.linalg.cholesky_ex(K, upper=True)[0]
            L = R.mT
            y = torch.linalg.solve_triangular(L, rhs.unsqueeze(2), upper=False)
            x = torch.linalg.solve_triangular(R, y, upper=True).squeeze(2)
            Z = torch.where(active, U_hat, x)
        conflict = (Z @ G_hat) * dual_weight  # −(Gv)_j / (row_scale_j · max|u|)
        violation = torch.where(active, conflict, (U_hat - Z) * primal_weight)
        feasible = violation <= threshold  # NaN counts as infeasible
        n_feasible = feasible.sum(dim=1)
        # A face solution whose gradient is not zero on its free set cannot be trusted (a
        # numerically singular face): its row stops, unconverged.
        exact = torch.where(active, zero, conflict).abs().amax(dim=1) <= tol  # (NaN: not exact)
        solved = n_feasible == m
        done = solved >= exact  # (booleans: solved or not exact)
        if compacted and step > _FULL_EXCHANGES + 1:  # (the last step's tries < 0)
            stalled = improved < step - 1 - _FULL_EXCHANGES
            done |= stalled & (n_feasible < m - (max_iters - 1 - step))
        # The exchange of :func:`exchange`: all infeasible indices while their count falls,
        # else only the largest (never before step _FULL_EXCHANGES + 1: tries is still ≥ 0).
        if step == 0:  # (every row makes progress)
            most, improved = n_feasible, 0
        else:
            improved = torch.where(n_feasible > most, step, improved)
            most = torch.maximum(n_feasible, most)
        if step <= _FULL_EXCHANGES:
            next_active = active == feasible  # (booleans: active xor infeasible)
        else:
            # Infeasible indices by position from 1 (0: feasible); the rows left to single pivots
            # flip their largest, the others all (every row not done has one).
            ranked = torch.where(feasible, 0, positions)
            largest = ranked.amax(dim=1, keepdim=True)
            full = (improved >= step - _FULL_EXCHANGES).unsqueeze(1)
            next_active = active ^ (ranked >= torch.where(full, 1, largest))
        if compacted:  # the next free sets' sizes, -1 for the rows done (-2: solved, to give_up)
            counted = give_up is not None and step <= give_up
            ending = torch.where(solved & exact, -2, -1) if counted else -1
            sizes = torch.where(done, ending, (~next_active).sum(dim=1)).tolist()
            solved_now = sizes.count(-2)
            n_solved += solved_now
            n_done, next_width = solved_now + sizes.count(-1), max(sizes)
            keep = None
            if step == give_up and n_solved == 0 and n_done < n_rows:
                done, n_done = torch.ones_like(done), n_rows
        else:  # (the rows kept, also needed when some are done: one synchronisation)
            (keep,) = (~done).nonzero(as_tuple=True)
            n_done = n_rows - len(keep)
        if n_done > 0 or step == max_iters - 1:  # the rows done leave with their last face
            # (index_copy_ rather than indexing: a few times cheaper on these small tensors)
            Z_all.index_copy_(0, rows, Z)
            final_active.index_copy_(0, rows, active)
            # Before the last step, a row done (solved or not exact) of the masked systems is
            # solved when its face is exact (compacted, stalled rows are done too).
            exact_done = not compacted and step < max_iters - 1
            converged.index_copy_(0, rows, exact if exact_done else solved & exact)
            if keep_factors:
                finished.index_fill_(0, rows, step)
            if L_all is not None:
                L_all.index_copy_(0, rows, L)
            elif keep_factors:
                if step < max_iters - 1:
                    (leaving,) = done.nonzero(as_tuple=True)
                    kept.append((rows.index_select(0, leaving), L[leaving]))
                else:
                    kept.append((rows, L))
        if n_done == n_rows or step == max_iters - 1:
            break
        n_rows -= n_done
        active = next_active
        if compacted:
            width = next_width
        if n_done > 0:
            if keep is None:
                (keep,) = (~done).nonzero(as_tuple=True)
            rows, active, most = (t.index_select(0, keep) for t in (rows, active, most))
            state = state.index_select(1, keep)
            U_hat, primal_weight, dual_weight = state.unbind()
            if step > 0:
                improved = improved.index_select(0, keep)
    X = s * Z_all
    if not keep_factors:
        return X, converged, final_active, None
    if L_all is not None:
        solve = face_solver(G, final_active, masked=True, factor=(L_all, s))
    else:
        solve = _kept_grouped_solver(kept, final_active, s, one_group=True)
    return X, converged, final_active, (solve, finished)


def _kept_grouped_solver(
    kept: list[tuple[Tensor, Tensor]], active: Tensor, s: Tensor, one_group: bool = False
) -> Callable[[Tensor], Tensor]:
    """The face solve of :func:`face_solver` from the factors that :func:`_pivoting` or the
    compacted :func:`_masked_pivoting` kept (``(rows, L)`` of the rows that left at each step,
    ``L`` the Cholesky factors of the Jacobi-scaled blocks on each row's free indices first, then
    padded by the identity): the factors of widths up to the same power of two (all of them, with
    ``one_group``) stacked, padded by the identity to the widest."""
    by_size: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for rows, L in kept:
        key = 0 if one_group else (L.shape[1] - 1).bit_length()
        by_size.setdefault(key, []).append((rows, L))
    free = ~active
    groups = []
    for entries in by_size.values():
        width = max(L.shape[1] for _, L in entries)
        group = torch.cat([rows for rows, _ in entries])
        if len(entries) == 1 and not one_group:
            L_all = entries[0][1]
        else:
            # With one_group, every row is kept once, each factor at its row's position (the
            # batched triangular solves round by position); else in the order kept.
            eye = torch.eye(width, dtype=s.dtype, device=s.device)
            L_all = eye.expand(len(group), width, width).clone()  # (twice as fast as repeat)
            start = 0
            for rows, L in entries:
                place = rows if one_group else slice(start, start + L.shape[0])
                L_all[place, : L.shape[1], : L.shape[1]] = L
                start += L.shape[0]
        # Each row's free indices first (:func:`free_first`), which its last active set gives
        # again; the padding (active indices) is masked out. With one_group: every row, in order.
        cols = free_first(active if one_group else active[group])[:, :width]
        rows = None if one_group else group.unsqueeze(1)
        mask = _at(free, rows, cols)
        groups.append((rows, cols, mask, (L_all, torch.where(mask, s[cols], 1.0))))
    return _grouped_solve(groups)


def _at(tensor: Tensor, rows: Tensor | None, cols: Tensor) -> Tensor:
    """``tensor[rows, cols]`` (``rows`` ``[g, 1]``, ``cols`` ``[g, w]``); None: every row, in
    order, by a gather (a few times cheaper than indexing)."""
    return tensor.gather(1, cols) if rows is None else tensor[rows, cols]


def upper_cholesky(K: Tensor) -> Tensor:
    """The lower Cholesky factors ``L`` of the batch ``K`` (``L Lᵀ = K``, from its upper triangle;
    failures ignored, as by ``cholesky_ex``), as the transpose of the upper factor: on one CPU
    thread, ``cholesky_ex(K, upper=True)`` takes about 15% less time than the lower factor."""
    return torch.linalg.cholesky_ex(K, upper=True)[0].mT


def free_first(active: Tensor) -> Tensor:
    """Each row's indices (``[k, m]``), its free ones (``¬active``) first, both parts in increasing
    order: the stable argsort of ``active``, from a cumulative sum (a few times cheaper)."""
    free = ~active
    free_before = free.cumsum(dim=1)  # free indices up to and including j
    positions = torch.arange(active.shape[1], device=active.device)
    # A free j goes to free_before_j − 1; an active j after every free index, to
    # n_free + (j − free_before_j).
    target = torch.where(free, free_before - 1, free_before[:, -1:] + positions - free_before)
    return torch.empty_like(target).scatter_(1, target, positions.expand_as(target))


def exchange(
    active: Tensor, infeasible: Tensor, count: Tensor, best: Tensor, tries: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One exchange of Júdice & Pires: every infeasible index changes side while the number of
    infeasible indices (``count``, per row) keeps falling below its ``best``; after
    :data:`_FULL_EXCHANGES` steps without progress (``tries`` below zero), only the largest.
    Returns the new active sets, ``best`` and ``tries``."""
    positions = torch.arange(active.shape[1], device=active.device)
    tries = torch.where(count < best, _FULL_EXCHANGES, tries - 1)
    best = torch.minimum(count, best)
    # Masks rather than torch.where, which is slow on large boolean operands.
    largest = (infeasible * (positions + 1)).amax(dim=1, keepdim=True) - 1
    single = (tries < 0).unsqueeze(1)
    flips = (single & (positions == largest)) | (~single & infeasible)
    return active ^ flips, best, tries


def refine(
    G_exact: Tensor,
    G: Tensor,
    U: Tensor,
    V: Tensor,
    active: Tensor,
    tol: float,
    masked: bool,
    solve: Callable[[Tensor], Tensor] | None = None,
    rounded: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Iterated refinement of each row's face solution towards ``G_exact`` (iterated Tikhonov
    regularisation), :math:`v_F \leftarrow v_F - G_{FF}^{-1} (G_{\text{exact}} v)_F`, for at most
    :data:`_REFINEMENTS` steps: it stops once every step is below :data:`_SETTLED` ``max|v|`` and
    every row meets ``tol`` on ``G_exact`` (on nearly singular faces the refinement moves on after
    the tolerance is met: towards the least-norm weights). Returns the rows (``v ≥ u``), refined
    where that meets ``tol`` or lowers their KKT residual for ``G_exact``, and that residual. (A
    finite ``G_exact``: the residuals are those of feasible rows.) ``masked``: whether the faces
    are solved as masked full-size systems (see :func:`face_solver`); ``solve``: their solve
    when already factorised (by :func:`_masked_pivoting`).

    ``rounded``: ``G_exact`` holds the values of a float32 Gramian, whose rounding (about
    ``10⁻⁷ max_j G_jj``, of either sign) is far below the float32 Tikhonov term: along its
    numerical null space the steps neither shrink nor lead to the least-norm weights (they drift
    by about the rounding over the Tikhonov term per step, diverging where the rounding made
    ``G_exact`` indefinite). Each row then keeps, of its face solution and its refined iterates,
    the one of least KKT residual (the earliest among equals), and the refinement stops once every
    row meets ``tol`` or no row short of it has improved."""
    if solve is None:
        solve = face_solver(G, active, masked=masked)
    V = torch.maximum(V, U)
    gradient_V = gradient = V @ G_exact
    scales = kkt_scales(G_exact, U)  # (for every residual below)
    if rounded:
        return _refine_rounded(G_exact, U, V, gradient_V, tol, solve, scales)
    refined = V
    after = None
    for _ in range(_REFINEMENTS):
        step = solve(gradient)  # (the solve keeps the free indices of its right-hand side)
        refined = refined - step
        # (∞-norms as amax of abs: a few times cheaper than vector_norm on small rows)
        settled = step.abs().amax(dim=1) <= _SETTLED * refined.abs().amax(dim=1)
        # The residuals only once every row has settled (a few operations fewer per step). On
        # the clamped rows: a tiny clamp can move the gradient of a tiny row by much, relatively.
        if bool(settled.all()):
            clamped = torch.maximum(refined, U)
            after = feasible_kkt_residual(G_exact, U, clamped, clamped @ G_exact, scales)
            if bool((after <= tol).all()):
                return clamped, after
            after = None
        gradient = refined @ G_exact  # (for the next step)
    refined = torch.maximum(refined, U)
    if after is None:
        after = feasible_kkt_residual(G_exact, U, refined, refined @ G_exact, scales)
    before = feasible_kkt_residual(G_exact, U, V, gradient_V, scales)
    better = (after <= tol) | (after <= before)
    return torch.where(better.unsqueeze(1), refined, V), torch.where(better, after, before)


def _refine_rounded(
    G_exact: Tensor,
    U: Tensor,
    V: Tensor,
    gradient: Tensor,
    tol: float,
    solve: Callable[[Tensor], Tensor],
    scales: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """:func:`refine` with ``rounded``, from the clamped face solutions ``V`` and their gradient
    ``V G_exact``: each row's iterate of least KKT residual, and that residual (``scales``:
    :func:`~torchjd.linalg._kkt.kkt_scales` ``(G_exact, U)``)."""
    best = V
    best_residual = feasible_kkt_residual(G_exact, U, V, gradient, scales)
    refined = V
    for _ in range(_REFINEMENTS):
        refined = refined - solve(gradient)
        # On the clamped rows: a tiny clamp can move the gradient of a tiny row by much.
        clamped = torch.maximum(refined, U)
        residual = feasible_kkt_residual(G_exact, U, clamped, clamped @ G_exact, scales)
        improved = residual < best_residual
        best = torch.where(improved.unsqueeze(1), clamped, best)
        best_residual = torch.where(improved, residual, best_residual)
        # On, while some row short of tol has improved (to a residual that is not NaN, which
        # the comparison with tol then tells; 0 for the other rows).
        if not bool(torch.where(improved, residual, 0.0).amax() > tol):
            break
        gradient = refined @ G_exact  # (for the next step)
    return best, best_residual


def solve_on_faces(
    G: Tensor,
    U: Tensor,
    active: Tensor,
    inverse: "_LazyInverse | None" = None,
    bordered: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """For each row, ``v_A = u_A`` and ``G_FF v_F = −G_FA u_A`` on its free set ``F = ¬A``.

    With ``inverse`` (of a well-conditioned ``G``), rows with fewer active than free indices are
    solved through ``G⁻¹`` (:func:`_face_solve_by_inverse`): ``|A|³`` work instead of ``|F|³``.
    ``bordered``: :func:`bordered_scaled` ``(G)``, when computed once for many calls."""
    V_A = torch.where(active, U, 0.0)
    rhs = -(V_A @ G)
    if inverse is None:
        return V_A + face_solver(G, active, bordered)(rhs)
    n_active = active.sum(dim=1)
    by_inverse = (4 * n_active <= active.shape[1]) & (n_active <= _INVERSE_MAX_ACTIVE)
    scaled_inverse = inverse.value if bool(by_inverse.any()) else None
    if scaled_inverse is None:
        return V_A + face_solver(G, active, bordered)(rhs)
    if bool(by_inverse.all()):
        return V_A + _face_solve_by_inverse(scaled_inverse, active, rhs)
    X = face_solver(G, active, bordered)(rhs)
    rows = by_inverse.nonzero().squeeze(1)
    X[rows] = _face_solve_by_inverse(scaled_inverse, active[rows], rhs[rows])
    return V_A + X


class _LazyInverse:
    """``(s, H)`` with ``H = (S G S)⁻¹``, ``S = diag(G)^{-1/2}``, computed on first use; None when
    ``G`` is too ill-conditioned for it to be accurate (a pivot of the scaled Cholesky factor
    below :data:`_INVERSE_MIN_PIVOT`)."""

    def __init__(self, G: Tensor) -> None:
        self.G = G

    @cached_property
    def value(self) -> tuple[Tensor, Tensor] | None:
        return scaled_inverse(self.G, _INVERSE_MIN_PIVOT[self.G.dtype])


def scaled_cholesky(G: Tensor, min_pivot: float) -> tuple[Tensor, Tensor] | None:
    """``(s, L)`` with ``L Lᵀ = S G S``, ``S = diag(G)^{-1/2}`` (``s_j = 1`` where ``G_jj ≤ 0``);
    None when the factorisation fails or a squared pivot of ``L`` is below ``min_pivot`` (which
    bounds the smallest eigenvalue of ``S G S`` from above: zero and near-duplicate rows fail)."""
    s, G_hat = jacobi_scaled(G)
    L, info = torch.linalg.cholesky_ex(G_hat)
    # (the pivots only when the factorisation succeeded)
    if int(info) != 0 or not bool(L.diagonal().amin() ** 2 >= min_pivot):
        return None
    return s, L


def scaled_inverse(G: Tensor, min_pivot: float) -> tuple[Tensor, Tensor] | None:
    """``(s, H)`` with ``H = (S G S)⁻¹`` (contiguous), from :func:`scaled_cholesky`; None when it
    is None (``G`` too ill-conditioned for ``H`` to be accurate in its dtype)."""
    factor = scaled_cholesky(G, min_pivot)
    if factor is None:
        return None
    s, L = factor
    return s, torch.cholesky_inverse(L).contiguous()


def _face_solve_by_inverse(
    scaled_inverse: tuple[Tensor, Tensor], active: Tensor, rhs: Tensor
) -> Tensor:
    r"""``x`` with ``x_A = 0`` and ``G_FF x_F = rhs_F``, through ``H = G⁻¹``: ``x = H(r + E_A λ)``
    with the multipliers ``λ`` of the constraints ``x_A = 0``, ``H_AA λ = −(H r)_A`` (a Schur
    complement of ``|A| × |A|`` per row; in the Jacobi-scaled variables)."""
    s, H = scaled_inverse
    free = ~active
    y = (s * torch.where(free, rhs, 0.0)) @ H
    width = int(active.sum(dim=1).amax())
    if width > 0:
        # Each row's active indices first (:func:`free_first` of ``free``), padded with free ones.
        idx = free_first(free)[:, :width]
        mask = active.gather(1, idx)
        pair = mask.unsqueeze(2) & mask.unsqueeze(1)
        eye = torch.eye(width, dtype=H.dtype, device=H.device)
        H_AA = torch.where(pair, H[idx.unsqueeze(2), idx.unsqueeze(1)], eye)
        b = torch.where(mask, y.gather(1, idx), 0.0)
        L, _ = torch.linalg.cholesky_ex(H_AA)
        lam = -cholesky_solve(L, b)
        y = y + torch.zeros_like(y).scatter(1, idx, torch.where(mask, lam, 0.0)) @ H
    return torch.where(free, s * y, 0.0)


def face_solver(
    G: Tensor,
    active: Tensor,
    bordered: tuple[Tensor, Tensor] | None = None,
    masked: bool | None = None,
    factor: tuple[Tensor, Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """The solve of ``x`` with ``x_A = 0`` and ``G_FF x_F = rhs_F``, for each row and its free set
    ``F = ¬A``, for several right-hand sides on the same faces: the faces are factorised once,
    as masked full-size systems (by default up to :data:`_MASKED_MAX_M`) or compacted from
    ``bordered`` (:func:`bordered_scaled` ``(G)``, computed here when not given). ``factor``:
    the factors of the masked systems when already computed (the Cholesky factors ``L`` of the
    Jacobi-scaled systems and the scaling ``s = diag(G)^{-1/2}``, which may differ from the
    systems' own on the active indices, where the right-hand side and the solution are zero)."""
    free = ~active
    if G.shape[0] <= _MASKED_MAX_M if masked is None else masked:
        if factor is None:
            eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            factor = _spd_factor(torch.where(free.unsqueeze(2) & free.unsqueeze(1), G, eye))
        return lambda rhs: torch.where(free, _spd_solve(factor, torch.where(free, rhs, 0.0)), 0.0)
    return _grouped_solve(
        _compacted_factors(active, bordered_scaled(G) if bordered is None else bordered)
    )


def _grouped_solve(
    groups: list[tuple[Tensor | None, Tensor, Tensor, tuple[Tensor, Tensor]]],
) -> Callable[[Tensor], Tensor]:
    """The solve of :func:`face_solver` from the factors of its groups of compacted faces
    (:func:`_compacted_factors`; a group None: every row, in order, whose entries are then
    gathered and scattered, a few times cheaper than indexed)."""

    def solve(rhs: Tensor) -> Tensor:
        x = torch.zeros_like(rhs)
        for group, cols, mask, factor in groups:
            b = torch.where(mask, _at(rhs, group, cols), 0.0)
            solution = torch.where(mask, _spd_solve(factor, b), 0.0)
            if group is None:
                x.scatter_(1, cols, solution)
            else:
                x[group, cols] = solution
        return x

    return solve


def _spd_factor(K: Tensor) -> tuple[Tensor, Tensor]:
    """Batched Cholesky factor of ``K`` after a symmetric Jacobi scaling (unit diagonal) that makes
    rows of very different norms equally accurate, and the scaling."""
    diagonal = K.diagonal(dim1=1, dim2=2)
    scale = torch.where(diagonal > 0, diagonal.clamp_min(torch.finfo(K.dtype).tiny).rsqrt(), 1.0)
    return _tracked_factor(upper_cholesky, scale.unsqueeze(2) * K * scale.unsqueeze(1)), scale


def _tracked_factor(factorise: Callable[[Tensor], Tensor], K: Tensor) -> Tensor:
    """``factorise(K)``: the Cholesky factors of the batch ``K`` (``[k, n, n]``). Under autograd,
    the same values, but the blocks whose factor fails (a zero pivot) are factorised as the
    identity in the graph: the backward of their factor and solves is NaN, even where their rows
    are discarded (a zero gradient)."""
    if not tracked(K):
        return factorise(K)
    L = factorise(K.detach())
    ok = _factored(L).view(-1, 1, 1)
    eye = torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return torch.where(ok, factorise(torch.where(ok, K, eye)), L)


def _factored(L: Tensor) -> Tensor:
    """Which of the Cholesky factors ``L`` (``[k, n, n]``) have every pivot positive."""
    return (L.diagonal(dim1=1, dim2=2) > 0).all(dim=1)


def _spd_solve(factor: tuple[Tensor, Tensor], b: Tensor) -> Tensor:
    L, scale = factor
    if not tracked(L):
        return scale * cholesky_solve(L, scale * b)
    # (as _spd_factor: the failed faces' solves, out of the graph)
    ok = _factored(L).unsqueeze(1)
    eye = torch.eye(L.shape[1], dtype=L.dtype, device=L.device)
    solved = scale * cholesky_solve(torch.where(ok.unsqueeze(2), L, eye), scale * b)
    return torch.where(ok, solved, (scale * cholesky_solve(L, scale * b)).detach())


def bordered_scaled(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, B)``: the Jacobi scaling ``s = diag(G)^{-1/2}`` (``1`` where ``G_jj ≤ 0``) and
    ``B = diag(S G S, I)``, from which :func:`_compacted_factors` gathers its blocks."""
    s, G_hat = jacobi_scaled(G)
    return s, _bordered(G_hat)


def jacobi_scaled(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, S G S)``: the Jacobi scaling ``s = diag(G)^{-1/2}`` (``1`` where ``G_jj ≤ 0``) and
    the scaled ``G``."""
    diagonal = G.diagonal()
    s = torch.where(diagonal > 0, diagonal.clamp_min(torch.finfo(G.dtype).tiny).rsqrt(), 1.0)
    return s, s.unsqueeze(1) * G * s.unsqueeze(0)


def _bordered(G_hat: Tensor) -> Tensor:
    """``diag(Ĝ, I)``: indices ``m`` and beyond pad gathered blocks with the identity."""
    eye = torch.eye(G_hat.shape[0], dtype=G_hat.dtype, device=G_hat.device)
    return torch.block_diag(G_hat, eye)


def _compacted_factors(
    active: Tensor, bordered: tuple[Tensor, Tensor]
) -> list[tuple[Tensor | None, Tensor, Tensor, tuple[Tensor, Tensor]]]:
    """Rows grouped by the size of their free set (up to the next power of two; one group up to
    :data:`_ONE_GROUP_MAX_M`, where the few operations of each group cost more than the padding);
    each group factorises its compacted ``|F| × |F|`` blocks in one batch.

    The Jacobi scaling of a block is the restriction of that of ``G``, so the blocks are gathered
    from the scaled ``G``, bordered by an identity that pads each block (one ``take`` from
    ``bordered``, :func:`bordered_scaled` ``(G)``)."""
    s, scaled = bordered
    free = ~active
    sizes = free.sum(dim=1)
    m = active.shape[1]
    one_group = m <= _ONE_GROUP_MAX_M
    order = None if one_group else torch.argsort(sizes)
    # Each row's free columns first, in increasing order (:func:`free_first`).
    columns = free_first(active)
    padding = torch.arange(m, 2 * m, device=active.device)
    if one_group:
        width = int(sizes.amax())
        if width == 0:
            return []
        return [_compacted_group(None, columns[:, :width], free, padding, s, scaled)]
    sorted_sizes = sizes[order].tolist()
    groups = []
    start = 0
    while start < len(sorted_sizes):
        if sorted_sizes[start] == 0:
            start += 1
            continue
        width = 1 << (sorted_sizes[start] - 1).bit_length()
        stop = start
        while stop < len(sorted_sizes) and sorted_sizes[stop] <= width:
            stop += 1
        group = order[start:stop].unsqueeze(1)
        cols = columns[group.squeeze(1), : sorted_sizes[stop - 1]]
        groups.append(_compacted_group(group, cols, free, padding, s, scaled))
        start = stop
    return groups


def _compacted_group(
    group: Tensor | None, cols: Tensor, free: Tensor, padding: Tensor, s: Tensor, scaled: Tensor
) -> tuple[Tensor | None, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """The Cholesky factors of the compacted blocks of the rows ``group`` (``[g, 1]``; None: every
    row, in order), whose free columns come first in ``cols`` (``[g, width]``), padded by the
    identity."""
    mask = _at(free, group, cols)  # False on the padding
    index = torch.where(mask, cols, padding[: cols.shape[1]])
    L = _tracked_factor(_lower_cholesky, compacted_blocks(scaled, index))
    return group, cols, mask, (L, torch.where(mask, s[cols], 1.0))


def _lower_cholesky(K: Tensor) -> Tensor:
    """The lower Cholesky factors of the batch ``K`` (failures ignored, as by ``cholesky_ex``)."""
    return torch.linalg.cholesky_ex(K)[0]


def compacted_blocks(bordered: Tensor, index: Tensor) -> Tensor:
    """The blocks ``B[index_i, index_i]`` (``[g, width, width]``) of ``B`` = ``bordered`` for the
    rows ``index_i`` of ``index`` (``[g, width]``): with ``B`` from :func:`bordered_scaled`, indices
    ``m`` and beyond pad the blocks with the identity. When ``B`` is at most four times as wide as
    the blocks, the rows ``B[index_i]``, then their entries (a third faster than one ``take``
    with ``[g, width, width]`` flat indices), on the CPU for a few blocks at a time (at most
    :data:`_GATHER_ENTRIES` entries of rows: on one CPU thread, 256 blocks of 140 from a ``B`` of
    512 took 124 ms at once, 45 ms this way); else one ``take``."""
    g, width = index.shape
    n = bordered.shape[0]
    by_rows = n <= 4 * width
    # On the CPU, its intermediate (the rows, or the flat indices) of a few blocks at a time: a
    # larger one is a fresh allocation each time, whose first touch of every page costs more than
    # the gather.
    chunk = max(1, _GATHER_ENTRIES // (width * (n if by_rows else width)))
    # (Into a buffer only when untracked: an ``out=`` does not record the operation's gradient.)
    if chunk >= g or bordered.device.type != "cpu" or tracked(bordered):
        return _gathered(bordered, index, by_rows)
    blocks = torch.empty(g, width, width, dtype=bordered.dtype, device=bordered.device)
    for start in range(0, g, chunk):
        _gathered(bordered, index[start : start + chunk], by_rows, blocks[start : start + chunk])
    return blocks


def _gathered(bordered: Tensor, index: Tensor, by_rows: bool, out: Tensor | None = None) -> Tensor:
    """The blocks of :func:`compacted_blocks` (into ``out`` when given): through the rows
    ``B[index_i]`` with ``by_rows``, else by one ``take``."""
    g, width = index.shape
    n = bordered.shape[0]
    if by_rows:
        rows = bordered.index_select(0, index.reshape(-1)).view(g, width, n)
        return torch.gather(rows, 2, index.unsqueeze(1).expand(g, width, width), out=out)
    return torch.take(bordered, index.unsqueeze(2) * n + index.unsqueeze(1), out=out)

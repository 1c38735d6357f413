r"""Exact mode on a singular ``G``: the update in the range of ``G``, then the least-norm weights.

With the factor ``ℓ ℓᵀ = W^{-1/2} G W^{-1/2}`` of :func:`~torchjd.linalg._spanning.range_factor`
(``ℓ``: ``m × r``, ``r = rank(G)``, unit rows; ``W``: the weights of
:func:`~torchjd.linalg._bounded_qp.tikhonov`), write ``G = L Lᵀ`` with ``L = √W ℓ``. The
update ``d = Jᵀv`` of a row ``u`` is unique; in the coordinates ``y = Lᵀv`` of the range it is the
projection

.. math::

    y^\star = \operatorname*{argmin}_{\ell y \ge 0} \tfrac12 \|y - a\|^2,
    \qquad a = L^\top u = \ell^\top b, \; b = \sqrt W \odot u,

of ``Lᵀu`` onto the dual cone (``r`` variables, ``m`` constraints, strongly convex). It is solved
by the dual active-set method of Goldfarb and Idnani (1983), batched over the rows: from the
unconstrained ``y = a``, each step adds the most violated constraint, dropping active ones whose
multipliers would turn negative; the active normals stay linearly independent (a constraint whose
normal is in their span only moves the multipliers). Each row keeps ``ℓ_Aᵀ = Q_1 R`` (``Q_1``:
``r × |A|`` orthonormal columns, ``R`` triangular): a constraint is added by two Gram-Schmidt
passes (``O(r |A|)``), and dropped by Givens rotations (``O((r + |A|) |A|)``, :func:`_downdate`).
The answer is refined once from the final active set (``y = (I − Q_1 Q_1ᵀ) a``). The
method takes about ``|A|`` steps of ``O(m r)`` each (the most violated constraint); a row that
needs more than ``r / 2 + 30`` steps (large active sets, many drops: at ``m = 1024``, rank 351,
over 500 steps with hundreds of drops, as slow as the interior point) is left to the caller, and
when there are more than ``2 ·`` :data:`_PROBE_ROWS` rows, that many, spread out, go first, the
others only when some probe row is accepted.

When no probe row is (or, up to ``2 ·`` :data:`_PROBE_ROWS` rows, for the rows left), the method
is warm-started (:func:`warm_start`; the probe rows first again): a dual method can start from any
active set with linearly independent normals and non-negative multipliers. ADMM in float32 on
the projection (its ``(I + ρ ℓᵀℓ)`` diagonal: two ``[k, m] × [m, r]`` products a step) guesses
the active set (its positive multipliers, at most ``r − 1``), which Lawson and Hanson's inner
loop makes dual feasible (moving the guessed multipliers towards those of the projection onto
the guessed face, the first that reaches zero leaving; one ``|A| × |A|`` Cholesky factor of
``ℓ_A ℓ_Aᵀ`` per round); the method then needs about as many steps as the guess has wrong indices
(at most ``r / 4 + 30``). On the hard Jacobian of seed 1 (#4) at ``m = 1024`` (float64, rank
226, optimal active sets of 221 to 225 indices, 450 to 520 cold steps with 210 to 300 drops), a
start of about 223 indices finds every row in at most 40 steps; the exact mode's call takes
about 11 s here (with drops by rotations and over-relaxed ADMM), where the interior point took
about 100 s. On degenerate float32 Gramians whose projections
are nearly zero (seed 0, #1, rank 351 in the scaled factor: guesses of more than ``r``
near-dependent indices), the start stays infeasible and the rows are left, as before (the probe's
warm start costs about 2 s there): 70% of them have a zero update with every constraint tight
(more tight indices than ``r``), which the method would reach only after about ``4 r`` steps.

The optimal weights are then the ``v ≥ u`` with ``Lᵀv = y*`` and ``v_j = u_j`` off the tight set
``T = {j : ℓ_j · y* ≈ 0}``; with ``z = √W ⊙ v``, the least-norm ones (least
:math:`\sum_j W_j v_j^2`, the exact mode's tie-break) solve

.. math::

    \min_z \tfrac12 \|z\|^2 \quad \text{s.t.} \quad \ell^\top z = y^\star, \;
    z_j = b_j \ (j \notin T), \; z_j \ge b_j \ (j \in T),

whose dual in ``λ ∈ ℝ^r`` is unconstrained and concave,
``q(λ) = Σ_{j ∈ T} (½ z_j − (ℓλ)_j) z_j + λ · y*`` with ``z_j = max(b_j, (ℓλ)_j)`` on ``T``,
``∇q = y* − ℓᵀz``: a semismooth Newton method with an exact line search (skipped when the
full step is its answer: the slope of ``q`` along the step still non-negative at its end, as it
is once the free set settles), ``r × r`` systems
``ℓ_Fᵀ ℓ_F`` on the free set ``F = {j ∈ T : (ℓλ)_j > b_j}`` (as in
:mod:`torchjd.linalg._spanning`, whose problem is that of ``y* = 0``), started from the
multipliers of the active-set method (``ℓ_A λ = z_A``: optimal at once when ``T = A``, the
optimum then unique). A row is accepted when its KKT residual meets the tolerance (see
:func:`range_projection_rows`); the others are left to the caller. Rows whose weights are
thousands of times their bounds (near positive spans) can miss the tolerance by the rounding of
``ℓᵀz`` alone, and are left too.

The same Newton method gives :func:`least_energy_rows`: the least-norm weights of rows already
optimal (the interior point's, which only approach those of least norm as its Tikhonov term
vanishes), from the update and tight set of each row.

On the hard Jacobians of ``benchmarks/non_conflict.py`` at ``m = 1024`` (a float32 Gramian of
rank 203 without positive span), the 657 rows that the unique-optimum route leaves take about 11 ms
each here (every row accepted; about 100 steps), against about 170 ms each for the interior point
of the general route.
"""

import torch
from torch import Tensor

from torchjd.linalg._kkt import feasible_kkt_residual, kkt_residual
from torchjd.linalg._low_rank import cholesky_solve
from torchjd.linalg._principal_pivoting import refine
from torchjd.linalg._probe import probe_first
from torchjd.linalg._spanning import _newton_factor

_STEPS = (0.5, 30)  # at most r / 2 + 30 steps of the active-set method (see range_projection_rows)
_DEPENDENT = 1e-9  # a normal within this relative distance of the active ones' span is in it
# Relative to ‖a‖ (the rows of ℓ have unit norm), whatever the dtype (the factor is in float64):
_VIOLATION = 1e-12  # a violated constraint of the active-set method
_TIGHT = 1e-10  # a tight constraint of the optimal update
_NEWTON_STEPS = 30
_ZERO_UPDATE_STEPS = 10  # of zero_update_rows
# least_energy_rows: a row stops when a step on an unchanged free set does not reduce its
# residual by this factor (the rounding of its Newton system).
_STALL = 0.5
# least_energy_rows: on the diagonal of the Newton systems of free sets of fewer than r indices
# (singular: unridged, the step along their null space, 1 / ridge longer than the rest, meets a
# breakpoint at once, and the row gains one index a step, as float32 Gramians' rows do for most
# of their 30 steps), from a row's first step shorter than _SHORT_STEP of the Newton step, while
# its free set changes. The rows of ℓ have unit norm.
_DEFICIENT_RIDGE = 1e-2
_SHORT_STEP = 1e-3
_NEWTON_TARGET = 1e-1  # of tol: the KKT residual (on the range of G) at which Newton stops
_PROBE_ROWS = 16
_SMALL_BATCH = 2**12  # entries of B in _least_norm: rows that stop leave it only in bulk
# Up to this many entries of the products of the columns of ℓ (m r²), the Newton systems of
# _least_norm are one product with them.
_SQUARES_ENTRIES = 2**15
_GROWTH = 16  # columns added to the state when an active set outgrows it
_CHUNK_ENTRIES = 2**24  # bounds the [k, r, |A|] state of a chunk of rows (128 MiB)
# The warm start (see warm_start): ADMM's iterations, penalty and over-relaxation, the rounds that
# make its guess dual feasible, and at most r / 4 + 30 steps of the active-set method from there.
# (m = 1024, rank 226: 400 over-relaxed iterations guess as well as 600 plain ones; fewer leave the
# active-set method more steps than they save, and the guess never settles for a whole chunk.)
_ADMM_ITERATIONS = 400
_ADMM_RHO = 200.0
_ADMM_RELAX = 1.8
_START_ROUNDS = 8
# A Cholesky pivot of ℓ_A ℓ_Aᵀ below which a guessed normal counts as in the span of those before
# it (the pivots of exactly dependent normals are the square root of the rounding, about 1e-8).
_START_DEPENDENT = 1e-6
_WARM_STEPS = (0.25, 30)
# A drop downdates the factors of its k rows (r × w) when k r w² is at least this many times the
# positions of its loop of rotations (each about as costly as that many entries of a QR), else
# forms them again.
_ROTATION_COST = 400_000


def range_projection_rows(
    G: Tensor,
    U: Tensor,
    tol: float,
    factor: tuple[Tensor, Tensor],
    dtype: torch.dtype,
    *,
    warm: bool = True,
) -> tuple[Tensor, Tensor]:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` of least :math:`\\sum_j W_j v_j^2` (``G``, ``U`` in float64;
    ``factor``: :func:`~torchjd.linalg._spanning.range_factor` of ``G``; ``dtype``: that of the
    caller's ``G``), and which rows are accepted: KKT residual at most ``tol`` on ``G`` itself in
    float64, and on its range ``L Lᵀ`` in float32 (as :mod:`torchjd.linalg._spanning` does: the
    rounding of a float32 ``G`` has no low rank, and its product with the large weights of small
    rows can exceed ``tol`` on ``G`` itself). The other rows are ``u`` or an approximation.
    ``warm``: whether the rows that the cold method leaves (all of the probe's) are tried again,
    warm-started (see the module docstring); without it, only the cold method runs."""
    ell, sqrt_weights = factor
    chunk = max(1, _CHUNK_ENTRIES // ell.shape[1] ** 2)
    on_G = G if dtype == torch.float64 else None

    def solve(rows: Tensor, warm_started: bool = False) -> tuple[Tensor, Tensor]:
        """The rows ``rows`` of ``U``, in chunks (``warm_started``: see :func:`warm_start`)."""
        solved = [
            _rows(on_G, ell, sqrt_weights, part, tol, warm_started) for part in rows.split(chunk)
        ]
        return torch.cat([X for X, _ in solved]), torch.cat([ok for _, ok in solved])

    k = U.shape[0]
    if k <= 2 * _PROBE_ROWS or not warm:
        X, found = solve(U)
        left = (~found).nonzero().squeeze(1)
        if left.numel() > 0 and warm:
            X[left], found[left] = solve(U[left], True)
        return X, found
    cold = True  # whether the cold method found some probe row

    def solve_probe(rows: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal cold
        X, found = solve(rows)
        cold = bool(found.any())
        # Found by none (large active sets): the probe again, warm-started.
        return (X, found) if cold else solve(rows, True)

    return probe_first(U, _PROBE_ROWS, solve_probe, lambda rows: solve(rows, not cold))


def _rows(
    G: Tensor | None, ell: Tensor, sqrt_weights: Tensor, U: Tensor, tol: float, warm: bool
) -> tuple[Tensor, Tensor]:
    """:func:`range_projection_rows` of one chunk of rows (checked on ``G`` unless None)."""
    B = U * sqrt_weights
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
    dual_scale = (sqrt_weights.amax() * u_scale).squeeze(1)
    a_norm = (B @ ell).norm(dim=1)
    if warm:
        r = ell.shape[1]
        start = warm_start(ell, B, _ADMM_ITERATIONS, _ADMM_RHO)
        steps = int(_WARM_STEPS[0] * r) + _WARM_STEPS[1]
        Y, lam, found = dual_active_set(ell, B, _VIOLATION * a_norm, steps, start)
    else:
        Y, lam, found = dual_active_set(ell, B, _VIOLATION * a_norm)
    X = U.clone()
    rows = found.nonzero().squeeze(1)
    if rows.numel() == 0:
        return X, found
    Y, lam, B, U_rows = Y[rows], lam[rows], B[rows], U[rows]
    slack = Y @ ell.T
    tight = slack <= _TIGHT * a_norm[rows].unsqueeze(1)
    Z, residual = _least_norm(
        ell, sqrt_weights, B, Y, tight, lam, tol * dual_scale[rows], u_scale[rows]
    )
    V = torch.maximum(U_rows, Z / sqrt_weights)
    if G is not None:
        residual = kkt_residual(G, U_rows, V, V @ G) / tol
    found[rows] = residual <= 1.0
    X[rows] = V
    return X, found


def dual_active_set(
    ell: Tensor,
    B: Tensor,
    eps: Tensor,
    max_steps: int | None = None,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Goldfarb and Idnani's method for ``y* = argmin_y ‖y − a‖ s.t. ℓ y ≥ 0`` for each row
    ``a = ℓᵀb`` (``b``: a row of ``B``), a constraint counting as violated below ``−eps`` (per
    row). Returns ``(Y, Λ, found)``: the projections (refined from the final active set ``A``),
    the multipliers ``λ`` with ``ℓ_A λ = b_A + μ_A`` (``μ_A``: those of the active constraints,
    ``y* − a = ℓ_Aᵀ μ_A``), and which rows finished.

    Each row keeps ``Q_1`` (``r × w``, orthonormal columns, zero beyond its ``q`` active
    constraints) and ``R`` (``w × w``, upper-triangular, identity beyond ``q``) with
    ``ℓ_Aᵀ = Q_1 R``; ``w`` grows with the largest active set. Finished rows are frozen, and
    leave the batch once they are half of it. With ``start`` (``slots``, ``q``: each row's first
    ``q`` active constraints, padded with ``m``: linearly independent normals and non-negative
    multipliers, see :func:`_dual_feasible_start`), the method starts from those active sets."""
    k = B.shape[0]
    m, r = ell.shape
    if max_steps is None:
        max_steps = int(_STEPS[0] * r) + _STEPS[1]
    padded = torch.cat([ell, torch.zeros_like(ell[:1])])
    padded_B = torch.cat([B, torch.zeros_like(B[:, :1])], dim=1)
    norms = padded.norm(dim=1)
    A = B @ ell
    dtype, device = B.dtype, B.device
    Y_out, lam_out = A.clone(), torch.zeros_like(A)
    found = torch.zeros(k, dtype=torch.bool, device=device)
    rows = torch.arange(k, device=device)
    if start is None:
        width = 0
        Y = A.clone()
        Q = torch.zeros(k, r, width, dtype=dtype, device=device)
        R = torch.zeros(k, width, width, dtype=dtype, device=device)
        slots = torch.zeros(k, width, dtype=torch.long, device=device)
        mu = torch.zeros(k, width, dtype=dtype, device=device)
        q = torch.zeros(k, dtype=torch.long, device=device)
    else:
        slots, q = start[0].clone(), start[1].clone()
        width = slots.shape[1]
        Q, R = _factor(padded, slots, q)
        Y, mu = _projection(A, Q, R)
        # (Non-negative, up to the rounding of the start's own multipliers.)
        mu = torch.where(torch.arange(width, device=device) < q.unsqueeze(1), mu, 0.0).clamp_min(0)
    pending = torch.full((k,), -1, dtype=torch.long, device=device)
    mu_pending = torch.zeros(k, dtype=dtype, device=device)
    live = torch.ones(k, dtype=torch.bool, device=device)
    success = torch.zeros(k, dtype=torch.bool, device=device)

    def leave(sel: Tensor) -> None:
        """Writes the outputs of the rows ``sel`` of the batch."""
        out = rows[sel]
        Y_out[out], lam_out[out] = _refined(
            A[out], padded_B[out], Q[sel], R[sel], slots[sel], q[sel]
        )
        found[out] = success[sel]

    for _ in range(max_steps):
        choose = (live & (pending < 0)).nonzero().squeeze(1)
        if choose.numel() > 0:
            worst, index = (Y[choose] @ ell.T).min(dim=1)
            done = worst >= -eps[rows[choose]]
            pending[choose] = torch.where(done, -1, index)
            success[choose] = done
            live[choose] = ~done
        if not bool(live.any()):
            break
        if int(q.amax()) >= width:
            Q, R, slots, mu, width = _grow(Q, R, slots, mu, m)
        index = torch.where(live, pending, m)
        n = padded[index]
        d1 = _transposed_product(Q, n)
        z = n - _product(Q, d1)
        again = _transposed_product(Q, z)  # a second Gram-Schmidt pass
        z = z - _product(Q, again)
        d1 = d1 + again
        rvec = torch.linalg.solve_triangular(R, d1.unsqueeze(2), upper=True).squeeze(2)
        zz = (z * z).sum(dim=1)
        independent = live & (zz > (_DEPENDENT * norms[index]) ** 2)
        full_step = torch.where(independent, -(n * Y).sum(dim=1) / zz, torch.inf)
        inside = torch.arange(width, device=device) < q.unsqueeze(1)
        ratios = torch.where(inside & (rvec > 0), mu / rvec, torch.inf)
        partial_step, drop = ratios.min(dim=1)
        t = torch.minimum(full_step, partial_step)
        # No step (rounding: a cone is never infeasible): the row fails.
        live &= t < torch.inf
        t = torch.where(live, t, 0.0)
        Y = Y + torch.where(independent & live, t, 0.0).unsqueeze(1) * z
        mu = torch.where(inside, mu - t.unsqueeze(1) * rvec, 0.0)
        mu_pending = mu_pending + t
        add = (live & (full_step <= t)).nonzero().squeeze(1)
        if add.numel() > 0:
            at = q[add]
            norm = zz[add].sqrt()
            Q[add, :, at] = z[add] / norm.unsqueeze(1)
            column = torch.where(inside[add], d1[add], 0.0)
            column[torch.arange(add.numel(), device=device), at] = norm
            R[add, :, at] = column
            slots[add, at] = pending[add]
            mu[add, at] = mu_pending[add]
            q[add] += 1
            pending[add] = -1
            mu_pending[add] = 0.0
        removed = (live & (full_step > t)).nonzero().squeeze(1)
        if removed.numel() > 0:
            slots[removed], mu[removed] = _remove(slots[removed], mu[removed], drop[removed], m)
            Q[removed], R[removed] = _drop(
                padded, Q[removed], R[removed], slots[removed], drop[removed], q[removed]
            )
            q[removed] -= 1
        frozen = ~live
        if 2 * int(frozen.sum()) >= live.numel():
            leave(frozen.nonzero().squeeze(1))
            keep = live.nonzero().squeeze(1)
            rows, Y, Q, R, slots, mu, q, pending, mu_pending, live, success = (
                x[keep] for x in (rows, Y, Q, R, slots, mu, q, pending, mu_pending, live, success)
            )
            if keep.numel() == 0:
                break
    success &= ~live  # out of steps: the rows left are not found
    leave(torch.arange(rows.numel(), device=device))
    return Y_out, lam_out, found


def warm_start(ell: Tensor, B: Tensor, iterations: int, rho: float) -> tuple[Tensor, Tensor]:
    """A start for :func:`dual_active_set`: the constraints that ``iterations`` steps of ADMM in
    float32 (:func:`_admm_multipliers`) find active (at most ``r − 1``, those of largest
    multipliers), made dual feasible by :func:`_dual_feasible_start`."""
    m, r = ell.shape
    multipliers = _admm_multipliers(ell, B, iterations, rho).to(B.dtype)
    q = (multipliers > 0.0).sum(dim=1).clamp_max(r - 1)
    width = max(1, int(q.amax()))
    order = multipliers.topk(width, dim=1)
    inside = torch.arange(width, device=B.device) < q.unsqueeze(1)
    slots = torch.where(inside, order.indices, m)
    guess = torch.where(inside, order.values, 0.0)
    return _dual_feasible_start(ell @ ell.T, B @ ell @ ell.T, slots, q, guess)


def _admm_multipliers(ell: Tensor, B: Tensor, iterations: int, rho: float) -> Tensor:
    """The multipliers ``μ = −ρ w ≥ 0`` (zero on the constraints it finds inactive; ``w``: the
    scaled dual) of ADMM on ``min ½ ‖y − a‖² s.t. ℓ y = s ≥ 0`` for each row ``a = ℓᵀ b``, in
    float32, from ``y = a``: ``y ← (I + ρ ℓᵀℓ)^{-1} (a + ρ ℓᵀ (s − w))``,
    ``c ← α ℓ y + (1 − α) s``, ``s ← max(0, c + w)``, ``w ← w + c − s`` (over-relaxed,
    ``α``: :data:`_ADMM_RELAX`; at its limit, ``ℓ y = s`` and ``y − a = ℓᵀ μ``). ``ℓᵀℓ`` is
    diagonal (``ℓ``: eigenvectors times the square roots of their eigenvalues); off-diagonal
    entries would only slow it (its iterate is a guess)."""
    ell32 = ell.float()
    A = B.float() @ ell32
    scale = 1.0 / (1.0 + rho * (ell32 * ell32).sum(dim=0))
    S = (A @ ell32.T).clamp_min(0.0)
    W = torch.zeros_like(S)
    for _ in range(iterations):
        C = ((A + rho * ((S - W) @ ell32)) * scale) @ ell32.T
        C = _ADMM_RELAX * C + (1.0 - _ADMM_RELAX) * S
        S = (C + W).clamp_min(0.0)
        W = W + C - S
    return -rho * W


def _dual_feasible_start(
    gram: Tensor, C: Tensor, slots: Tensor, q: Tensor, guess: Tensor
) -> tuple[Tensor, Tensor]:
    """The guessed active sets ``slots`` (each row's first ``q``, padded with ``m``) with their
    guessed multipliers ``guess`` (``≥ 0``) reduced to a start of :func:`dual_active_set`
    (``gram``: ``ℓ ℓᵀ``; ``C``: the rows ``ℓ a``), as Lawson and Hanson's inner loop does: while
    some multiplier ``μ_A = −(ℓ_A ℓ_Aᵀ)^{-1} ℓ_A a`` of the projection onto ``{ℓ_A y = 0}`` is
    negative, the guess moves towards ``μ_A`` until its first entry reaches zero (it stays
    ``≥ 0``), and that constraint leaves; a normal in the span of those before it (the first
    small pivot of the Cholesky factor of ``ℓ_A ℓ_Aᵀ``) leaves first. After
    :data:`_START_ROUNDS` rounds, the rows still not dual feasible start empty."""
    m = gram.shape[0]
    padded = torch.nn.functional.pad(gram, (0, 1, 0, 1))
    padded_C = torch.nn.functional.pad(C, (0, 1))
    width = slots.shape[1]
    position = torch.arange(width, device=slots.device)
    rows = torch.arange(slots.shape[0], device=slots.device)  # those not yet dual feasible
    for round_ in range(_START_ROUNDS + 1):
        if rows.numel() == 0:
            break
        if round_ == _START_ROUNDS:
            q[rows], slots[rows] = 0, m
            break
        S, k_q, g = slots[rows], q[rows], guess[rows]
        inside = position < k_q.unsqueeze(1)
        # (The padding's row and column of padded are zero: ones on its diagonal, in place, are
        # torch.where(block, M, I) at one pass less over M.)
        M = padded[S.unsqueeze(2), S.unsqueeze(1)]
        M.diagonal(dim1=1, dim2=2).masked_fill_(~inside, 1.0)
        L, info = torch.linalg.cholesky_ex(M)
        pivots = torch.where(inside, L.diagonal(dim1=1, dim2=2), 1.0)
        failed = (position >= info.unsqueeze(1) - 1) & (info > 0).unsqueeze(1)
        small = (pivots <= _START_DEPENDENT) | failed
        dependent = small & (position == small.to(torch.uint8).argmax(dim=1, keepdim=True))
        dependent &= small.any(dim=1, keepdim=True)
        rhs = torch.where(inside, -padded_C[rows].gather(1, S), 0.0)
        mu = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
        negative = inside & (mu < 0.0) & ~small.any(dim=1, keepdim=True)
        ratio = torch.where(negative, g / (g - mu), torch.inf)
        t = ratio.amin(dim=1, keepdim=True)
        moved = inside & (t < torch.inf)  # (mu is meaningless on the rows with a small pivot)
        g = torch.where(moved, g + torch.where(moved, t, 0.0) * (mu - g), g)
        keep = inside & ~dependent & ~(negative & (ratio <= t))
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
        k_q = keep.sum(dim=1)
        inside = position < k_q.unsqueeze(1)
        slots[rows] = torch.where(inside, S.gather(1, order), m)
        guess[rows] = torch.where(inside, g.gather(1, order), 0.0)
        q[rows] = k_q
        rows = rows[(dependent | negative).any(dim=1)]
    return slots, q


def _grow(
    Q: Tensor, R: Tensor, slots: Tensor, mu: Tensor, m: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """The state with room for :data:`_GROWTH` more active constraints (at most ``r``)."""
    k, r, width = Q.shape
    new = min(r, width + _GROWTH)
    extra = new - width
    Q = torch.cat([Q, Q.new_zeros(k, r, extra)], dim=2)
    grown = torch.eye(new, dtype=R.dtype, device=R.device).repeat(k, 1, 1)
    grown[:, :width, :width] = R
    slots = torch.cat([slots, slots.new_full((k, extra), m)], dim=1)
    mu = torch.cat([mu, mu.new_zeros(k, extra)], dim=1)
    return Q, grown, slots, mu, new


def _refined(
    A: Tensor, padded_B: Tensor, Q: Tensor, R: Tensor, slots: Tensor, q: Tensor
) -> tuple[Tensor, Tensor]:
    """The projection ``y = (I − Q_1 Q_1ᵀ) a`` of each row and the multipliers
    ``λ = Q_1 R^{-T} (b_A + μ_A)``, ``μ_A = R^{-1} Q_1ᵀ (y − a)`` (clamped at 0)."""
    Y, mu = _projection(A, Q, R)
    inside = torch.arange(Q.shape[2], device=Q.device) < q.unsqueeze(1)
    z_active = torch.where(inside, padded_B.gather(1, slots) + mu.clamp_min(0), 0.0)
    w = torch.linalg.solve_triangular(R.mT, z_active.unsqueeze(2), upper=False)
    return Y, _product(Q, w.squeeze(2))


def _projection(A: Tensor, Q: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """The projection ``y = (I − Q_1 Q_1ᵀ) a`` of each row (two Gram-Schmidt passes) and the
    multipliers ``μ_A = R^{-1} Q_1ᵀ (y − a)`` of its active constraints (zero columns of ``Q_1``
    beyond them: zero multipliers there)."""
    first = _transposed_product(Q, A)
    Y = A - _product(Q, first)
    second = _transposed_product(Q, Y)
    Y = Y - _product(Q, second)
    mu = torch.linalg.solve_triangular(R, -(first + second).unsqueeze(2), upper=True).squeeze(2)
    return Y, mu


def _product(Q: Tensor, x: Tensor) -> Tensor:
    """``Q x`` for each row (``Q``: ``[k, r, w]``, ``x``: ``[k, w]``), as the row vector ``xᵀ Qᵀ``:
    on one CPU thread, at ``k = 221``, ``r = 275``, ``w = 267`` (float64), about 9 ms against 15
    ms for the batched ``Q @ x``."""
    return (x.unsqueeze(1) @ Q.mT).squeeze(1)


def _transposed_product(Q: Tensor, x: Tensor) -> Tensor:
    """``Qᵀ x`` for each row (``Q``: ``[k, r, w]``, ``x``: ``[k, r]``), as the row vector
    ``xᵀ Q``, which reads ``Q`` in its own order: on one CPU thread, at ``k = 221``, ``r = 275``,
    ``w = 267`` (float64), about 5 to 10 ms against 33 ms for the batched ``Qᵀ @ x``."""
    return (x.unsqueeze(1) @ Q).squeeze(1)


def _without(drop: Tensor, width: int) -> Tensor:
    """For each row, the positions ``0, …, width − 1`` once the one at ``drop`` is removed: the
    position each entry comes from (the later ones moved up by one, the last repeated)."""
    position = torch.arange(width, device=drop.device)
    return torch.where(position < drop.unsqueeze(1), position, position + 1).clamp_max(width - 1)


def _remove(slots: Tensor, mu: Tensor, drop: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The active constraints and multipliers without position ``drop`` (the later ones moved
    up by one)."""
    width = slots.shape[1]
    source = _without(drop, width)
    last = torch.arange(width, device=slots.device) == width - 1
    slots = torch.where(last, m, slots.gather(1, source))
    mu = torch.where(last, 0.0, mu.gather(1, source))
    return slots, mu


def _drop(
    padded: Tensor, Q: Tensor, R: Tensor, slots: Tensor, drop: Tensor, q: Tensor
) -> tuple[Tensor, Tensor]:
    """The factors of each row's ``q`` active normals without the one at position ``drop``
    (``slots``: the remaining ones): downdated (:func:`_downdate`) or, when its loop over the
    positions ``drop, …, q − 2`` of the rows would cost more (few rows, narrow factors), formed
    again (:func:`_factor`)."""
    k, r, width = Q.shape
    first, last = torch.stack([drop.min(), q.max() - 2]).tolist()
    if k * r * width**2 < _ROTATION_COST * (last - first + 1):
        return _factor(padded, slots, q - 1)
    return _downdate(Q, R, drop, q, (first, last))


def _downdate(
    Q: Tensor, R: Tensor, drop: Tensor, q: Tensor, span: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The factors ``ℓ_Aᵀ = Q_1 R`` of each row's ``q`` active normals without the one at position
    ``drop`` (Goldfarb and Idnani's downdate): without its column, ``R`` is upper Hessenberg from
    column ``drop`` on; Givens rotations of rows ``j`` and ``j + 1`` of ``R`` (and of columns ``j``
    and ``j + 1`` of ``Q_1``) zero its subdiagonal for ``j = drop, …, q − 2``, the rotated last
    column of ``Q_1`` then leaving (``O((r + |A|) |A|)`` a row, against ``O(r |A|²)`` for a new
    factorisation; ``span``: the least ``drop`` and the largest ``q − 2``)."""
    k, width = drop.shape[0], R.shape[2]
    position = torch.arange(width, device=R.device)
    source = _without(drop, width)
    R = R.gather(2, source.unsqueeze(1).expand(k, width, width))
    first, last = span
    steps = torch.arange(first, last + 1, device=R.device)
    rotated = (steps >= drop.unsqueeze(1)) & (steps <= (q - 2).unsqueeze(1))
    for i, j in enumerate(range(first, last + 1)):
        a, b = R[:, j, j], R[:, j + 1, j]
        norm = torch.hypot(a, b)
        on = rotated[:, i] & (norm > 0)
        c = torch.where(on, a / norm, 1.0)
        s = torch.where(on, b / norm, 0.0)
        rotation = torch.stack([c, s, -s, c], dim=1).view(k, 2, 2)
        R[:, j : j + 2, j:] = rotation @ R[:, j : j + 2, j:]
        Q[:, :, j : j + 2] = Q[:, :, j : j + 2] @ rotation.mT
    R.diagonal(offset=-1, dim1=1, dim2=2).zero_()  # (the zeroed subdiagonal, but for rounding)
    Q[torch.arange(k, device=Q.device), :, q - 1] = 0.0
    inside = position < (q - 1).unsqueeze(1)
    block = inside.unsqueeze(2) & inside.unsqueeze(1)
    eye = torch.eye(width, dtype=R.dtype, device=R.device)
    return Q, torch.where(block, R, eye)


def _factor(padded: Tensor, slots: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``Q_1`` (zero beyond ``q``) and ``R`` (identity beyond ``q``) of the active normals
    ``ℓ_Aᵀ`` (zero columns beyond ``q``)."""
    width = slots.shape[1]
    Q, R = torch.linalg.qr(padded[slots].mT)  # [k, r, w], [k, w, w]
    inside = torch.arange(width, device=slots.device) < q.unsqueeze(1)
    block = inside.unsqueeze(2) & inside.unsqueeze(1)
    # (In place, on the fresh factors: on one CPU thread, about 0.1 s less than two torch.where on
    # the [221, 275, 251] start of a call at m = 512.)
    Q.masked_fill_(~inside.unsqueeze(1), 0.0)
    R.masked_fill_(~block, 0.0).diagonal(dim1=1, dim2=2).masked_fill_(~inside, 1.0)
    return Q, R


def _least_norm(
    ell: Tensor,
    sqrt_weights: Tensor,
    B: Tensor,
    Y: Tensor,
    tight: Tensor,
    lam: Tensor,
    target: Tensor,
    u_scale: Tensor,
    stall: float | None = None,
    squares: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The least-norm ``z`` of each row (see the module docstring) by semismooth Newton from
    ``λ = lam``, and its KKT residual on the range of ``G`` relative to ``target`` (the
    tolerance times ``√W_max max|u|``); rows that do not reach :data:`_NEWTON_TARGET` keep their
    last iterate. With ``stall`` (:func:`least_energy_rows`), a row also stops when a step on
    an unchanged free set does not reduce its residual by that factor, the systems of free sets
    of fewer than ``r`` indices get :data:`_DEFICIENT_RIDGE` on their diagonal (see there), and
    each row keeps its iterate of least residual (and returns that residual). ``squares``:
    :func:`_squares` of ``ℓ`` when the caller has them (else formed at the first step).

    Each step tries the full Newton step first, and runs the line search (for every row) only
    when it is not the answer for some row. In a batch of at most :data:`_SMALL_BATCH` entries
    (the exact mode's polish up to ``m = 64``, whose steps cost their few dozen operations, not
    their entries), the rows that stop stay in it, with a zero step, until they are half of it:
    two host reads a step (the rows that stop, and whether the full step was the answer), no
    copies."""
    # The batch's last iterates (with stall, those of least residual), last residuals and least
    # residuals, written back to the rows' own (out, residual, best) when some rows leave, and
    # at the end: no copy a step.
    last = B.clone()
    last_residual = torch.full_like(target, torch.inf)
    least = torch.full_like(target, torch.inf)
    out, residual, best = last, last_residual, least
    rows = None  # every row, until some leave (then their indices)
    previous = torch.zeros_like(tight)
    short = torch.zeros_like(target, dtype=torch.bool)
    r = ell.shape[1]
    scale = sqrt_weights * u_scale  # of the complementarity
    live = None  # the rows of the batch still stepping (None: all)
    settled = torch.zeros_like(target, dtype=torch.bool)
    searched = False  # whether some step took the line search (short rows: only then)
    C, Z, update, gradient = _evaluate(ell, B, Y, tight, lam)
    for iteration in range(_NEWTON_STEPS):
        # The KKT residual on the range of G, times √W_max max|u| (target: tol times it):
        # (G v)_j = √W_j ℓ_j · ℓᵀz, and v_j − u_j = (z_j − b_j) / √W_j.
        dual = update @ ell.T
        complementarity = dual.abs() * (Z - B) / scale
        relative = torch.maximum(-dual, complementarity).amax(dim=1) / target
        progress = ~(relative <= _NEWTON_TARGET)
        free = tight & (C > B)
        if stall is None:
            last = Z
        else:
            # A full step on an unchanged free set solves its system: a residual that does not
            # fall by the factor stall is that system's rounding.
            if iteration > 0:
                settled = (free == previous).all(dim=1)
                progress &= ~(settled & (relative > stall * last_residual))
            previous = free
            lower = relative < least
            last = torch.where(lower.unsqueeze(1), Z, last)
            least = torch.where(lower, relative, least)
        last_residual = relative
        if live is not None:
            progress &= live
        stepping = int(progress.sum())
        if stepping == 0:
            break
        # Rows that stop leave the batch; in a small batch (whose steps cost their operations,
        # not their entries), they stay, their multipliers fixed (every later value of theirs
        # the same), until they are half of it.
        live = progress if stepping < B.shape[0] else None
        if 2 * stepping <= B.shape[0] or (live is not None and B.numel() > _SMALL_BATCH):
            keep = progress.nonzero().squeeze(1)
            live = None
            rows = _write_back(rows, (out, residual, best), (last, last_residual, least))
            state = (rows, B, Y, tight, lam, C, Z, update, free, gradient, target, scale)
            rows, B, Y, tight, lam, C, Z, update, free, gradient, target, scale = (
                x[keep] for x in state
            )
            state = (previous, short, settled, last, last_residual, least)
            previous, short, settled, last, last_residual, least = (x[keep] for x in state)
        ridge = None
        if stall is not None and searched:
            ridged = (free.sum(dim=1) < r) & short & ~settled
            ridge = torch.where(ridged, _DEFICIENT_RIDGE, 0.0).to(ell.dtype)
        if iteration == 0 and squares is None:
            squares = _squares(ell)
        direction = cholesky_solve(
            _newton_factor(ell, free, ridge=ridge, squares=squares), gradient
        )
        if live is not None:
            direction = torch.where(live.unsqueeze(1), direction, 0.0)
        # The full step first: it maximises the dual along the direction (the line search's
        # answer) where the slope there is still non-negative (and at the start, an ascent).
        trial = lam + direction
        evaluated = _evaluate(ell, B, Y, tight, trial)
        slopes = (torch.stack([gradient, evaluated[3]]) * direction).sum(dim=2)
        full = (slopes >= 0.0).all(dim=0)
        if bool(full.all()):
            lam, (C, Z, update, gradient) = trial, evaluated
            continue
        step = _line_search(ell, B, tight, lam, C, slopes[0], direction)
        searched = True
        if stall is not None:
            taken = ((step - lam) * direction).sum(dim=1)  # α ‖Δλ‖²
            short |= ~full & (taken < _SHORT_STEP * (direction * direction).sum(dim=1))
        lam = torch.where(full.unsqueeze(1), trial, step)
        C, Z, update, gradient = _evaluate(ell, B, Y, tight, lam)
    if rows is None:  # (no row left before the end: the batch's own)
        out, residual, best = last, last_residual, least
    else:
        _write_back(rows, (out, residual, best), (last, last_residual, least))
    return out, (residual if stall is None else best)


def _evaluate(
    ell: Tensor, B: Tensor, Y: Tensor, tight: Tensor, lam: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At the multipliers ``lam`` of each row: ``C = ℓλ``, ``z = max(b, ℓλ)`` on ``T`` (``b``
    off it), its update ``ℓᵀz`` and the gradient ``y* − ℓᵀz`` of the dual."""
    C = lam @ ell.T
    Z = torch.where(tight, torch.maximum(B, C), B)
    update = Z @ ell
    return C, Z, update, Y - update


def _squares(ell: Tensor) -> Tensor | None:
    """``[ℓ_{ja} ℓ_{jb}]_{j, (a, b)}`` (``m × r²``) when its ``m r²`` entries are at most
    :data:`_SQUARES_ENTRIES` (the Newton systems of any free sets then one product, see
    :func:`~torchjd.linalg._spanning._newton_factor`), else None."""
    m, r = ell.shape
    if m * r * r > _SQUARES_ENTRIES:
        return None
    return (ell.unsqueeze(2) * ell.unsqueeze(1)).view(m, r * r)


def _write_back(
    rows: Tensor | None, targets: tuple[Tensor, ...], values: tuple[Tensor, ...]
) -> Tensor:
    """Writes each of ``values`` (the batch's) into its ``targets`` at ``rows`` (every row when
    None, then replaced by their indices), in place; returns ``rows``."""
    if rows is None:
        rows = torch.arange(values[0].shape[0], device=values[0].device)
    for target, value in zip(targets, values, strict=True):
        if target is not value:
            target[rows] = value
    return rows


def _line_search(
    ell: Tensor,
    B: Tensor,
    tight: Tensor,
    lam: Tensor,
    C: Tensor,
    slope: Tensor,
    direction: Tensor,
) -> Tensor:
    """``λ + α Δλ`` with ``α`` the maximiser of ``φ(α) = q(λ + α Δλ)`` on ``[0, 1]``, exactly
    (``slope``: ``φ'(0) = ∇q · Δλ``, as the caller has it).

    With ``g = ℓλ − b`` and ``e = ℓ Δλ`` (``e_j = 0`` off ``T``), ``φ`` is concave and piecewise
    quadratic: ``φ'(α) = φ'(0) − Σ_j (max(0, g_j + α e_j) − max(0, g_j)) e_j``, piecewise linear
    and non-increasing, its slope falling by ``e_j²`` where ``g_j + α e_j`` turns positive
    (``α = −g_j / e_j``) and rising by ``e_j²`` where it turns negative. Each row takes the root
    of ``φ'`` between its sorted breakpoints in ``(0, 1)``, or ``α = 1`` where ``φ'(1) ≥ 0``.
    A row with ``φ'(0) ≤ 0`` (no ascent, rounding) takes ``α = 0``."""
    # (The constants as tensors of the rows' dtype: a Python scalar is wrapped in a tensor at
    # each operation.)
    zeros = torch.zeros_like(slope)
    ones = zeros + 1.0
    zero, one = zeros.unsqueeze(1), ones.unsqueeze(1)
    E = torch.where(tight, direction @ ell.T, zero)
    gap = C - B
    curvature = E * E
    # Curvature of -φ at 0+: the terms positive at 0 or entering there (g_j > 0, or g_j = 0 and
    # e_j > 0: the sign of g_j, or of e_j where g_j is zero).
    start = torch.where(torch.where(gap == 0.0, E, gap) > 0.0, curvature, zero).sum(dim=1)
    crossing = gap * E < 0.0
    points = torch.where(crossing, -gap / torch.where(crossing, E, one), one).clamp_max(1.0)
    jump = torch.where(crossing & (points < 1.0), torch.where(gap < 0.0, one, -one), zero)
    points, order = points.sort(dim=1)
    jump = (jump * curvature).gather(1, order)
    knots = torch.cat([zero, points, one], dim=1)  # [k, m + 2]
    # -φ' has slope bends[:, i] on [knots[:, i], knots[:, i + 1]].
    bends = (start.unsqueeze(1) + torch.cat([zero, jump.cumsum(dim=1)], dim=1)).clamp_min(0.0)
    rise = bends * knots.diff(dim=1)
    fall = rise.cumsum(dim=1)  # φ'(0) − φ'(knots[:, i + 1])
    segment = (fall < slope.unsqueeze(1)).sum(dim=1, keepdim=True).clamp_max(fall.shape[1] - 1)
    left = knots.gather(1, segment).squeeze(1)
    before = (fall - rise).gather(1, segment).squeeze(1)
    bend = bends.gather(1, segment).squeeze(1)
    right = knots.gather(1, segment + 1).squeeze(1)
    bent = bend > 0.0
    root = left + (slope - before) / torch.where(bent, bend, ones)
    root = torch.where(bent, torch.minimum(torch.maximum(root, left), right), right)
    alpha = torch.where(slope > 0.0, root, zeros)
    return lam + alpha.unsqueeze(1) * direction


def least_energy_rows(
    G: Tensor,
    U: Tensor,
    V: Tensor,
    tol: float,
    factor: tuple[Tensor, Tensor],
    tight_tol: float | None = None,
    newton_target: float = _NEWTON_TARGET,
    *,
    optimal: bool = False,
    keep_free: bool = False,
) -> Tensor:
    """Optimal rows ``V`` (``G``, ``U``, ``V`` in float64, ``factor``:
    :func:`~torchjd.linalg._spanning.range_factor` of ``G``), each replaced by the least-norm
    weights of its update (see the module docstring) where these meet ``tol`` on ``G`` and have
    a lower :math:`\\sum_j W_j v_j^2`; the rows that miss ``tol`` are kept as they are. The tight
    set of a row: ``(Gv)_j`` at most ``tol`` relative to the row's scale (as
    :func:`~torchjd.linalg._kkt.kkt_residual` reads it); its update: that of ``v`` with the
    weights off ``T`` at their bounds (a feasible point, so that Newton's dual is bounded),
    Newton starting from the least-squares multipliers of the free weights (``ℓ_F λ ≈ z_F``).
    ``tight_tol``: the relative ``(Gv)_j`` of the tight set instead of ``tol`` (a larger one lets
    the weights of nearly tight indices leave their bound); ``newton_target``: of ``tol``, the KKT
    residual at which Newton stops (default :data:`_NEWTON_TARGET`; up to ``tol`` itself, rows
    already of least energy, whose residual is often between the two, stop at once).
    ``optimal``: the rows are feasible and meet ``tol`` already (not checked again; a row that
    does not is still only replaced by lighter weights that meet it). ``keep_free``: the rows
    whose candidate is lighter but misses ``tol`` get a second one, whose tight set also holds
    the row's own free weights (its update then that of ``v`` itself; see
    :func:`~torchjd.linalg._bounded_qp._least_norm_fallback`, whose interior-point rows need it),
    kept where it is lighter and meets ``tol`` (one more host read)."""
    r = factor[0].shape[1]
    chunk = max(1, _CHUNK_ENTRIES // max(r * r, G.shape[0]))
    tols = (tol, tol if tight_tol is None else tight_tol, newton_target / _NEWTON_TARGET)

    def polished(U: Tensor, V: Tensor) -> Tensor:
        X, missed = _least_energy(G, U, V, tols, factor)
        if not keep_free:
            return X
        (rows,) = missed.nonzero(as_tuple=True)
        if rows.numel() > 0:
            X[rows] = _least_energy(G, U[rows], V[rows], tols, factor, keep_free=True)[0]
        return X

    if optimal and V.shape[0] <= chunk:
        return polished(U, V)
    rows = (kkt_residual(G, U, V, V @ G) <= tol).nonzero().squeeze(1)
    if rows.numel() == 0:
        return V
    if rows.numel() == V.shape[0] <= chunk:  # every row, in one chunk: no copy
        return polished(U, V)
    V = V.clone()
    for part in rows.split(chunk):
        V[part] = polished(U[part], V[part])
    return V


def _least_energy(
    G: Tensor,
    U: Tensor,
    V: Tensor,
    tols: tuple[float, float, float],
    factor: tuple[Tensor, Tensor],
    keep_free: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`least_energy_rows` of one chunk of rows, all meeting ``tol``; ``tols``: ``tol``,
    ``tight_tol`` and the target's factor on :data:`_NEWTON_TARGET`; ``keep_free``: the free
    weights of each row also in its tight set. Returns the rows and which rows had a lighter
    candidate that missed ``tol`` (kept as they were)."""
    tol, tight_tol, target_factor = tols
    ell, sqrt_weights = factor
    B, Z = U * sqrt_weights, V * sqrt_weights
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
    dual_scale = (sqrt_weights.amax() * u_scale).squeeze(1)
    # ℓ_j · ℓᵀz = (G v)_j / √W_j; relative to the row's scale, (G v)_j / (s_j max|u|).
    tight = (Z @ ell) @ ell.T <= tight_tol * dual_scale.unsqueeze(1)
    if keep_free:
        tight |= Z > B
    Z = torch.where(tight, Z, B)
    free = tight & (Z > B)
    squares = _squares(ell)
    lam = cholesky_solve(
        _newton_factor(ell, free, squares=squares), torch.where(free, Z, 0.0) @ ell
    )
    target = tol * dual_scale * target_factor
    Z_new, _ = _least_norm(
        ell, sqrt_weights, B, Z @ ell, tight, lam, target, u_scale, _STALL, squares
    )
    V_new = torch.maximum(U, Z_new / sqrt_weights)
    weights = sqrt_weights * sqrt_weights
    lighter = (weights * V_new * V_new).sum(dim=1) < (weights * V * V).sum(dim=1)
    # (V_new ≥ U; the scales of the KKT residual: max|u| and s_j max|u|, s_j = √(W_j W_max),
    # as G's row scales where G_jj > 0, and for a zero row, whose (G v)_j is zero, any.)
    scales = (u_scale, (sqrt_weights * sqrt_weights.amax()) * u_scale)
    meets = feasible_kkt_residual(G, U, V_new, V_new @ G, scales) <= tol
    return torch.where((lighter & meets).unsqueeze(1), V_new, V), lighter & ~meets


def zero_update_rows(
    G: Tensor,
    G_face: Tensor,
    U: Tensor,
    tol: float,
    factor: tuple[Tensor, Tensor],
    floor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``v ≥ u`` of least :math:`\\sum_j W_j v_j^2` with a zero update ``Jᵀv = 0`` (``G``,
    ``U`` in float64; ``factor``: :func:`~torchjd.linalg._spanning.range_factor` of ``G``), and
    which rows are accepted, then which are optimal: accepted, a zero update (``|(G v)_j|`` at
    most ``tol`` relative to the row's scale, as :func:`~torchjd.linalg._kkt.kkt_residual` reads
    it) and a KKT residual on ``G`` within ``tol``. Those are optimal, and of least energy among
    the optima: every row's, when the rows of ``J`` positively span a subspace; the others are
    left to the caller.

    The problem of :func:`least_energy_rows` with ``y* = 0`` and every index in the tight set, by
    its Newton method's full steps alone (the primal-dual active-set method: each step solves
    ``ℓ_Fᵀ ℓ_F λ = −ℓ_Aᵀ b_A`` on the free set ``F = {j : (ℓλ)_j > b_j}`` of the last, until ``F``
    repeats, at most :data:`_ZERO_UPDATE_STEPS` steps), from ``λ = −(ℓᵀℓ)⁻¹ ℓᵀ b`` (``ℓλ``: minus
    the projection of ``b`` onto the range of ``ℓ``, positive on the indices whose rows conflict
    with the row's own): a few operations a step, without line search (the rows that would need
    it are left to the caller). Where the weights are large (near-duplicate rows), the rounding of
    the range factor keeps a row above ``tol`` on ``G``: such rows are refined on their face of
    ``G`` (:func:`~torchjd.linalg._principal_pivoting.refine`, its systems those of ``G_face``, a
    Tikhonov regularisation of ``G``), as the pivoting route's rows are; those that then meet
    ``tol`` are optimal, but not always of least energy (not accepted)."""
    ell, sqrt_weights = factor
    # (ℓᵀℓ is diagonal: its columns are eigenvectors scaled by the root of their eigenvalue)
    eigenvalues = (ell * ell).sum(dim=0)
    ell = ell[:, eigenvalues >= floor]
    eigenvalues = eigenvalues[eigenvalues >= floor]
    B = U * sqrt_weights
    squares = _squares(ell)
    lam = -(B @ ell) / eigenvalues
    free = lam @ ell.T > B
    for _ in range(_ZERO_UPDATE_STEPS):
        lam = cholesky_solve(
            _newton_factor(ell, free, squares=squares), -(torch.where(free, 0.0, B) @ ell)
        )
        C = lam @ ell.T
        previous, free = free, C > B
        if bool((free == previous).all()):
            break
    V = torch.maximum(U, torch.maximum(B, C) / sqrt_weights)
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny)
    scales = (u_scale, (sqrt_weights * sqrt_weights.amax()) * u_scale)

    GV = V @ G
    residual = feasible_kkt_residual(G, U, V, GV, scales)
    accepted = ((GV.abs() / scales[1]).amax(dim=1) <= tol) & (residual <= tol)
    optimal = accepted.clone()
    (rows,) = (~accepted).nonzero(as_tuple=True)
    if rows.numel() > 0:  # (m ≤ 32: refine's masked systems)
        U_rows, V_rows = U[rows], V[rows]
        X, residual = refine(G, G_face, U_rows, V_rows, V_rows <= U_rows, tol, True)
        V[rows] = X
        zero = ((X @ G).abs() / scales[1][rows]).amax(dim=1) <= tol
        optimal[rows] = zero & (residual <= tol)
    return V, accepted, optimal

r"""Exact mode beyond ``m = 64``: principal pivoting warm-started by ADMM on a regularised Gramian.

In the least-norm (exact) mode, the solver works on :func:`~torchjd.linalg._bounded_qp.tikhonov`
``(G) = G + σ W`` (``W = diag(G)``, with a small weight on zero rows) with a tiny ``σ``: ADMM
converges slowly on it (its condition number is about ``1/σ`` on the null space of ``G``). Its
active set is first guessed by ADMM on the same Gramian with a much larger ``σ``
(:data:`_GUESS_SIGMA`), Jacobi-scaled (``W^{-1/2} G W^{-1/2} + σ I``: unit diagonal, well
conditioned), in float32 (half the cost of each ``[k, m] × [m, m]`` product), to a loose
tolerance, for at most :data:`_GUESS_ITERS` iterations. Its solution spreads tiny weights over
many indices (as the least-norm weights do), so an index is guessed active when its scaled weight
``√W_j (v_j − u_j)`` is at most :data:`_GUESS_ACTIVE` ``· max_l √W_l |u_l|`` rather than exactly
zero. Principal pivoting on the Tikhonov Gramian, with its iterated refinement towards the exact
``G``, then corrects the indices where the guess is wrong. Rows it does not solve in
:data:`_PIVOTS` exchanges are returned unconverged, for the caller's slower fallback, and so are,
in float64, those whose KKT residual on ``G`` itself misses the tolerance. On the hard Jacobians
of ``benchmarks/non_conflict.py`` at ``m = 256``, against a guess by ADMM on the default mode's
``G + 10⁻⁴ tr(G) I`` (whose uniform ridge suppresses the weights of small rows, and whose exact
zeros miss the tiny weights): half the face factorisations (wrong indices per row at the first
exchange from about 50 to about 25), and a sixth of the rows left to the interior point.

From :data:`_FLOAT32_MIN_M` rows on, the guess is ADMM on ``G + ε tr(G) I`` (``ε``:
:data:`_LARGE_REGULARISATION`) in float32, to a tighter tolerance, for at most
:data:`_LARGE_ITERS` iterations, its exact zeros taken as the active set (at ``m = 512``, from 10
to 2 exchanges against the default mode's ``ε = 10⁻⁴``; the scaled guess above is not measured
there). The rows are pivoted in chunks of at most :data:`_CHUNK_ENTRIES` ``/ m²`` rows, which
bounds the memory of their face factorisations (``k |F|²`` entries, about ``m³ / 4`` at
``m = 1024``) and keeps them in faster memory; rows whose guessed face is much wider than the
others' go in their own batches (the compacted face systems are padded to the widest).

The rows left can be pivoted again in float64 (the caller's choice): on the faces of ``G_exact``
itself (:func:`exact_face_pivoting`, a float64 ``G``) or on the float64 values of a float32 ``G``
(:func:`float64_pivoting`).
"""

import torch
from torch import Tensor

from torchjd.linalg._admm import admm, warm_admm
from torchjd.linalg._kkt import kkt_residual, row_scales, worst_conflict
from torchjd.linalg._principal_pivoting import least_norm_pivoting, principal_pivoting

_GUESS_SIGMA = 1e-4  # relative to W: the guess's Tikhonov term
_GUESS_TOL = 1e-3  # KKT residual at which ADMM stops
# (At m = 256, on the 10 calls of benchmarks/non_conflict.py's hard Jacobians that reach it, the
# guesses after 60, 100 and 300 iterations give pivoting the same work: the faces, read at
# _GUESS_ACTIVE, settle early; the iterations after 60 took up to 45 ms a call.)
_GUESS_ITERS = 60
_GUESS_ACTIVE = 1e-2  # scaled weights up to this fraction of the largest scaled bound: active
_PIVOTS = 25
_FLOAT32_MIN_M = 512
_LARGE_REGULARISATION = 1e-6
_LARGE_TOL = 1e-5
_LARGE_ITERS = 500
_CHUNK_ENTRIES = 2**26
_WIDE = 1.2
# Of exact_face_pivoting: on the call of 97 rows of its docstring, with 4, 8, 15, 25 exchanges, 85,
# 96, 96, 97 rows meet tol (the others: about 0.1 s a row in the fallback).
_EXACT_PIVOTS = 25


def warm_started_pivoting(
    G: Tensor, G_exact: Tensor, U: Tensor, tol: float, max_iters: int
) -> tuple[Tensor, Tensor]:
    """Rows ``argmin_{v ≥ u} vᵀ G v`` (``G``: the Tikhonov-regularised ``G_exact``, refined
    towards it), and which rows converged."""
    m = G.shape[0]
    if m >= _FLOAT32_MIN_M:
        eye = torch.eye(m, dtype=G.dtype, device=G.device)
        G_regularised = G_exact + _LARGE_REGULARISATION * G_exact.diagonal().sum() * eye
        bounds = U.float()
        iters = min(max_iters, _LARGE_ITERS)
        Z, _ = admm(G_regularised.float(), bounds, max(tol, _LARGE_TOL), iters)
        active = bounds >= Z  # at their lower bound
    else:
        active = _scaled_guess(G_exact, U, min(max_iters, _GUESS_ITERS))
    scales = row_scales(G)
    X = torch.empty_like(U)
    converged = torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    for rows in _batches(active):
        for chunk in rows.split(max(1, _CHUNK_ENTRIES // m**2)):
            X[chunk], converged[chunk] = principal_pivoting(
                G, U[chunk], active[chunk], scales, tol, _PIVOTS, G_exact
            )
    X = torch.maximum(X, U)
    # Pivoting converges on the Tikhonov Gramian; its refinement towards G_exact can fall short
    # (opposite rows): in float64, such rows are left to the fallback too. In float32, whose
    # rounding of G is of the order of the Tikhonov term, so are the rows that conflict with a
    # row of G_exact beyond tol (read in float64: the rounding of a float32 product with large
    # weights would exceed it). Where the optimal weights are large (pairs of rows of J opposite
    # up to 10⁻³), the Tikhonov term's bias, ``σ G_jj v_j``, left conflicts of up to 10⁻³.
    if G.dtype == torch.float64:
        converged &= kkt_residual(G_exact, U, X, X @ G_exact) <= tol
    else:
        G64, X64 = G_exact.double(), X.double()
        converged &= worst_conflict(G64, U.double(), X64 @ G64) <= tol
    return X, converged


def float64_pivoting(
    G: Tensor, G_exact: Tensor, U: Tensor, X: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """The float32 rows ``X`` that :func:`warm_started_pivoting` left, pivoted again in float64
    on the values of the float32 ``G`` (the Tikhonov Gramian; ``G_exact``: the float64 values of
    the Gramian it regularises), from their last faces, for :data:`_PIVOTS` exchanges, each row's
    refinement keeping its iterate of least residual (``rounded``: see
    :func:`~torchjd.linalg._principal_pivoting.refine`). Returns the rows (float32, ``v ≥ u``)
    and which conflict with no row of ``G_exact`` beyond ``tol``.

    In float32, the face systems of the Tikhonov Gramian (``σ = 10⁻⁵``) are solved to about
    ``10⁻²`` of their solutions, far coarser than the tolerance at which pivoting reads their
    signs: rows wander (on the float32 hard Jacobian #18 of ``benchmarks/non_conflict.py`` at
    ``m = 256``, 54 of 256 rows after 25 exchanges, then 1.2 s of interior point and polish). In
    float64, from their last faces, all 54 converge within the same exchanges (0.2 s)."""
    G64, U64 = G.double(), U.double()
    X64, converged, _, _ = least_norm_pivoting(
        G64, U64, X.double() <= U64, row_scales(G64), tol, _PIVOTS, G_exact, rounded=True
    )
    X = torch.maximum(X64.to(U.dtype), U)
    converged &= worst_conflict(G_exact, U64, X.double() @ G_exact) <= tol
    return X, converged


def _scaled_guess(G_exact: Tensor, U: Tensor, max_iters: int) -> Tensor:
    """The guessed active sets of the rows (see the module docstring): ADMM on the Jacobi-scaled
    ``G_exact + σ W``, in float32, then the indices whose scaled weights are small."""
    diagonal = G_exact.diagonal()
    root = torch.where(diagonal > 0, diagonal, 1e-6 * diagonal.amax()).sqrt()
    G_guess = G_exact + _GUESS_SIGMA * torch.diag(root**2)
    Z, _, _ = warm_admm(G_guess.float(), U.float(), _GUESS_TOL, max_iters, scale=1 / root.float())
    scaled = (Z.to(U.dtype) - U) * root
    bound = (U * root).abs().amax(dim=1, keepdim=True)
    return ~(scaled > _GUESS_ACTIVE * bound)  # NaN (ADMM failed): active


def _batches(active: Tensor) -> list[Tensor]:
    """The rows, split in two batches when some guessed faces are much wider than the others: the
    compacted face systems of a batch are padded to the widest of their size class."""
    sizes = (~active).sum(dim=1)
    wide = sizes > _WIDE * sizes.double().median()
    n_wide = int(wide.sum())
    if n_wide == 0 or n_wide == sizes.numel():
        return [torch.arange(sizes.numel(), device=active.device)]
    return [(~wide).nonzero().squeeze(1), wide.nonzero().squeeze(1)]


def exact_face_pivoting(G_exact: Tensor, U: Tensor, X: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Rows ``X`` of :func:`warm_started_pivoting` that miss ``tol`` on a float64 ``G_exact``,
    solved by principal pivoting on ``G_exact`` itself (no Tikhonov term), from each row's face
    (``v_j = u_j``: active), for at most :data:`_EXACT_PIVOTS` exchanges. Returns the rows
    (``v ≥ u``) and which meet ``tol`` on ``G_exact`` (a singular face gives an unconverged or
    NaN row, never accepted).

    The refinement towards ``G_exact`` of a face of the Tikhonov Gramian can stall short of
    ``tol`` where ``G_exact`` has eigenvalues far below the Tikhonov term (near-duplicate rows of
    ``J``: ``10⁻¹²`` of its largest); the face is then nearly right, and the exact faces next to
    it are nonsingular. On the hard Jacobians of ``benchmarks/non_conflict.py`` at ``m = 256``
    (float64), the rows that pivoting left to the interior point on two calls (97 and 14 rows,
    up to ``2·10⁻⁴`` on ``G_exact``) all meet ``tol`` this way, the 97 within 25 exchanges."""
    U64 = U.double()
    X64, solved = principal_pivoting(
        G_exact, U64, X.double() <= U64, row_scales(G_exact), tol, _EXACT_PIVOTS
    )
    X64 = torch.maximum(X64, U64)
    solved &= kkt_residual(G_exact, U64, X64, X64 @ G_exact) <= tol
    return X64, solved

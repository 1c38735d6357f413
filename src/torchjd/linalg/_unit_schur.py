r"""UPGrad's problems beyond ``m = 64``: the unit vectors' problems, faces solved through ``G⁻¹``.

UPGrad with preference ``p ≥ 0`` solves the ``m`` problems ``min_{v ≥ p_i e_i} vᵀ G v``; as
``v(p_i e_i) = p_i v(e_i)``, these are the problems of the unit vectors, scaled. In the
Jacobi-scaled variables ``z = v / s`` (``s = diag(G)^{-1/2}``, ``Ĝ = S G S`` of unit diagonal,
``H = Ĝ⁻¹``), on a face with active set ``A ∋ i``, the multipliers ``μ = Ĝ z`` (zero off ``A``)
of the problem of ``e_i`` solve (see :mod:`torchjd.linalg._schur_pivoting`)

.. math::

    H_{AA}\, \mu_A = (e_i)_A / s_i, \qquad v = S H \mu, \qquad G v = S^{-1} \mu :

``μ_A`` is the column of ``i`` in ``H_AA⁻¹``, over ``s_i``. The initial guess of row ``i`` is
``A_i = {j : G_ij > 0}`` (the rows that agree with row ``i``): in a per-sample Gramian at
initialisation, the samples of its class, so that the rows of a class share their face. Each
distinct face is then inverted once (``|A| × |A|``, a few dozen indices), and the rows of
``W = H_AA⁻¹ (H S)_{A:}`` (each over ``s`` of its index) are the weights of the face's rows:
``Σ_faces |A|² m`` products for all rows instead of ``m³``. The rows whose guess was wrong (a few)
pivot on, each on its own face (:func:`~torchjd.linalg._principal_pivoting.exchange`). A
per-sample Gramian of an MLP at 256 rows (ten classes, twelve distinct faces) needs two steps,
the second on ten rows.

The cost is that of ``H`` (one Cholesky factorisation and its inverse: :func:`_spd_inverse`),
the faces' small batched factorisations, and one ``[m, m] × [m, m]`` product that checks every
row on ``G`` itself: at 256 rows in float32 on one CPU thread, about 3.5 ms, against about 5 ms
for the general route of the rows ``p_i e_i`` (pivoting from the same guess, with one more
product and more operations on ``[m, m]`` tensors). :func:`unit_schur_pivoting` declines (None)
when a row's initial face has many active indices, or the distinct faces are many (their small
systems would cost more than the general route), or when ``G`` is too ill-conditioned for ``H``
in its dtype.
"""

import math

import torch
from torch import Tensor

from torchjd.linalg._kkt import row_scales
from torchjd.linalg._low_rank import cholesky_solve
from torchjd.linalg._principal_pivoting import (
    _DUAL_THRESHOLD,
    _FULL_EXCHANGES,
    _PRIMAL_THRESHOLD,
    exchange,
)
from torchjd.linalg._schur_pivoting import _DISTINCT_MAX_FRACTION, _MIN_PIVOT, distinct_faces

_INVERSE_LEAF = 256  # rows of the diagonal blocks inverted through their Cholesky factor
# After the first step, the rows left pivot on while their faces cost at most this many times the
# budget of the first (the inverse is then paid for: at 512 rows of an MLP's per-sample Gramian,
# 287 rows left with faces of 68 indices, 0.7 m³, still cost less than the general route).
_LATER_BUDGET = 4.0


def unit_schur_pivoting(
    G: Tensor, tol: float, max_steps: int, max_size: int, budget: float
) -> tuple[Tensor, Tensor] | None:
    """The rows ``v(e_i) = argmin_{v ≥ e_i} vᵀ G v`` (``[m, m]``, ``v ≥ e_i`` exactly) and which
    of them converged (KKT residual on ``G`` below ``tol``), by block principal pivoting from
    ``A_i = {j : G_ij > 0}`` with faces solved through ``G⁻¹`` (see the module docstring).

    None when ``G`` has a non-finite entry, when an initial face has more than ``max_size``
    active indices, when the distinct initial faces cost more than ``budget · m³``
    (``Σ |A|³``), or when ``G`` is too ill-conditioned for ``G⁻¹`` in its dtype. Rows whose face
    outgrows ``max_size``, rows still infeasible after ``max_steps`` face solves, and all the rows
    left when their faces cost more than :data:`_LATER_BUDGET` ``· budget · m³``, stop,
    unconverged."""
    m = G.shape[0]
    # Rows without conflict (G_ij ≥ 0 for every j) are solved by v = e_i. Non-finite entries are
    # left to the general route (its NaN rows): here, or (the factorisation of a symmetric G
    # spreads them to a pivot) by the conditioning test below.
    conflicted = (G.amin(dim=1) < 0).nonzero().squeeze(1)
    every_row = conflicted.numel() == m
    eye = None if every_row else torch.eye(m, dtype=G.dtype, device=G.device)
    if conflicted.numel() == 0:
        if not bool(G.sum().isfinite()):
            return None
        return eye, torch.ones(m, dtype=torch.bool, device=G.device)
    active = (G if every_row else G.index_select(0, conflicted)) > 0
    if bool(active.sum(dim=1, dtype=torch.int32).amax() > max_size):
        return None
    faces, inverse = distinct_faces(active)
    if _face_cost(faces) > budget * m**3:
        return None
    diagonal = G.diagonal()
    s = diagonal.rsqrt()  # positive: G is regularised
    H, pivot = _spd_inverse(s.unsqueeze(1) * G * s.unsqueeze(0))
    if not bool(pivot >= _MIN_PIVOT[G.dtype]):
        return None  # too ill-conditioned for G⁻¹ in its dtype (a failed factorisation: NaN)
    HS = H.mul_(s)  # v = μ (H S)
    # Thresholds of principal pivoting (u_scale = 1): on A, (G v)_j = μ_j / s_j against
    # -_DUAL_THRESHOLD tol √(G_jj max_l G_ll), that is μ_j against a constant.
    dual_bound = -_DUAL_THRESHOLD * tol * math.sqrt(float(diagonal.amax()))
    primal_bound = -_PRIMAL_THRESHOLD * tol
    X = eye  # None when every row pivots: then the first face solutions
    rows = conflicted
    best = torch.full((rows.numel(),), m + 1, device=G.device)
    tries = torch.full((rows.numel(),), _FULL_EXCHANGES, device=G.device)
    for step in range(max_steps):
        k = rows.numel()
        if step > 0:
            if _DISTINCT_MAX_FRACTION * k >= m:
                faces, inverse = distinct_faces(active)
            else:
                faces, inverse = active, torch.arange(k, device=G.device)
            later_budget = _LATER_BUDGET * budget * m**3
            if k * max_size**3 > later_budget and _face_cost(faces) > later_budget:
                break  # the rows left have too many distinct faces: left unconverged
        V, mu_A, idx = _face_solutions(HS, s, faces, inverse, rows)
        if X is None:
            X = V
        else:
            X[rows] = V
        # Infeasible: a multiplier below its bound on A (compact: μ is zero off A), or a weight
        # below zero on F. (Index i stays in A: on every face, μ_i = vᵀ G v > 0.)
        primal = (primal_bound > V) & ~active
        dual = mu_A < dual_bound
        count = primal.sum(dim=1, dtype=torch.int32) + dual.sum(dim=1, dtype=torch.int32)
        left = (count > 0).nonzero().squeeze(1)
        if left.numel() == 0:
            break
        if left.numel() < k:
            rows, active, primal, dual, inverse, count, best, tries = (
                t.index_select(0, left)
                for t in (rows, active, primal, dual, inverse, count, best, tries)
            )
        index = idx.index_select(0, inverse)
        infeasible = primal | torch.zeros_like(primal).scatter_(1, index, dual)
        active, best, tries = exchange(active, infeasible, count, best, tries)
        fits = (active.sum(dim=1) <= max_size).nonzero().squeeze(1)
        if fits.numel() == 0:
            break
        if fits.numel() < rows.numel():  # faces too large: left unconverged
            rows, active, best, tries = (
                t.index_select(0, fits) for t in (rows, active, best, tries)
            )
    # v ≥ e_i exactly: v_i = 1 on every face (i ∈ A), and v ≥ 0 elsewhere. The face solutions
    # came from G⁻¹: each row is checked on G itself.
    X = X.clamp_min_(0.0)
    X.diagonal().fill_(1.0)
    return X, _unit_residual(G, X) <= tol


def _face_cost(faces: Tensor) -> float:
    """``Σ |A|³`` over the distinct ``faces`` (``[f, m]``)."""
    return float(faces.sum(dim=1).double().pow(3).sum())


def _spd_inverse(A: Tensor) -> tuple[Tensor, Tensor]:
    r"""``A⁻¹`` for a positive definite ``A`` and the least squared pivot of its Cholesky factor
    (NaN when a factorisation fails), by the block inverse

    .. math::

        \begin{pmatrix} P & Q \\ Q^\top & R \end{pmatrix}^{-1} = \begin{pmatrix} P^{-1} + Y
        S^{-1} Y^\top & -Y S^{-1} \\ -S^{-1} Y^\top & S^{-1} \end{pmatrix}, \qquad Y = P^{-1}
        Q, \quad S = R - Q^\top Y,

    recursively down to :data:`_INVERSE_LEAF` rows, each leaf by its Cholesky factor (whose
    pivots are those of ``A``'s): most of the work in matrix products. On one CPU thread, against
    ``torch.cholesky_inverse`` of the whole factor: about a tenth faster at 512 rows, a quarter at
    1,024 (no faster below)."""
    m = A.shape[0]
    if m <= _INVERSE_LEAF:
        L, info = torch.linalg.cholesky_ex(A)
        pivot = torch.where(info == 0, L.diagonal().amin() ** 2, torch.nan)
        return torch.cholesky_inverse(L), pivot
    h = m // 2
    P_inverse, P_pivot = _spd_inverse(A[:h, :h])
    Y = P_inverse @ A[:h, h:]
    S_inverse, S_pivot = _spd_inverse(torch.addmm(A[h:, h:], A[h:, :h], Y, alpha=-1))
    YS = Y @ S_inverse
    inverse = torch.empty_like(A)
    torch.addmm(P_inverse, YS, Y.T, out=inverse[:h, :h])
    torch.neg(YS, out=inverse[:h, h:])
    inverse[h:, :h] = inverse[:h, h:].T
    inverse[h:, h:] = S_inverse
    return inverse, torch.minimum(P_pivot, S_pivot)


def _face_solutions(
    HS: Tensor, s: Tensor, faces: Tensor, inverse: Tensor, units: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The weights ``v`` (``[k, m]``) of the problems of the unit vectors ``units`` (``[k]``) on
    their faces ``faces[inverse]`` (each holding its unit), the multipliers ``μ_A = H_AA⁻¹ (e_i)_A
    / s_i`` (``[k, w]``, zero on the padding), and the indices where they lie, per face
    (``[f, w]``: each face's active indices, padded with inactive ones).

    When the distinct faces are few, each is inverted once, and ``W_f = H_AA⁻¹ (H S)_A:`` (its
    rows over ``s`` of their index) gives the weights of every row of face ``f``: ``Σ_f |A|² m``
    products instead of the ``k m²`` of ``μ (H S)``."""
    k = units.shape[0]
    f, m = faces.shape
    width = int(faces.sum(dim=1).amax())
    idx = torch.topk(faces.to(torch.uint8), width, dim=1, sorted=False).indices
    mask = faces.gather(1, idx)
    s_A = s.index_select(0, idx.flatten()).view(f, width)
    # H_AA = (H S)_AA / s_A, padded with the identity.
    blocks = torch.take(HS, idx.unsqueeze(2) * m + idx.unsqueeze(1)) / s_A.unsqueeze(1)
    eye = torch.eye(width, dtype=HS.dtype, device=HS.device)
    blocks = torch.where(mask.unsqueeze(2) & mask.unsqueeze(1), blocks, eye)
    L, _ = torch.linalg.cholesky_ex(blocks)
    # Each unit's position in its face.
    positions = torch.arange(width, device=HS.device).expand(f, width)
    position = torch.zeros_like(faces, dtype=torch.long).scatter_(1, idx, positions)
    at = position.view(-1).index_select(0, inverse * m + units)
    if _DISTINCT_MAX_FRACTION * f <= k:
        # Row p over s at its index (from the row-major view of the symmetric inverse: a
        # contiguous result, for the batched product).
        K = torch.cholesky_inverse(L).mT / s_A.unsqueeze(2)
        W = K @ HS.index_select(0, idx.flatten()).view(f, width, m)  # [f, w, m]
        at = at + inverse * width
        mu_A = K.view(-1, width).index_select(0, at)
        return W.view(-1, m).index_select(0, at), mu_A, idx
    b = torch.zeros(k, width, dtype=HS.dtype, device=HS.device)
    b.scatter_(1, at.unsqueeze(1), s.index_select(0, units).reciprocal().unsqueeze(1))
    index = idx
    if f < k:  # else each row has its own face (inverse = arange(k))
        L, index = L.index_select(0, inverse), idx.index_select(0, inverse)
    mu_A = cholesky_solve(L, b)
    M = torch.zeros(k, m, dtype=HS.dtype, device=HS.device).scatter_(1, index, mu_A)
    return M @ HS, mu_A, idx


def _unit_residual(G: Tensor, X: Tensor) -> Tensor:
    """:func:`~torchjd.linalg._kkt.feasible_kkt_residual` of the rows ``v(e_i)`` (``X``, with
    ``v ≥ e_i`` and ``v_i = 1``; ``max|u| = 1``), in fewer operations."""
    relative_gradient = (X @ G).div_(row_scales(G))
    complementarity = relative_gradient.abs().mul_(X)  # |(G v)_j| (v_j − u_j)
    complementarity.diagonal().zero_()
    return torch.maximum(relative_gradient.neg_(), complementarity).amax(dim=1)

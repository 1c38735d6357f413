r"""Exact mode: a singular ``G`` whose only singular part is zero rows and pairs of opposite rows.

A pair of rows of ``J`` with ``J_a = −c J_b`` (``c > 0``) adds ``(v_b − c v_a) J_b`` to the update
``Jᵀv``: with ``v_a ≥ u_a`` and ``v_b ≥ u_b``, the coefficient ``w = v_b − c v_a`` takes every real
value, so ``J_b`` is a free direction of the problem, and the weights of the pair are not unique
(``G`` is singular). Let ``B`` hold one row of each pair, ``R`` the rows outside the pairs of
nonzero norm. Minimising over ``w`` first (``G_BB w = −G_BR v_R``, with ``G_BB`` nonsingular),

.. math::

    \min_{v_R ≥ u_R} \; v_R^\top \tilde G\, v_R, \qquad
    \tilde G = G_{RR} - G_{RB}\, G_{BB}^{-1} G_{BR},

a smaller problem of the same kind on the Schur complement ``G̃``. When ``G̃`` is nonsingular, its
optimum ``v_R`` is unique, and so are ``w`` and the update; the only freedom left is, in each pair,
the split of ``w``, and the least-norm weights of the exact mode (least :math:`\sum_j G_{jj} v_j^2`)
split it alone: with ``G_aa = c² G_bb``, :math:`c^2 v_a^2 + (w + c v_a)^2` is least at
``v_a = −w / (2c)``, raised to its bounds ``u_a`` and ``(u_b − w) / c`` (``v_b = w + c v_a ≥ u_b``),
then ``v_b = w + c v_a``. A zero row (``G_jj = 0``) has no effect on the update: its least-norm
weight is its bound.

This is the case, in ``benchmarks/non_conflict.py``'s hard Jacobians, of the matrices with more
columns than rows whose rank deficiency comes from opposite rows (with or without zero rows):
the general least-norm route solves them by pivoting on the faces of the whole regularised ``G``
(``O(|F|³)`` per row and step), where ``G̃`` takes the default mode's fast route.
"""

import torch
from torch import Tensor

# 1 + cos(J_a, J_b) below which two rows count as opposite, and 1 − |cos| below which two rows
# count as parallel (a tie between two rows of the same direction, or a row opposite to several:
# not handled here). Far above the rounding of a Gramian computed in the dtype (two rows
# J_a = −c J_b rounded separately). Rows only nearly opposite (1 + cos ~ 1e-9 to 1e-5 in float64)
# pass it too: the pair's own deviation is never tested (the pair leaves the reduced Gramian), so
# what guards the result is the caller's check of every row on G itself.
_PARALLEL = {torch.float64: 1e-10, torch.float32: 1e-5}


class OppositePairs:
    """The structure of a Gramian ``G`` (``[m, m]``, float64 values) whose rows of ``J`` hold
    zero rows and pairs of opposite rows: ``zero`` (``[m]`` booleans), the pairs' rows ``a`` and
    ``b`` (``[p]`` indices; ``b`` of the larger norm), their ratios ``c = ‖J_a‖ / ‖J_b‖``, the
    other rows ``rest``, the reduced Gramian ``reduced`` (``G̃`` on ``rest``) and ``coupling``
    (``G_BB⁻¹ G_BR``, ``[p, |rest|]``: ``w = −coupling v_R``)."""

    def __init__(
        self,
        zero: Tensor,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        rest: Tensor,
        reduced: Tensor,
        coupling: Tensor,
    ) -> None:
        self.zero, self.a, self.b, self.c = zero, a, b, c
        self.rest, self.reduced, self.coupling = rest, reduced, coupling

    def weights(self, U: Tensor, V_rest: Tensor) -> Tensor:
        """The least-norm weights ``[k, m]`` of the rows ``U`` (float64) from the optimal weights
        ``V_rest`` (``[k, |rest|]``) of the reduced problem: each pair's ``w`` split as in the
        module docstring, zero rows at ``max(u_j, 0)`` (any weight ``≥ u_j`` is optimal for them;
        the other routes give these)."""
        V = U.clone()
        V[:, self.zero] = U[:, self.zero].clamp_min(0)
        V[:, self.rest] = V_rest
        w = -(V_rest @ self.coupling.T)  # [k, p]
        u_a, u_b = U[:, self.a], U[:, self.b]
        v_a = torch.maximum(torch.maximum(-w / (2 * self.c), u_a), (u_b - w) / self.c)
        V[:, self.a] = v_a
        V[:, self.b] = torch.maximum(w + self.c * v_a, u_b)
        return V


def opposite_pairs(G: Tensor, dtype: torch.dtype) -> OppositePairs | None:
    """The :class:`OppositePairs` of a symmetric ``G`` (float64 values of a Gramian computed in
    ``dtype``), or None when its rows have no zero row and no opposite pair, when some row is
    parallel to a row other than its one opposite partner, or when ``G_BB`` (the pairs' rows
    ``b``) is not positive definite. Whether ``G̃`` is nonsingular is left to the caller."""
    m = G.shape[0]
    diagonal = G.diagonal()
    zero = diagonal == 0  # (G = J Jᵀ: the row of G is then exactly zero)
    root = torch.where(zero, 1.0, diagonal).sqrt()
    cosine = G / (root.unsqueeze(1) * root.unsqueeze(0))  # symmetric for a symmetric G
    nonzero = ~zero
    both = nonzero.unsqueeze(1) & nonzero.unsqueeze(0)
    tol = _PARALLEL[dtype]
    parallel = (cosine.abs() >= 1 - tol) & both
    parallel.fill_diagonal_(False)
    parallel = parallel & parallel.T  # (G not bitwise symmetric: both rows must see each other)
    opposite = (cosine <= -1 + tol) & parallel
    partners = parallel.sum(dim=1)
    # One host read: the counts that decide.
    n_zero, n_opposite, n_other = torch.stack(
        [
            zero.sum(),
            (opposite.sum(dim=1) == 1).sum(),
            ((partners > 1) | (parallel & ~opposite).any(dim=1)).sum(),
        ]
    ).tolist()
    if n_other > 0 or (n_zero == 0 and n_opposite == 0):
        return None
    index = torch.arange(m, device=G.device)
    partner = torch.where(partners == 1, opposite.to(torch.uint8).argmax(dim=1), index)
    in_pair = partners == 1
    # b: the row of larger norm of each pair (ties: the smaller index).
    larger = (diagonal > diagonal[partner]) | ((diagonal == diagonal[partner]) & (index < partner))
    (b,) = (in_pair & larger).nonzero(as_tuple=True)
    a = partner[b]
    (rest,) = (nonzero & ~in_pair).nonzero(as_tuple=True)
    c = (diagonal[a] / diagonal[b]).sqrt()
    G_bb = G[b][:, b]
    G_br = G[b][:, rest]
    scale = G_bb.diagonal().rsqrt()
    L, info = torch.linalg.cholesky_ex(G_bb * scale.unsqueeze(1) * scale.unsqueeze(0))
    if int(info) != 0:
        return None
    coupling = scale.unsqueeze(1) * torch.cholesky_solve(scale.unsqueeze(1) * G_br, L)
    reduced = G[rest][:, rest] - G_br.T @ coupling
    reduced = (reduced + reduced.T) / 2
    return OppositePairs(zero, a, b, c, rest, reduced, coupling)

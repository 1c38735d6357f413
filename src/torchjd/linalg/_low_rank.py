r"""Newton systems of the interior-point method for a Gramian of low rank (Woodbury identity).

With ``m`` rows and rank ``r ≪ m`` (per-sample gradients of a small model, many more tasks than
parameters), the Tikhonov-regularised Gramian of the exact mode is

.. math::

    G_t = L L^\top + \operatorname{diag}(t), \qquad L = V_r \Lambda_r^{1/2} \ (m \times r)

with the ``r`` eigenpairs of ``G`` above a relative :data:`_RANK_TOL` (the others are far below
the Tikhonov term ``t``). Each interior-point step solves, for every row, ``(Δ + 2 L Lᵀ) Δx = b``
with a positive diagonal ``Δ = 2t + z/x``; by the Woodbury identity

.. math::

    (\Delta + 2 L L^\top)^{-1} b = \Delta^{-1} b - \Delta^{-1} L\, C^{-1} L^\top \Delta^{-1} b,
    \qquad C = \tfrac12 I + L^\top \Delta^{-1} L,

an ``r × r`` factorisation per row instead of ``m × m``: ``O(m r²)`` work instead of ``O(m³)``.
"""

from collections.abc import Callable

import torch
from torch import Tensor

_RANK_TOL = {torch.float64: 1e-13, torch.float32: 1e-6}


def low_rank_factor(G: Tensor, max_rank: int, dtype: torch.dtype | None = None) -> Tensor | None:
    """``L`` with ``G ≈ L Lᵀ`` (the eigenpairs above :data:`_RANK_TOL` of the largest, for the
    rounding of a Gramian computed in ``dtype``, by default that of ``G``), or None when the rank
    exceeds ``max_rank``."""
    eigenvalues, vectors = torch.linalg.eigh(G)
    keep = eigenvalues > _RANK_TOL[dtype or G.dtype] * eigenvalues[-1]
    if int(keep.sum()) > max_rank:
        return None
    return vectors[:, keep] * eigenvalues[keep].sqrt()


def woodbury_solver(L: Tensor, delta: Tensor) -> Callable[[Tensor], Tensor]:
    """Solver of ``(diag(δ) + 2 L Lᵀ) x = b`` for each row's ``δ`` (``[k, m]``, positive)."""
    inverse = 1 / delta
    X = L * inverse.sqrt().unsqueeze(2)  # Δ^{-1/2} L, [k, m, r]
    half = 0.5 * torch.eye(L.shape[1], dtype=L.dtype, device=L.device)
    C = torch.baddbmm(half, X.mT, X)
    s = C.diagonal(dim1=1, dim2=2).rsqrt()
    C = s.unsqueeze(2) * C * s.unsqueeze(1)
    C.diagonal(dim1=1, dim2=2).fill_(1.0)
    factor, _ = torch.linalg.cholesky_ex(C)

    def solve(b: Tensor) -> Tensor:
        y = inverse * b
        w = s * cholesky_solve(factor, s * (y @ L))
        return y - inverse * (w @ L.T)

    return solve


def cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    """Each row's ``(L Lᵀ)⁻¹ b`` (``L``: ``[k, n, n]`` lower-triangular, ``b``: ``[k, n]``), by two
    triangular solves: several times faster than ``torch.cholesky_solve`` on batches of single
    right-hand sides."""
    y = torch.linalg.solve_triangular(L, b.unsqueeze(2), upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(2)

r"""Face solves of block principal pivoting through ``G⁻¹``, for large well-conditioned problems.

On a face (active set ``A``, free set ``F``) of ``min_{v ≥ u} vᵀ G v``, the gradient
``λ = G v`` vanishes on ``F``, so ``v = G⁻¹ λ`` with ``λ`` supported on ``A``, and ``v_A = u_A``
gives the multipliers from the ``|A| × |A|`` Schur complement of ``H = G⁻¹``:

.. math::

    H_{AA}\, \lambda_A = u_A, \qquad v = H_{:A}\, \lambda_A, \qquad G v = \lambda .

(This is the dual problem :math:`\max_{\lambda \ge 0} \lambda^\top u - \tfrac14 \lambda^\top H
\lambda`, up to the factor 2, restricted to its support ``A``.) A step of pivoting then costs one
batched ``|A| × |A|`` factorisation and one ``[k, m] × [m, m]`` product: the gradient needs no
second product. Rows whose free set is the smaller solve the primal face ``G_FF v_F = −G_FA u_A``
instead (:func:`~torchjd.linalg._principal_pivoting.solve_on_faces`).

Gramians whose rows share a strong common direction are of this kind: each row of UPGrad has
a few free indices, and pivoting from the active set of ``G u`` needs two or three steps.
Elsewhere the ``k`` batched factorisations (``LAPACK`` calls, one per row) cost more than ADMM's
shared products, and the caller chooses ADMM by :func:`face_cost`.
Everything runs in float64, on ``H`` after a symmetric Jacobi scaling (unit diagonal of ``G``).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from torchjd.linalg._principal_pivoting import _LazyInverse, solve_on_faces


def face_cost(active: Tensor) -> Tensor:
    r"""``Σ_rows min(|A|, |F|)³``: the flops of one step of pivoting by :func:`schur_face_solver`
    (up to a constant), a 0-dimensional tensor."""
    n_active = active.sum(dim=1)
    size = torch.minimum(n_active, active.shape[1] - n_active).double()
    return size.pow(3).sum()


def schur_face_solver(
    G: Tensor, max_size: int
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """The face solver ``(U, active) ↦ (V, G V)`` through ``G⁻¹`` (see the module docstring), or
    None when ``G`` is too ill-conditioned for ``G⁻¹`` to be accurate.

    Rows whose face costs more than a ``max_size × max_size`` system (``min(|A|, |F|) >
    max_size``) are not solved: NaN, which stops them, unconverged."""
    inverse = _LazyInverse(G).value
    if inverse is None:
        return None
    s, H = inverse
    H = H.contiguous()

    def solve(U: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        m = active.shape[1]
        n_active = active.sum(dim=1)
        fits = torch.minimum(n_active, m - n_active) <= max_size
        dual = fits & (2 * n_active <= m)
        if bool(dual.all()):
            return _dual_face_solve(s, H, U, active)
        V = torch.full_like(U, torch.nan)
        GV = torch.full_like(U, torch.nan)
        if bool(dual.any()):
            rows = dual.nonzero().squeeze(1)
            V[rows], GV[rows] = _dual_face_solve(s, H, U[rows], active[rows])
        primal = fits & ~dual
        if bool(primal.any()):
            rows = primal.nonzero().squeeze(1)
            V[rows] = solve_on_faces(G, U[rows], active[rows])
            GV[rows] = V[rows] @ G
        return V, GV

    return solve


def _dual_face_solve(s: Tensor, H: Tensor, U: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    r"""``v = S H S λ`` and ``G v = λ`` with ``(S H S)_{AA} λ_A = u_A``, ``H = (S G S)⁻¹``
    (contiguous): in the scaled multipliers ``μ = S λ``, ``H_AA μ_A = (u / s)_A``."""
    k, m = U.shape
    width = int(active.sum(dim=1).amax())
    if width == 0:
        return torch.zeros_like(U), torch.zeros_like(U)
    # Each row's active indices, padded with free ones (masked out).
    idx = torch.topk(active.to(U.dtype), width, dim=1, sorted=False).indices
    mask = active.gather(1, idx)
    pair = mask.unsqueeze(2) & mask.unsqueeze(1)
    flat = (idx.unsqueeze(2) * m + idx.unsqueeze(1)).view(-1)
    H_AA = H.view(-1).index_select(0, flat).view(k, width, width)
    H_AA = torch.where(pair, H_AA, torch.eye(width, dtype=H.dtype, device=H.device))
    b = torch.where(mask, (U / s).gather(1, idx), 0.0).unsqueeze(2)
    L, _ = torch.linalg.cholesky_ex(H_AA)
    mu_A = torch.linalg.solve_triangular(L, b, upper=False)
    mu_A = torch.linalg.solve_triangular(L.mT, mu_A, upper=True).squeeze(2)
    mu = torch.zeros_like(U).scatter(1, idx, torch.where(mask, mu_A, 0.0))
    V = torch.where(active, U, s * (mu @ H))
    return V, mu / s

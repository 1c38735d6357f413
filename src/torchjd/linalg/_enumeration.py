r"""Small problems :math:`\min_{v \ge u} v^\top G v` solved exactly by trying every active set.

For an active set :math:`A` (free set :math:`F`), the only candidate with :math:`v_A = u_A` and
:math:`(Gv)_F = 0` solves :math:`H_A v = D_A u`, where :math:`H_A = D_A + D_F G` takes its rows
from the identity on :math:`A` and from :math:`G` on :math:`F`, and :math:`D_A` is the diagonal
indicator of :math:`A`: :math:`v = H_A^{-1} D_A u`, a linear map of :math:`u` that every row
shares. The optimum is the candidate that also meets the other KKT conditions,
:math:`v_F \ge u_F` and :math:`(Gv)_A \ge 0`; with :math:`G` positive definite, one active set
gives it (several only when they give the same :math:`v`), and :math:`H_A` is invertible for
every :math:`A` (:math:`G_{FF}` is).

All :math:`2^m` systems are factorised at once (one batched LU factorisation) and all candidates
of all rows come from one batched solve: a fixed few dozen operations (the KKT check of the
chosen candidates included), where block principal pivoting takes dozens per step and several
steps. It pays for a few rows
(multi-task learning's handful of tasks); the work grows as :math:`2^m m^3`.
"""

from functools import lru_cache

import torch
from torch import Tensor


def enumerate_active_sets(G: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    """For each row ``u`` of ``U`` ``[k, m]``, the candidate that violates the remaining KKT
    conditions least among those of the ``2^m`` active sets, and its KKT residual
    (:func:`~torchjd.linalg._kkt.kkt_residual`, less its primal part on the active set, where
    ``v = u`` up to rounding: the caller clamps ``v ≥ u``): ``[k, m]`` and ``[k]``. ``G`` must be
    positive definite for the answer to be the optimum; a residual above the caller's tolerance
    says that it was not found (rounding on an ill-conditioned ``G``)."""
    m, k = G.shape[0], U.shape[0]
    _, active_rows, active_columns, identity = _active_sets(m, G.dtype, G.device)
    # H_A for every A, factorised once (LU with pivoting: H_A is not symmetric).
    factor, pivots, info = torch.linalg.lu_factor_ex(torch.where(active_rows, identity, G))
    # Rows relative to max|u|, and (G v)_j relative to √(G_jj max_l G_ll) (row_scales).
    u_scale = U.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    U = U / u_scale
    diagonal = G.diagonal()
    inverse_scale = (diagonal * diagonal.amax()).rsqrt()
    # v = H_A⁻¹ D_A u for every set and row: [S, k, m].
    V = torch.linalg.lu_solve(factor, pivots, active_rows * U.T).mT
    GV = V @ G
    # v_A = u_A and (Gv)_F = 0 hold by construction: what is left is v_F ≥ u_F and (Gv)_A ≥ 0.
    violation = torch.where(active_columns, GV * -inverse_scale, U - V).amax(dim=2)
    violation = violation.masked_fill_((info != 0).unsqueeze(1), torch.inf)
    best, choice = violation.nan_to_num_(torch.inf).min(dim=0)
    rows = torch.arange(k, device=G.device)
    X, gradient = V[choice, rows], GV[choice, rows] * inverse_scale
    # The rounding left in (G v)_F and v_A − u_A, as complementarity.
    complementarity = (gradient.abs() * (X - U).abs()).amax(dim=1)
    return X * u_scale, torch.maximum(best, complementarity)


@lru_cache(maxsize=32)
def _active_sets(
    m: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``2^m`` active sets as rows of a boolean ``[2^m, m]``, the same as ``[2^m, m, 1]`` and
    ``[2^m, 1, m]``, and the identity ``[m, m]``. Normal tensors, also when first made in
    inference mode (an untracked call): a later tracked call saves them for its backward."""
    with torch.inference_mode(False):
        bits = torch.arange(m, device=device)
        active = (torch.arange(2**m, device=device).unsqueeze(1) >> bits) & 1 == 1
        return (
            active,
            active.unsqueeze(2),
            active.unsqueeze(1),
            torch.eye(m, dtype=dtype, device=device),
        )

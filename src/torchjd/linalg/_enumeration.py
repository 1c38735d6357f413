r"""Small problems :math:`\min_{v \ge u} v^\top G v` solved exactly by trying every active set.

For an active set :math:`A` (free set :math:`F`), the only candidate with :math:`v_A = u_A` and
:math:`(Gv)_F = 0` solves :math:`H_A v = D_A u`, where :math:`H_A = D_A + D_F G` takes its rows
from the identity on :math:`A` and from :math:`G` on :math:`F`, and :math:`D_A` is the diagonal
indicator of :math:`A`: :math:`v = H_A^{-1} D_A u`, a linear map of :math:`u` that every row
shares. The optimum is the candidate that also meets the other KKT conditions,
:math:`v_F \ge u_F` and :math:`(Gv)_A \ge 0`; with :math:`G` positive definite, one active set
gives it (several only when they give the same :math:`v`), and :math:`H_A` is invertible for
every :math:`A` (:math:`G_{FF}` is).

All :math:`2^m` maps come from one batched inverse and all candidates of all rows from one
product: a fixed few dozen operations (the KKT check of the chosen candidates included), where
block principal pivoting takes dozens per step and several steps. It pays for a few rows
(multi-task learning's handful of tasks); the work grows as :math:`2^m m^3`.
"""

from functools import lru_cache

import torch
from torch import Tensor

from torchjd.linalg._kkt import kkt_residual, row_scales


def enumerate_active_sets(G: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    """For each row ``u`` of ``U`` ``[k, m]``, the candidate that violates the remaining KKT
    conditions least among those of the ``2^m`` active sets, and its KKT residual
    (:func:`~torchjd.linalg._kkt.kkt_residual`): ``[k, m]`` and ``[k]``. ``G`` must be positive
    definite for the answer to be the optimum; a residual above the caller's tolerance says that
    it was not found (rounding on an ill-conditioned ``G``)."""
    m, k = G.shape[0], U.shape[0]
    active, identity = _active_sets(m, G.dtype, G.device)
    H = torch.where(active.unsqueeze(2), identity, G)  # [S, m, m]
    inverses, info = torch.linalg.inv_ex(H)
    maps = inverses * active.unsqueeze(1)  # H_A⁻¹ D_A: the columns of the free indices are zero
    V = U @ maps.mT  # [S, k, m]: the candidates of every set for every row
    # v_A = u_A and (Gv)_F = 0 hold by construction: what is left is v_F ≥ u_F and (Gv)_A ≥ 0,
    # each relative to the scales of kkt_residual.
    u_scale = U.abs().amax(dim=1, keepdim=True)
    violation = torch.where(active.unsqueeze(1), -(V @ G) / row_scales(G), U - V).amax(dim=2)
    violation = torch.where(info.unsqueeze(1) == 0, violation / u_scale.T, torch.inf)
    choice = violation.nan_to_num(torch.inf).argmin(dim=0)
    X = V[choice, torch.arange(k, device=G.device)]
    return X, kkt_residual(G, U, X, X @ G)


@lru_cache(maxsize=32)
def _active_sets(m: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The ``2^m`` active sets as rows of a boolean ``[2^m, m]``, and the identity ``[m, m]``."""
    bits = torch.arange(m, device=device)
    active = (torch.arange(2**m, device=device).unsqueeze(1) >> bits) & 1 == 1
    return active, torch.eye(m, dtype=dtype, device=device)

r"""Euclidean projection onto the probability simplex
:math:`\Delta_m = \{w \in \mathbb R^m : w \ge 0,\ \mathbf 1^\top w = 1\}`.

The sort-based algorithm (Held, Wolfe & Crowder, 1974; Duchi et al., 2008): with ``u`` the
entries sorted in decreasing order and
:math:`\rho = \max\{k : u_k - (\sum_{l \le k} u_l - 1) / k > 0\}`, the projection is
:math:`\max(v - \theta, 0)` with :math:`\theta = (\sum_{l \le \rho} u_l - 1) / \rho`.
"""

import torch
from torch import Tensor


def project_onto_simplex(v: Tensor) -> Tensor:
    """The projection of each row of ``v`` (shape ``[..., m]``) onto the simplex."""
    u = v.sort(dim=-1, descending=True).values
    excess = u.cumsum(dim=-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    rho = ((u - excess / k) > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)

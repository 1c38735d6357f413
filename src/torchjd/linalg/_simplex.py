r"""Euclidean projection onto the probability simplex
:math:`\Delta = \{\lambda : \lambda \ge 0, \mathbf 1^\top \lambda = 1\}`.

The projection is :math:`\lambda_i = \max(x_i - \tau, 0)` with the threshold :math:`\tau` chosen so
that the entries sum to one; sorting :math:`x` in decreasing order, :math:`\tau = (\sum_{j \le \rho}
x_{(j)} - 1) / \rho` with :math:`\rho` the largest :math:`k` such that
:math:`x_{(k)} > (\sum_{j \le k} x_{(j)} - 1) / k` (Held et al., 1974; Duchi et al., 2008).
"""

import torch
from torch import Tensor


def project_onto_simplex(x: Tensor) -> Tensor:
    """The closest point of the probability simplex to the vector ``x`` (no host sync)."""
    sorted_x = x.sort(descending=True).values
    k = torch.arange(1, x.shape[0] + 1, dtype=x.dtype, device=x.device)
    thresholds = (sorted_x.cumsum(dim=0) - 1.0) / k
    rho = (sorted_x > thresholds).sum().clamp_min(1)  # k = 1 always qualifies
    tau = thresholds.gather(0, (rho - 1).unsqueeze(0))
    return (x - tau).clamp_min(0.0)

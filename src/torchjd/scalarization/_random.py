r"""Random: random loss weighting (Lin et al., 2022, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR):
:math:`\sum_i w_i L_i` with :math:`w = \operatorname{softmax}(z)`, :math:`z \sim \mathcal N(0, I)`.
"""

import torch
from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer


class Random(Scalarizer):
    r"""The weighted sum :math:`\sum_i w_i L_i` with weights
    :math:`w = \operatorname{softmax}(z)`, :math:`z \sim \mathcal N(0, I_K)`, drawn afresh at each
    call (positive, summing to one over all entries of the tensor).

    The draw uses torch's global generator (of the values' device), so ``torch.manual_seed`` makes
    it reproducible.

    >>> import torch
    >>> from torchjd.scalarization import Random
    >>> value = Random()(torch.tensor([2.0, 4.0]))
    >>> bool(2.0 < value < 4.0)
    True
    """

    def forward(self, values: Tensor, /) -> Tensor:
        z = torch.randn(values.shape, dtype=values.dtype, device=values.device)
        w = torch.softmax(z.flatten(), dim=0).view_as(values)
        return (w * values).sum()

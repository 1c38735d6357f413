r"""Random: random weights drawn afresh at each call (Lin et al., 2022, "Reasonable Effectiveness
of Random Weighting: A Litmus Test for Multi-Task Learning", TMLR):
:math:`w = \operatorname{softmax}(z)`, :math:`z \sim \mathcal N(0, I_m)`.

The draw uses torch's global generator (of the matrix's device), so ``torch.manual_seed`` makes
it reproducible.
"""

import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg import Matrix


class RandomWeighting(Weighting[Matrix]):
    r"""Weights :math:`\operatorname{softmax}(z)`, :math:`z \sim \mathcal N(0, I_m)`, drawn at each
    call.

    >>> import torch
    >>> from torchjd.aggregation import RandomWeighting
    >>> weights = RandomWeighting()(torch.ones(3, 2))
    >>> bool(weights.sum().isclose(torch.tensor(1.0))) and bool((weights > 0).all())
    True
    """

    def forward(self, matrix: Matrix, /) -> Tensor:
        z = torch.randn(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return torch.softmax(z, dim=0)


class Random(WeightedAggregator):
    r"""The combination of the rows with random positive weights summing to one, drawn at each
    call.
    """

    def __init__(self) -> None:
        super().__init__(RandomWeighting())

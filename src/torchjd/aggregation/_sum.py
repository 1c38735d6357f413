r"""Sum: :math:`\mathcal A(J) = \mathbf 1^\top J`, what ``losses.sum().backward()`` computes."""

import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg import Matrix


class SumWeighting(Weighting[Matrix]):
    r"""The weights :math:`\mathbf 1`, for a matrix (or Gramian) with :math:`m` rows.

    >>> import torch
    >>> from torchjd.aggregation import SumWeighting
    >>> SumWeighting()(torch.ones(3, 5))
    tensor([1., 1., 1.])
    """

    def forward(self, matrix: Matrix, /) -> Tensor:
        return torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


class Sum(WeightedAggregator):
    r"""The sum of the rows.

    >>> import torch
    >>> from torchjd.aggregation import Sum
    >>> Sum()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([2., 2., 2.])
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())

r"""Mean: :math:`\mathcal A(J) = \frac 1 m \mathbf 1^\top J`, the usual average of the losses'
gradients (what ``losses.mean().backward()`` computes)."""

import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg import Matrix


class MeanWeighting(Weighting[Matrix]):
    r"""The weights :math:`\mathbf 1 / m`, for a matrix (or Gramian) with :math:`m` rows.

    >>> import torch
    >>> from torchjd.aggregation import MeanWeighting
    >>> MeanWeighting()(torch.ones(4, 3))
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    def forward(self, matrix: Matrix, /) -> Tensor:
        m = matrix.shape[0]
        return torch.full((m,), 1.0 / m, dtype=matrix.dtype, device=matrix.device)


class Mean(WeightedAggregator):
    r"""The mean of the rows.

    >>> import torch
    >>> from torchjd.aggregation import Mean
    >>> Mean()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())

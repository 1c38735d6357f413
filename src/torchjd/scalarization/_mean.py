r"""Mean: :math:`\frac 1 K \sum_i L_i`."""

from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer


class Mean(Scalarizer):
    r"""The mean :math:`\frac 1 K \sum_{i=1}^K L_i` of the :math:`K` values (all entries of the
    tensor), what ``losses.mean().backward()`` minimises.

    >>> import torch
    >>> from torchjd.scalarization import Mean
    >>> Mean()(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    tensor(3.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        return values.mean()

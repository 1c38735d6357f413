r"""Sum: :math:`\sum_i L_i`."""

from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer


class Sum(Scalarizer):
    r"""The sum :math:`\sum_{i=1}^K L_i` of the values (all entries of the tensor).

    >>> import torch
    >>> from torchjd.scalarization import Sum
    >>> Sum()(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    tensor(12.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        return values.sum()

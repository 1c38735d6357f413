r"""Constant: :math:`\sum_i w_i L_i` with fixed weights."""

from typing import Any

from torch import Tensor

from torchjd.scalarization._checks import check_same_shape, check_tensor
from torchjd.scalarization._scalarizer import Scalarizer


class Constant(Scalarizer):
    r"""The weighted sum :math:`\sum_i w_i L_i` with fixed weights :math:`w`.

    :param weights: The weights, a finite tensor of the shape of the values (negative entries are
        allowed).

    >>> import torch
    >>> from torchjd.scalarization import Constant
    >>> Constant(torch.tensor([1.0, 0.5]))(torch.tensor([2.0, 4.0]))
    tensor(4.)
    """

    weights: Tensor

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", check_tensor(weights, "weights"))

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape(values, tuple(self.weights.shape), "weights")
        return (self.weights.to(values) * values).sum()

    def _params(self) -> dict[str, Any]:
        return {"weights": self.weights}

r"""Constant: :math:`\mathcal A(J) = w^\top J` for fixed weights :math:`w`."""

from typing import Any

from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting, vector_suffix
from torchjd.aggregation._checks import check_length, check_vector
from torchjd.linalg import Matrix


class ConstantWeighting(Weighting[Matrix]):
    r"""The fixed weights ``weights``, whatever the matrix (which must have one row per weight).

    :param weights: The weights, a finite 1-D tensor ``[m]``. Negative entries are allowed.

    >>> import torch
    >>> from torchjd.aggregation import ConstantWeighting
    >>> ConstantWeighting(torch.tensor([1.0, 2.0]))(torch.ones(2, 3))
    tensor([1., 2.])
    """

    weights: Tensor

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", check_vector(weights, "weights", non_negative=False))

    def forward(self, matrix: Matrix, /) -> Tensor:
        check_length(self.weights, "weights", matrix.shape[0], "matrix")
        # a copy: the caller may modify the weights it receives (e.g. jac_to_grad returns them)
        return self.weights.to(dtype=matrix.dtype, device=matrix.device, copy=True)

    def _params(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def _str_suffix(self) -> str:
        return vector_suffix(self.weights)


class Constant(WeightedAggregator):
    r"""The combination of the rows with fixed weights.

    :param weights: The weights, a finite 1-D tensor ``[m]``.

    >>> import torch
    >>> from torchjd.aggregation import Constant
    >>> Constant(torch.tensor([1.0, 2.0]))(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([8., 3., 3.])
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))

r"""COSMOS (Ruchte & Grabocka, 2021, "Scalable Pareto Front Approximation for Deep Multi-Objective
Learning", ICDM): a linear scalarization with a penalty on the angle between the vector of losses
and the preference ray :math:`r`:

.. math::

    \mathcal L_{\text{COSMOS}} = r^\top L - \lambda \, \frac{r^\top L}{\lVert r \rVert \, \lVert L
    \rVert}.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd.scalarization._checks import check_non_negative_float, check_same_shape, check_tensor
from torchjd.scalarization._scalarizer import Scalarizer


class COSMOS(Scalarizer):
    r""":math:`r^\top L - \lambda \cos(r, L)`: the weighted sum of the values, minus
    :math:`\lambda` times the cosine similarity between the values and the preference ray
    :math:`r`, which pulls the losses towards the ray (both taken over all entries of the tensor).

    :param lambda_: The penalty :math:`\lambda \ge 0`.
    :param weights: The preference ray :math:`r`, a finite tensor of the shape of the values.

    >>> import torch
    >>> from torchjd.scalarization import COSMOS
    >>> COSMOS(2.0, torch.tensor([1.0, 2.0, 3.0]))(torch.tensor([1.0, 2.0, 4.0]))
    tensor(15.0171)
    """

    weights: Tensor

    def __init__(self, lambda_: float, weights: Tensor) -> None:
        super().__init__()
        self.lambda_ = check_non_negative_float(lambda_, "lambda_")
        self.register_buffer("weights", check_tensor(weights, "weights"))

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape(values, tuple(self.weights.shape), "weights")
        r = self.weights.to(values).flatten()
        L = values.flatten()
        linear = r @ L
        tiny = torch.finfo(values.dtype).tiny
        cosine = linear / (r.norm() * L.norm()).clamp_min(tiny)
        return linear - self.lambda_ * cosine

    def _params(self) -> dict[str, Any]:
        return {"lambda_": self.lambda_, "weights": self.weights}

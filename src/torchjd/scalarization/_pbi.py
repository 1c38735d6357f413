r"""PBI, penalty-based boundary intersection (Zhang & Li, 2007, "MOEA/D: A Multiobjective
Evolutionary Algorithm Based on Decomposition", IEEE TEVC). With the unit preference direction
:math:`\hat\lambda = \lambda / \lVert\lambda\rVert` and the reference point :math:`z`:

.. math::

    g_{\text{PBI}}(L) = d_1 + \theta d_2, \qquad
    d_1 = (L - z)^\top \hat\lambda, \qquad
    d_2 = \lVert L - (z + d_1 \hat\lambda) \rVert,

the distance travelled along the direction plus :math:`\theta` times the distance to it.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd.scalarization._checks import (
    check_non_negative_float,
    check_preference_and_reference,
    check_same_shape,
    check_tensor,
)
from torchjd.scalarization._scalarizer import Scalarizer


class PBI(Scalarizer):
    r""":math:`d_1 + \theta d_2`: the component :math:`d_1 = (L - z)^\top \hat\lambda` of the values
    along the preference direction, plus :math:`\theta` times the norm :math:`d_2` of their
    component perpendicular to it (over all entries of the tensor).

    :math:`d_1` is signed, so that values below the reference point keep a useful gradient; the
    paper's :math:`\lvert d_1 \rvert` is the same whenever :math:`(L - z)^\top \lambda \ge 0`.

    :param theta: The penalty :math:`\theta \ge 0`.
    :param weights: The preference direction :math:`\lambda`, a finite non-zero tensor of the shape
        of the values.
    :param reference: The reference (ideal) point :math:`z`, of the shape of the values; zero when
        None.

    >>> import torch
    >>> from torchjd.scalarization import PBI
    >>> PBI(5.0, torch.tensor([1.0, 2.0, 3.0]))(torch.tensor([1.0, 2.0, 4.0]))
    tensor(7.5315)
    """

    direction: Tensor
    reference: Tensor | None

    def __init__(self, theta: float, weights: Tensor, reference: Tensor | None = None) -> None:
        super().__init__()
        self.theta = check_non_negative_float(theta, "theta")
        weights, reference = check_preference_and_reference(
            check_tensor(weights, "weights"), reference
        )
        if not bool(weights.norm() > 0):
            raise ValueError("`weights` must have a non-zero entry (it gives a direction).")
        self.register_buffer("weights", weights)
        self.register_buffer("reference", reference)

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape(values, tuple(self.weights.shape), "weights")
        shifted = values if self.reference is None else values - self.reference.to(values)
        shifted = shifted.flatten()
        direction = self.weights.to(values).flatten()
        direction = direction / direction.norm()
        d1 = shifted @ direction
        d2 = _norm(shifted - d1 * direction)
        return d1 + self.theta * d2

    def _params(self) -> dict[str, Any]:
        return {"theta": self.theta, "weights": self.weights, "reference": self.reference}


def _norm(x: Tensor) -> Tensor:
    """``‖x‖``, with the subgradient 0 (not NaN) at ``x = 0`` (values on the preference ray)."""
    squared = (x * x).sum()
    positive = squared > 0
    return torch.where(positive, squared.where(positive, 1.0).sqrt(), 0.0)

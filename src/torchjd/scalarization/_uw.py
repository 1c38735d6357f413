r"""UW, uncertainty weighting (Kendall et al., 2018, "Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics", CVPR). With the learned log-variances
:math:`s_i = \log \sigma_i^2`:

.. math::

    \mathcal L_{\text{UW}} = \sum_{i=1}^K \frac{1}{2\sigma_i^2} L_i + \log \sigma_i
    = \sum_{i=1}^K \tfrac 1 2 e^{-s_i} L_i + \tfrac 1 2 s_i .
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchjd._stateful import Stateful
from torchjd.scalarization._checks import check_same_shape, check_shape
from torchjd.scalarization._scalarizer import Scalarizer


class UW(Scalarizer, Stateful):
    r""":math:`\sum_i \frac 1 2 e^{-s_i} L_i + \frac 1 2 s_i`, with learnable log-variances
    :math:`s` (the :class:`~torch.nn.Parameter` ``log_var``, initialised at zero).

    Add ``scalarizer.parameters()`` to the optimizer: minimising over :math:`s_i` gives
    :math:`e^{s_i} = L_i`, so each loss ends up weighted by the inverse of its own scale.
    :meth:`reset` puts the log-variances back to zero (in place, so that an optimizer keeps
    tracking them).

    :param shape: The shape of the values (an int ``K`` for a vector of ``K`` losses).

    >>> import torch
    >>> from torchjd.scalarization import UW
    >>> scalarizer = UW(3)
    >>> scalarizer(torch.tensor([1.0, 2.0, 4.0]))
    tensor(3.5000, grad_fn=<SumBackward0>)
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = check_shape(shape, "shape")
        self.log_var = nn.Parameter(torch.zeros(self.shape))

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape(values, self.shape, "log-variances")
        s = self.log_var.to(values)
        return (0.5 * torch.exp(-s) * values + 0.5 * s).sum()

    def reset(self) -> None:
        with torch.no_grad():
            self.log_var.zero_()

    def _params(self) -> dict[str, Any]:
        return {"shape": self.shape}

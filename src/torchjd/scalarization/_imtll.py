r"""IMTL-L, the loss-balancing part of impartial multi-task learning (Liu et al., 2021, "Towards
Impartial Multi-task Learning", ICLR). With learned scales :math:`s_i`:

.. math::

    \mathcal L_{\text{IMTL-L}} = \sum_{i=1}^K e^{s_i} L_i - s_i ,

whose minimum over :math:`s_i` is at :math:`e^{s_i} L_i = 1`: every scaled loss is brought to the
same value.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchjd._stateful import Stateful
from torchjd.scalarization._checks import check_same_shape, check_shape
from torchjd.scalarization._scalarizer import Scalarizer


class IMTLL(Scalarizer, Stateful):
    r""":math:`\sum_i e^{s_i} L_i - s_i`, with learnable scales :math:`s` (the
    :class:`~torch.nn.Parameter` ``log_scale``, initialised at zero).

    Add ``scalarizer.parameters()`` to the optimizer. :meth:`reset` puts the scales back to zero
    (in place, so that an optimizer keeps tracking them).

    :param shape: The shape of the values (an int ``K`` for a vector of ``K`` losses).

    >>> import torch
    >>> from torchjd.scalarization import IMTLL
    >>> IMTLL(3)(torch.tensor([1.0, 2.0, 4.0]))
    tensor(7., grad_fn=<SumBackward0>)
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = check_shape(shape, "shape")
        self.log_scale = nn.Parameter(torch.zeros(self.shape))

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape(values, self.shape, "scales")
        s = self.log_scale.to(values)
        return (torch.exp(s) * values - s).sum()

    def reset(self) -> None:
        with torch.no_grad():
            self.log_scale.zero_()

    def _params(self) -> dict[str, Any]:
        return {"shape": self.shape}

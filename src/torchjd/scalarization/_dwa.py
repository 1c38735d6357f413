r"""DWA, dynamic weight average (Liu et al., 2019, "End-to-End Multi-Task Learning with Attention",
CVPR). With :math:`\bar L_i(t)` the average of loss :math:`i` over epoch :math:`t`:

.. math::

    \mathcal L_{\text{DWA}}(t) = \sum_{i=1}^K w_i(t) L_i, \qquad
    w_i(t) = \frac{K \exp(r_i(t-1) / T)}{\sum_j \exp(r_j(t-1) / T)}, \qquad
    r_i(t-1) = \frac{\bar L_i(t-1)}{\bar L_i(t-2)},

and :math:`w_i(t) = 1` for the first two epochs. A loss that decreased slowly gets more weight.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._checks import check_positive_float
from torchjd.scalarization._checks import check_same_shape
from torchjd.scalarization._scalarizer import Scalarizer


class DWA(Scalarizer, Stateful):
    r""":math:`\sum_i w_i L_i` with :math:`w = K \operatorname{softmax}(r / T)`, where :math:`r_i`
    is the ratio of the average of loss :math:`i` over the last epoch to its average over the
    epoch before (:math:`w = \mathbf 1` until two epochs are recorded). The weights are constants
    (no gradient flows through them).

    Each call adds the (detached) values to the current epoch's average; call :meth:`step` once at
    the end of each epoch. :meth:`reset` forgets every epoch.

    :param temperature: The temperature :math:`T > 0`; a larger one gives more even weights.

    >>> import torch
    >>> from torchjd.scalarization import DWA
    >>> scalarizer = DWA()
    >>> for epoch_losses in [[2.0, 2.0], [1.0, 2.0]]:  # loss 1 halves, loss 2 stalls
    ...     _ = scalarizer(torch.tensor(epoch_losses))
    ...     scalarizer.step()
    >>> scalarizer(torch.tensor([1.0, 0.0]))  # weights 2·softmax([0.5, 1] / 2) = [0.88, 1.12]
    tensor(0.8756)
    """

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = check_positive_float(temperature, "temperature")
        self.reset()

    def reset(self) -> None:
        self._epoch_sum: Tensor | None = None
        self._epoch_batches = 0
        self._averages: list[Tensor] = []  # the last two epochs' averages, oldest first

    def forward(self, values: Tensor, /) -> Tensor:
        if self._averages:
            check_same_shape(values, tuple(self._averages[-1].shape), "losses of previous epochs")
        elif self._epoch_sum is not None:
            check_same_shape(values, tuple(self._epoch_sum.shape), "losses of this epoch")
        detached = values.detach()
        self._epoch_sum = (
            detached.clone() if self._epoch_sum is None else self._epoch_sum + detached
        )
        self._epoch_batches += 1
        return (self._weights(values) * values).sum()

    def _weights(self, values: Tensor) -> Tensor:
        if len(self._averages) < 2:
            return torch.ones_like(values)
        previous, last = (average.to(values) for average in self._averages)
        r = last / previous
        return values.numel() * torch.softmax(r.flatten() / self.temperature, dim=0).view_as(r)

    def step(self) -> None:
        """Closes the current epoch: its average becomes the latest of the two recorded epochs. An
        epoch with no call is ignored."""
        if self._epoch_sum is None:
            return
        self._averages = [*self._averages[-1:], self._epoch_sum / self._epoch_batches]
        self._epoch_sum = None
        self._epoch_batches = 0

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

r"""FAMO, fast adaptive multitask optimization (Liu et al., 2023, "FAMO: Fast Adaptive Multitask
Optimization", NeurIPS). With task weights :math:`z = \operatorname{softmax}(\xi)` and the minimal
losses :math:`L^*`, the model minimises (with :math:`c` held constant)

.. math::

    \mathcal L_{\text{FAMO}} = c \sum_{i=1}^K z_i \log(L_i - L_i^*), \qquad
    c = \Big(\sum_{i=1}^K \frac{z_i}{L_i - L_i^*}\Big)^{-1},

whose gradient :math:`c \sum_i z_i \nabla L_i / (L_i - L_i^*)` decreases every log-loss at a
similar rate. After the model's step, the logits follow the observed decrease of the log-losses
:math:`d_i = \log(L_i^t - L_i^*) - \log(L_i^{t+1} - L_i^*)`:

.. math::

    \delta = \Big(\frac{\partial z}{\partial \xi}\Big)^{\!\top} d
           = z \odot (d - z^\top d), \qquad
    \xi \leftarrow \xi - \beta\, \operatorname{Adam}(\delta + \gamma \xi),

i.e. one step of Adam (learning rate :math:`\beta`, L2 weight decay :math:`\gamma`) on the
gradient :math:`\delta` of Algorithm 1 of the paper, as in the authors' implementation.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._checks import check_positive_float
from torchjd.scalarization._checks import (
    check_non_negative_float,
    check_same_shape,
    check_shape,
    check_tensor,
)
from torchjd.scalarization._scalarizer import Scalarizer

_EPS = 1e-8  # added to L − L*, so that a loss at its minimum keeps a finite log
_BETAS = (0.9, 0.999)  # Adam's moment decays
_ADAM_EPS = 1e-8


class FAMO(Scalarizer, Stateful):
    r""":math:`c \sum_i z_i \log(L_i - L_i^* + \epsilon)` with
    :math:`z = \operatorname{softmax}(\xi)` over all entries of the values,
    :math:`c = (\sum_i z_i / (L_i - L_i^* + \epsilon))^{-1}` held constant and
    :math:`\epsilon = 10^{-8}`.

    The logits :math:`\xi` are a buffer, not a parameter: they are not trained by the model's
    optimizer but by :meth:`update`, which must be called after each optimizer step with the new
    losses. They, Adam's moments and its step count are in the ``state_dict``. :meth:`reset` sets
    them back to zero.

    :param shape: The shape of the values (an int ``K`` for a vector of ``K`` losses).
    :param min_losses: The minimal losses :math:`L^*` (of that shape); zero when None.
    :param lr: The learning rate :math:`\beta > 0` of the logits.
    :param weight_decay: The weight decay :math:`\gamma \ge 0` of the logits.

    >>> import torch
    >>> from torchjd.scalarization import FAMO
    >>> famo = FAMO(2)
    >>> famo(torch.tensor([1.0, 4.0]))  # z = [1/2, 1/2], c = 1.6
    tensor(1.1090)
    >>> # ... backward() and the optimizer's step, then, with the new losses:
    >>> famo.update(torch.tensor([0.5, 4.0]))  # the first loss decreased: the second gains weight
    >>> famo.logits
    tensor([-0.0250,  0.0250])
    """

    logits: Tensor
    min_losses: Tensor
    _exp_avg: Tensor
    _exp_avg_sq: Tensor
    _n_updates: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        min_losses: Tensor | None = None,
        lr: float = 0.025,
        weight_decay: float = 0.001,
    ) -> None:
        super().__init__()
        self.shape = check_shape(shape, "shape")
        self.lr = check_positive_float(lr, "lr")
        self.weight_decay = check_non_negative_float(weight_decay, "weight_decay")
        if min_losses is None:
            min_losses = torch.zeros(self.shape)
        else:
            min_losses = check_tensor(min_losses, "min_losses")
            if tuple(min_losses.shape) != self.shape:
                raise ValueError(
                    f"`min_losses` must have the shape {self.shape} given by `shape`. Found "
                    f"`min_losses.shape = {tuple(min_losses.shape)}`."
                )
        self.register_buffer("min_losses", min_losses)
        self.register_buffer("logits", torch.zeros(self.shape))
        self.register_buffer("_exp_avg", torch.zeros(self.shape))
        self.register_buffer("_exp_avg_sq", torch.zeros(self.shape))
        self.register_buffer("_n_updates", torch.zeros((), dtype=torch.int64))
        self._previous_losses: Tensor | None = None

    def reset(self) -> None:
        self.logits.zero_()
        self._exp_avg.zero_()
        self._exp_avg_sq.zero_()
        self._n_updates.zero_()
        self._previous_losses = None

    def weights(self) -> Tensor:
        r"""The task weights :math:`z = \operatorname{softmax}(\xi)`, of the shape of the values."""
        return torch.softmax(self.logits.flatten(), dim=0).view(self.shape)

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape(values, self.shape, "logits")
        self._previous_losses = values.detach().clone()
        z = self.weights().to(values)
        gaps = values - self.min_losses.to(values) + _EPS
        c = 1.0 / (z / gaps.detach()).sum()
        return c * (z * gaps.log()).sum()

    def update(self, values: Tensor, /) -> None:
        """Updates the logits from the decrease of the log-losses between the last call and
        ``values``, the losses after the optimizer's step (on the same data when possible)."""
        if not isinstance(values, Tensor):
            raise TypeError(f"`values` must be a torch.Tensor. Found {type(values).__name__}.")
        check_same_shape(values, self.shape, "logits")
        if self._previous_losses is None:
            raise RuntimeError(
                "`update` needs the losses of the previous step: call the scalarizer on them "
                "(before the optimizer's step), then `update` with the new losses."
            )
        min_losses = self.min_losses.to(values)
        previous = self._previous_losses.to(values)
        d = (previous - min_losses + _EPS).log() - (values.detach() - min_losses + _EPS).log()
        z = self.weights().to(values)
        delta = z * (d - (z * d).sum())
        self._adam_step(delta.to(self.logits))

    def _adam_step(self, delta: Tensor) -> None:
        """One step of Adam (torch.optim.Adam's rule, L2 weight decay) on the logits."""
        beta1, beta2 = _BETAS
        self._n_updates.add_(1)
        g = delta + self.weight_decay * self.logits
        self._exp_avg.mul_(beta1).add_((1 - beta1) * g)
        self._exp_avg_sq.mul_(beta2).add_((1 - beta2) * g * g)
        t = self._n_updates.to(self.logits.dtype)
        m_hat = self._exp_avg / (1 - beta1**t)
        v_hat = self._exp_avg_sq / (1 - beta2**t)
        self.logits.sub_(self.lr * m_hat / (v_hat.sqrt() + _ADAM_EPS))

    def _params(self) -> dict[str, Any]:
        return {"shape": self.shape, "lr": self.lr, "weight_decay": self.weight_decay}

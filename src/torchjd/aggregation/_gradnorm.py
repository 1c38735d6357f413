r"""GradNorm: gradient normalization (Chen et al., 2018, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML).

Learned weights :math:`w_i(t)` (starting at 1) bring the norms of the weighted gradients
:math:`G^{(i)}(t) = \lVert \nabla w_i(t) L_i(t) \rVert = w_i(t) \lVert g_i \rVert` to a common
scale, raised for the tasks that train slower. With the inverse training rates
:math:`r_i(t) = \tilde L_i(t) / \operatorname{mean}_j \tilde L_j(t)`,
:math:`\tilde L_i(t) = L_i(t) / L_i(0)`, each step takes one gradient step on

.. math::

    L_{\text{grad}}(t) = \sum_{i=1}^m \big\lvert G^{(i)}(t) - \bar G(t)\, r_i(t)^\alpha \big\rvert,
    \qquad \bar G(t) = \operatorname{mean}_j G^{(j)}(t),

with the target :math:`\bar G(t)\, r_i(t)^\alpha` held constant, so that
:math:`\partial L_{\text{grad}} / \partial w_i = \operatorname{sign}(G^{(i)} - \bar G r_i^\alpha)
\lVert g_i \rVert`, then renormalises the weights to :math:`\sum_i w_i = m`.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd._stateful import Stateful
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_non_negative_float, check_positive_float
from torchjd.linalg import PSDMatrix


class GradNormWeighting(GramianWeighting, Stateful):
    r"""The weights :math:`w(t)` of GradNorm, read from the Gramian (:math:`\lVert g_i \rVert =
    \sqrt{G_{ii}}`) and the losses given to :meth:`record_losses`.

    Each call returns the current weights :math:`w(t)` (used for this step), then updates them to
    :math:`w(t + 1)` by one step of size ``lr`` on :math:`L_{\text{grad}}` (negative weights are
    clipped to zero before renormalisation). The paper computes the norms on the last shared layer;
    here they are those of the rows of the Jacobian whose Gramian is given. :meth:`reset` forgets
    the weights and :math:`L(0)`.

    :param alpha: The asymmetry :math:`\alpha \ge 0` (0: equal gradient norms).
    :param lr: The step size :math:`> 0` of the weights (it acts on gradient norms: scale it to
        them).

    >>> import torch
    >>> from torchjd.aggregation import GradNormWeighting
    >>> weighting = GradNormWeighting(lr=0.1)
    >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # gradient norms 2 and 1
    >>> weighting.record_losses(torch.tensor([1.0, 1.0]))
    >>> weighting(G)  # w(0); the weighted norms [2, 1] are then pulled towards their mean
    tensor([1., 1.])
    >>> weighting.record_losses(torch.tensor([0.5, 1.0]))
    >>> weighting(G)  # w(1) = [1 − 0.1 · 2, 1 + 0.1 · 1], renormalised to sum 2
    tensor([0.8421, 1.1579])
    """

    alpha = hyperparameter(
        "alpha", check_non_negative_float, r"The asymmetry :math:`\alpha \ge 0`."
    )
    lr = hyperparameter("lr", check_positive_float, "The step size (positive) of the weights.")

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha = alpha
        self.lr = lr
        self.reset()

    def reset(self) -> None:
        self._weights: Tensor | None = None
        self._initial_losses: Tensor | None = None
        self._losses: Tensor | None = None

    def record_losses(self, losses: Tensor) -> None:
        """Gives the losses :math:`L(t)` of the current step; call it before each call of the
        weighting (the first losses recorded are :math:`L(0)`)."""
        if not isinstance(losses, Tensor) or losses.ndim != 1 or not losses.is_floating_point():
            raise TypeError(
                "`losses` must be a 1-D floating-point torch.Tensor (one loss per row). Found "
                f"{_describe(losses)}."
            )
        if self._initial_losses is not None and losses.shape != self._initial_losses.shape:
            raise ValueError(
                f"`losses` must keep the shape of the first losses, "
                f"{tuple(self._initial_losses.shape)}. Found {tuple(losses.shape)}."
            )
        losses = losses.detach().clone()
        if self._initial_losses is None:
            self._initial_losses = losses
        self._losses = losses

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        if self._losses is None or self._initial_losses is None:
            raise RuntimeError(
                "GradNormWeighting needs the losses of the step: call `record_losses(losses)` "
                "before each call."
            )
        m = gramian.shape[0]
        if self._losses.shape[0] != m:
            raise ValueError(
                f"The recorded losses have {self._losses.shape[0]} entries, so the Gramian must be "
                f"[{self._losses.shape[0]}, {self._losses.shape[0]}]. Found {tuple(gramian.shape)}."
            )
        w = self._current_weights(gramian)
        self._weights = self._updated(w, gramian, self._losses, self._initial_losses)
        self._losses = None  # consumed: each step records its own losses
        return w

    def _current_weights(self, gramian: Tensor) -> Tensor:
        if self._weights is None:
            return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        return self._weights.to(gramian)

    def _updated(self, w: Tensor, gramian: Tensor, losses: Tensor, initial: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp_min(0.0).sqrt()
        ratios = losses.to(gramian) / initial.to(gramian)
        r = ratios / ratios.mean()
        G_i = w * norms
        target = G_i.mean() * r**self.alpha
        w_next = (w - self.lr * torch.sign(G_i - target) * norms).clamp_min(0.0)
        m = w.shape[0]
        total = w_next.sum()
        return torch.where(total > 0, m * w_next / total.where(total > 0, 1.0), 1.0)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lr": self.lr}


class GradNorm(GramianWeightedAggregator, Stateful):
    r"""The GradNorm aggregator: :math:`w(t)^\top J`, with the weights of
    :class:`GradNormWeighting`. Call :meth:`record_losses` with the losses before each call.

    :param alpha: The asymmetry :math:`\alpha \ge 0`.
    :param lr: The step size :math:`> 0` of the weights.
    """

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(GradNormWeighting(alpha=alpha, lr=lr))

    alpha = of_weighting(GradNormWeighting.alpha)
    lr = of_weighting(GradNormWeighting.lr)

    def record_losses(self, losses: Tensor) -> None:
        """Gives the losses of the current step (see :meth:`GradNormWeighting.record_losses`)."""
        weighting = self.gramian_weighting
        assert isinstance(weighting, GradNormWeighting)
        weighting.record_losses(losses)

    def reset(self) -> None:
        """Forgets the weights and the initial losses."""
        weighting = self.gramian_weighting
        assert isinstance(weighting, GradNormWeighting)
        weighting.reset()


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__}"

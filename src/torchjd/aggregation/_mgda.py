r"""MGDA: the Multiple Gradient Descent Algorithm (Désidéri, 2012), solved with the Frank-Wolfe
scheme of Sener & Koltun (2018, Algorithm 2).

The update is the minimum-norm point of the convex hull of the rows:

.. math::

    w = \operatorname*{argmin}_{w \in \Delta_m} w^\top G w, \qquad
    \mathcal A_{\text{MGDA}}(J) = J^\top w .

Frank-Wolfe starts from :math:`w = \mathbf 1 / m`; each step moves towards the vertex
:math:`e_t`, :math:`t = \operatorname{argmin}_r (G w)_r`, by the exact line-search step

.. math::

    \gamma = \operatorname{clip}_{[0, 1]}
    \frac{w^\top G w - (G w)_t}{w^\top G w - 2 (G w)_t + G_{tt}},

and stops after a step with :math:`\gamma < \epsilon` (that step is taken, as in the published
library) or after ``max_iters`` steps. When :math:`J^\top w = g_t` (the fraction is
:math:`0 / 0`: identical rows, a zero Gramian), the step is whole (:math:`\gamma = 1`, as in the
published library), and the iterations stop once :math:`w = e_t`, where every later step would
leave it.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_positive_float, check_positive_int
from torchjd.linalg import PSDMatrix

_CHECK_EVERY = 8  # steps between host synchronisations to test for convergence


class MGDAWeighting(GramianWeighting):
    r"""The weighting of :class:`MGDA`: the Frank-Wolfe approximation of
    :math:`\operatorname{argmin}_{w \in \Delta_m} w^\top G w`.

    :param epsilon: Step size :math:`\gamma` below which the iterations stop. Must be positive.
    :param max_iters: Maximum number of Frank-Wolfe steps. Must be positive.

    >>> import torch
    >>> from torchjd.aggregation import MGDAWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> MGDAWeighting()(J @ J.T)
    tensor([0.6000, 0.4000])
    """

    epsilon = hyperparameter(
        "epsilon",
        check_positive_float,
        r"The step size :math:`\gamma` below which the iterations stop (positive).",
    )
    max_iters = hyperparameter(
        "max_iters", check_positive_int, "The largest number of Frank-Wolfe steps (positive)."
    )

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.max_iters = max_iters

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G = gramian
        m = G.shape[0]
        w = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
        running = torch.ones((), dtype=torch.bool, device=G.device)
        epsilon = self.epsilon
        for step in range(1, self.max_iters + 1):
            Gw = G @ w
            t = torch.argmin(Gw)
            wGw = w @ Gw
            Gw_t = Gw[t]
            denominator = wGw - 2 * Gw_t + G[t, t]  # = |Jᵀw − g_t|² ≥ 0
            # 0 / 0 when g_t is Jᵀw itself: the whole step, as in the published library (a NaN of
            # a non-finite Gramian propagates)
            numerator = wGw - Gw_t
            degenerate = (numerator == 0.0) & (denominator == 0.0)
            gamma = torch.where(degenerate, 1.0, numerator / denominator).clamp(0.0, 1.0)
            still = (gamma == 1.0) & (w[t] == 1.0)  # w = e_t already: every later step the same
            step_size = torch.where(running, gamma, 0.0)
            w = (1 - step_size) * w
            w[t] += step_size
            running = running & (gamma >= epsilon) & ~still  # a step below epsilon is the last
            if step % _CHECK_EVERY == 0 and not bool(running):
                break
        return w

    def _params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "max_iters": self.max_iters}


class MGDA(GramianWeightedAggregator):
    r"""The MGDA aggregator (Désidéri, 2012): the minimum-norm element of the convex hull of the
    rows, found by Frank-Wolfe as in Sener & Koltun (2018).

    :param epsilon: Step size below which the Frank-Wolfe iterations stop. Must be positive.
    :param max_iters: Maximum number of Frank-Wolfe steps. Must be positive.

    >>> import torch
    >>> from torchjd.aggregation import MGDA
    >>> MGDA()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0., 1., 1.])
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon, max_iters))

    epsilon = of_weighting(MGDAWeighting.epsilon)
    max_iters = of_weighting(MGDAWeighting.max_iters)

r"""ExcessMTL: Robust Multi-Task Learning with Excess Risks (He et al., 2024, ICML).

The tasks are weighted by how far each is from its own optimum. The excess risk of task ``i`` is
estimated by a second-order expansion with a diagonal (AdaGrad-like) Hessian (Eqs. 6-7):

.. math::

    S_i \leftarrow S_i + g_i \odot g_i, \qquad
    r_i = g_i^\top \operatorname{diag}\big(\sqrt{S_i + \epsilon}\big)^{-1} g_i ,

with :math:`\epsilon = 10^{-7}`, and the weights take an exponentiated gradient step (Eq. 9),
relative to a baseline excess risk :math:`r^0`:

.. math::

    w_i \leftarrow \frac{w_i \exp(\eta\, r_i / r_i^0)}{\sum_j w_j \exp(\eta\, r_j / r_j^0)},
    \qquad w = \mathbf 1 / m \text{ at the start}.

During the first ``n_warmup_steps`` calls the weights stay uniform and :math:`r^0` is the mean
of the excess risks seen. With ``n_warmup_steps = 0``, as in the official implementation, the
first call sets :math:`r^0 = r` and its own step uses :math:`r` itself (not :math:`r / r^0`).
The state starts afresh when the shape of the matrix changes.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd import Stateful
from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import WeightedAggregator, Weighting, of_weighting
from torchjd.aggregation._checks import check_positive_float
from torchjd.aggregation._parameters import check_non_negative_int
from torchjd.linalg import Matrix

_EPSILON = 1e-7


class ExcessMTLWeighting(Weighting[Matrix], Stateful):
    r"""The weighting of :class:`ExcessMTL`: exponentiated steps driven by the excess risks,
    estimated from the accumulated squared gradients (kept between calls).

    :param robust_step_size: The step size :math:`\eta > 0` of the weights.
    :param n_warmup_steps: The number of first calls that only collect the baseline
        :math:`r^0`, with uniform weights.

    >>> import torch
    >>> from torchjd.aggregation import ExcessMTLWeighting
    >>> weighting = ExcessMTLWeighting()
    >>> weighting(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    tensor([0.1192, 0.8808])
    """

    robust_step_size = hyperparameter(
        "robust_step_size",
        check_positive_float,
        r"The step size :math:`\eta > 0` of the weights (the state is kept when it is set).",
    )
    n_warmup_steps = hyperparameter(
        "n_warmup_steps",
        check_non_negative_int,
        "The number of first calls with uniform weights (the state is kept when it is set).",
    )

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps
        self.reset()

    def reset(self) -> None:
        self.squared_sums: Tensor | None = None
        self.weights: Tensor | None = None
        self.baseline: Tensor | None = None
        self.warmup_total: Tensor | None = None
        self.step = 0

    def forward(self, matrix: Matrix, /) -> Tensor:
        J = matrix.detach()
        m = J.shape[0]
        if self.squared_sums is None or self.squared_sums.shape != J.shape:
            self.reset()
            self.squared_sums = torch.zeros_like(J)
            self.weights = torch.full((m,), 1.0 / m, dtype=J.dtype, device=J.device)
        assert self.weights is not None
        self.squared_sums = self.squared_sums + J**2
        excess_risks = (J**2 / (self.squared_sums + _EPSILON).sqrt()).sum(dim=1)
        self.step += 1
        if self.step <= self.n_warmup_steps:
            previous = 0.0 if self.warmup_total is None else self.warmup_total
            self.warmup_total = previous + excess_risks
            return self.weights.clone()
        if self.baseline is None:
            # No warm-up (also when n_warmup_steps was set to 0 during it): this call's risks, used
            # as they are.
            if self.warmup_total is None or self.n_warmup_steps == 0:
                self.baseline, relative = excess_risks, excess_risks
            else:
                self.baseline = self.warmup_total / self.n_warmup_steps
                relative = excess_risks / self.baseline
        else:
            relative = excess_risks / self.baseline
        # The normalised exponentiated step, as a softmax: no overflow for large risks.
        self.weights = torch.softmax(self.weights.log() + self.robust_step_size * relative, dim=0)
        return self.weights.clone()

    def _params(self) -> dict[str, Any]:
        return {"robust_step_size": self.robust_step_size, "n_warmup_steps": self.n_warmup_steps}

    def __str__(self) -> str:
        return repr(self)


class ExcessMTL(WeightedAggregator, Stateful):
    r"""The ExcessMTL aggregator (He et al., 2024): the rows combined with weights that grow with
    the estimated excess risk of their task.

    :param robust_step_size: The step size :math:`\eta > 0` of the weights.
    :param n_warmup_steps: The number of first calls with uniform weights, which set the
        baseline.

    >>> import torch
    >>> from torchjd.aggregation import ExcessMTL
    >>> ExcessMTL()(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    tensor([0.1192, 2.6424])
    """

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps))

    robust_step_size = of_weighting(ExcessMTLWeighting.robust_step_size)
    n_warmup_steps = of_weighting(ExcessMTLWeighting.n_warmup_steps)

    def reset(self) -> None:
        self.weighting.reset()  # type: ignore[operator]

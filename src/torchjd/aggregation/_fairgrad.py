r"""FairGrad: Fair Resource Allocation in Multi-Task Learning (Ban & Ji, 2024, ICML, Eq. 4 and
Algorithm 1).

Under :math:`\alpha`-fair allocation of the improvement :math:`g_i^\top d` among the tasks, the
update :math:`d = J^\top w` has weights :math:`w > 0` solving

.. math::

    G w = w^{-1/\alpha} \quad \text{(entrywise)} .

:math:`\alpha = 1` is proportional fairness (Nash-MTL's equation), :math:`\alpha \to \infty`
approaches max-min fairness. The system is solved to rounding accuracy by damped Newton steps on
the strictly convex :math:`\tfrac12 w^\top G w - \sum_i h(w_i)`, :math:`h'(t) = t^{-1/\alpha}`
(see :func:`~torchjd.linalg._power_equation.solve_power_equation`).
"""

from typing import Any

from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_positive_float, check_positive_int
from torchjd.linalg import PSDMatrix
from torchjd.linalg._power_equation import solve_power_equation

_DEFAULT_MAX_ITERS = 100


def _check_max_iters(max_iters: object, name: str) -> int | None:
    return None if max_iters is None else check_positive_int(max_iters, name)


class FairGradWeighting(GramianWeighting):
    r"""The weighting of :class:`FairGrad`: the positive solution of :math:`G w = w^{-1/\alpha}`.

    :param alpha: The fairness :math:`\alpha > 0`.
    :param max_iters: The largest number of Newton steps; 100 when None (a few are usually
        enough: the convergence is quadratic).

    >>> import torch
    >>> from torchjd.aggregation import FairGradWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> FairGradWeighting(alpha=1.0)(J @ J.T)
    tensor([0.5914, 0.4071])
    """

    alpha = hyperparameter("alpha", check_positive_float, r"The fairness :math:`\alpha > 0`.")
    max_iters = hyperparameter(
        "max_iters",
        _check_max_iters,
        "The largest number of Newton steps (positive); 100 when None.",
    )

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__()
        self.alpha = alpha
        self.max_iters = max_iters

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        max_iters = _DEFAULT_MAX_ITERS if self.max_iters is None else self.max_iters
        return solve_power_equation(gramian, 1.0 / self.alpha, max_iters)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "max_iters": self.max_iters}


class FairGrad(GramianWeightedAggregator):
    r"""The FairGrad aggregator (Ban & Ji, 2024): :math:`J^\top w` with
    :math:`G w = w^{-1/\alpha}`.

    :param alpha: The fairness :math:`\alpha > 0`.
    :param max_iters: The largest number of Newton steps; 100 when None.

    >>> import torch
    >>> from torchjd.aggregation import FairGrad
    >>> FairGrad(alpha=2.0)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0313, 0.7908, 0.7908])
    """

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__(FairGradWeighting(alpha, max_iters))

    alpha = of_weighting(FairGradWeighting.alpha)
    max_iters = of_weighting(FairGradWeighting.max_iters)

    def __str__(self) -> str:
        return f"{self.alpha}-FairGrad"

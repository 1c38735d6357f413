r"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023, "Dual-Balancing for Multi-Task
Learning", arXiv 2308.12029).

Two balancings. *Loss scale*: each task minimises :math:`\log \ell_i` instead of :math:`\ell_i`,
so the rows given to this aggregator must be the gradients :math:`\nabla \log \ell_i =
\nabla \ell_i / \ell_i` (e.g. the Jacobian of ``losses.log()``). *Gradient magnitude*: the rows are
averaged over time and rescaled to the largest norm. At step :math:`t = 1, 2, \dots`:

.. math::

    \hat g_{t,i} = \beta_t \hat g_{t-1,i} + (1 - \beta_t) g_{t,i}, \qquad
    d_t = \alpha_t \sum_{i=1}^m \frac{\hat g_{t,i}}{\lVert \hat g_{t,i} \rVert}, \qquad
    \alpha_t = \max_i \lVert \hat g_{t,i} \rVert,

with :math:`\hat g_0 = 0` and :math:`\beta_t = \beta / t^{\sigma_\beta}`.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Aggregator, _call_str
from torchjd.aggregation._checks import check_non_negative_float, check_tracked_shape
from torchjd.linalg import Matrix


def _check_beta(value: object, name: str) -> float:
    beta = check_non_negative_float(value, name)
    if beta >= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1). Found {name}={value!r}.")
    return beta


class DBMTL(Aggregator, Stateful):
    r"""The DB-MTL aggregator: :math:`\max_i \lVert \hat g_i \rVert \sum_i \hat g_i / \lVert \hat
    g_i \rVert`, with :math:`\hat g` the exponential moving average of the rows (a zero row of
    :math:`\hat g` contributes zero, not NaN).

    The rows should be the gradients of the *log*-losses (the loss-scale balancing of the paper).
    Its output combines the averaged rows, not the rows of the current matrix, so it is an
    aggregator and not a weighting. :meth:`reset` forgets the average and the step count. The
    matrix must keep its shape from one call to the next.

    :param beta: The averaging factor :math:`\beta \in [0, 1)` (0: no averaging).
    :param beta_sigma: The decay exponent :math:`\sigma_\beta \ge 0` of :math:`\beta_t`.

    >>> import torch
    >>> from torchjd.aggregation import DBMTL
    >>> aggregator = DBMTL(beta=0.0)
    >>> aggregator(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # both rows scaled to norm 2
    tensor([2., 2.])
    """

    beta = hyperparameter("beta", _check_beta, r"The averaging factor :math:`\beta \in [0, 1)`.")
    beta_sigma = hyperparameter(
        "beta_sigma",
        check_non_negative_float,
        r"The decay exponent :math:`\sigma_\beta \ge 0` of :math:`\beta_t`.",
    )

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.reset()

    def reset(self) -> None:
        self._step = 0
        self._average: Tensor | None = None

    def forward(self, matrix: Matrix, /) -> Tensor:
        g = matrix.detach()
        if self._average is None:
            average = torch.zeros_like(g)
        else:
            check_tracked_shape(self._average, g)
            average = self._average.to(g)
        self._step += 1
        beta_t = self.beta / self._step**self.beta_sigma
        average = beta_t * average + (1.0 - beta_t) * g
        self._average = average
        norms = average.norm(dim=1)
        positive = norms > 0
        inverse = torch.where(positive, 1.0 / norms.where(positive, 1.0), 0.0)
        alpha = norms.max()
        return alpha * (inverse @ average)

    def __repr__(self) -> str:
        return _call_str("DBMTL", {"beta": self.beta, "beta_sigma": self.beta_sigma})

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma}

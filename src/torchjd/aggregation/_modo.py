r"""MoDo: Multi-objective gradient with Double sampling (Chen et al., 2024, "Three-Way Trade-Off in
Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance", JMLR, Eq. 2.9a).

The weights are one projected-gradient step per call on :math:`\tfrac12 \|J^\top \lambda\|^2 +
\tfrac\rho2 \|\lambda\|^2` over the simplex, with the Gramian estimated without bias from two
independent mini-batches, :math:`A = J_1 J_2^\top`:

.. math::

    \lambda_{t+1} = \Pi_{\Delta_m}\big(\lambda_t - \gamma\, (A \lambda_t + \rho \lambda_t)\big),
    \qquad \lambda_0 = \mathbf 1 / m .

The input ``A`` is square but, in general, neither symmetric nor positive semi-definite.
:math:`\lambda` starts afresh when the number of rows changes.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd import Stateful
from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import Weighting
from torchjd.aggregation._checks import check_non_negative_float, check_positive_float
from torchjd.aggregation._parameters import check_square
from torchjd.linalg import Matrix
from torchjd.linalg._simplex import project_onto_simplex


class MoDoWeighting(Weighting[Matrix], Stateful):
    r"""The weights :math:`\lambda_{t+1} = \Pi_{\Delta}(\lambda_t - \gamma (A \lambda_t +
    \rho \lambda_t))` of MoDo, from :math:`A = J_1 J_2^\top` (two independent mini-batches).

    :param gamma: The step size :math:`\gamma > 0` of the weights.
    :param rho: The regularisation :math:`\rho \ge 0`.

    >>> import torch
    >>> from torchjd.aggregation import MoDoWeighting
    >>> weighting = MoDoWeighting(gamma=0.1, rho=0.1)
    >>> weighting(torch.tensor([[2.0, 0.0], [1.0, 3.0]]))
    tensor([0.5500, 0.4500])
    """

    lambda_: Tensor | None
    gamma = hyperparameter(
        "gamma",
        check_positive_float,
        r"The step size :math:`\gamma > 0` (:math:`\lambda` is kept when it is set).",
    )
    rho = hyperparameter("rho", check_non_negative_float, r"The regularisation :math:`\rho \ge 0`.")

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma
        self.rho = rho
        self.register_buffer("lambda_", None, persistent=False)

    def reset(self) -> None:
        self.lambda_ = None

    def _check_stat(self, stat: Tensor) -> None:
        check_square(stat, "matrix")

    def forward(self, matrix: Matrix, /) -> Tensor:
        A = matrix
        m = A.shape[0]
        lambda_ = self.lambda_
        if lambda_ is None or lambda_.shape[0] != m:
            lambda_ = torch.full((m,), 1.0 / m, dtype=A.dtype, device=A.device)
        lambda_ = lambda_.to(dtype=A.dtype, device=A.device)
        lambda_ = project_onto_simplex(lambda_ - self.gamma * (A @ lambda_ + self.rho * lambda_))
        self.lambda_ = lambda_.detach()
        return lambda_

    def _params(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "rho": self.rho}

    def __str__(self) -> str:
        return repr(self)

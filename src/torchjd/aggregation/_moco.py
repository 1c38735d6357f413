r"""MoCo: multi-objective gradient correction (Fernando et al., 2023, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR).

MGDA's weights computed from stochastic gradients are biased. MoCo tracks the true gradients with
a moving average :math:`Y` of the matrices, and the weights :math:`\lambda` with one projected
gradient step per iteration on MGDA's objective :math:`\frac 1 2 \lVert Y^\top \lambda \rVert^2 +
\frac \rho 2 \lVert \lambda \rVert^2`. At step :math:`t = 1, 2, \dots`:

.. math::

    Y_t = Y_{t-1} - \beta_t (Y_{t-1} - J_t), \qquad
    \lambda_t = \Pi_\Delta\big(\lambda_{t-1} - \gamma_t (Y_t Y_t^\top + \rho I) \lambda_{t-1}\big),
    \qquad d_t = Y_t^\top \lambda_t ,

with :math:`\beta_t = \beta / t^{\sigma_\beta}`, :math:`\gamma_t = \gamma / t^{\sigma_\gamma}` and
:math:`\Pi_\Delta` the projection onto the probability simplex. :math:`Y` starts at the first
matrix (:math:`Y_1 = J_1`) and :math:`\lambda` at :math:`\mathbf 1 / m`.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Aggregator, _call_str
from torchjd.aggregation._checks import (
    check_non_negative_float,
    check_positive_float,
    check_tracked_shape,
)
from torchjd.linalg import Matrix
from torchjd.linalg._simplex import project_onto_simplex


def _check_beta(value: object, name: str) -> float:
    beta = check_positive_float(value, name)
    if beta > 1.0:
        raise ValueError(f"`{name}` must be in (0, 1]. Found {name}={value!r}.")
    return beta


class MoCo(Aggregator, Stateful):
    r"""The MoCo aggregator: :math:`Y_t^\top \lambda_t`, with :math:`Y_t` the moving average of the
    matrices and :math:`\lambda_t` the weights after one projected gradient step on
    :math:`\frac 1 2 \lambda^\top (Y_t Y_t^\top + \rho I) \lambda`.

    Its output combines the tracked rows :math:`Y_t`, not the rows of the current matrix, so it is
    an aggregator and not a weighting. :meth:`reset` forgets :math:`Y`, :math:`\lambda` and the
    step count. The matrix must keep its shape from one call to the next.

    :param beta: The tracking rate :math:`\beta \in (0, 1]` of :math:`Y`.
    :param beta_sigma: The decay exponent :math:`\sigma_\beta \ge 0` of :math:`\beta_t`.
    :param gamma: The step size :math:`\gamma > 0` of :math:`\lambda`.
    :param gamma_sigma: The decay exponent :math:`\sigma_\gamma \ge 0` of :math:`\gamma_t`.
    :param rho: The regularisation :math:`\rho \ge 0` of :math:`\lambda`.

    >>> import torch
    >>> from torchjd.aggregation import MoCo
    >>> aggregator = MoCo()
    >>> aggregator(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # λ = Π([1/2, 1/2] − 0.1 [1/2, 2])
    tensor([0.5750, 0.8500])
    """

    beta = hyperparameter(
        "beta", _check_beta, r"The tracking rate :math:`\beta \in (0, 1]` of :math:`Y`."
    )
    beta_sigma = hyperparameter(
        "beta_sigma",
        check_non_negative_float,
        r"The decay exponent :math:`\sigma_\beta \ge 0` of :math:`\beta_t`.",
    )
    gamma = hyperparameter(
        "gamma",
        check_positive_float,
        r"The step size :math:`\gamma > 0` of :math:`\lambda`.",
    )
    gamma_sigma = hyperparameter(
        "gamma_sigma",
        check_non_negative_float,
        r"The decay exponent :math:`\sigma_\gamma \ge 0` of :math:`\gamma_t`.",
    )
    rho = hyperparameter(
        "rho",
        check_non_negative_float,
        r"The regularisation :math:`\rho \ge 0` of :math:`\lambda`.",
    )

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho
        self.reset()

    def reset(self) -> None:
        self._step = 0
        self._Y: Tensor | None = None
        self._lambda: Tensor | None = None

    def forward(self, matrix: Matrix, /) -> Tensor:
        J = matrix.detach()
        if self._Y is None or self._lambda is None:
            Y = J
            lambda_ = torch.full((J.shape[0],), 1.0 / J.shape[0], dtype=J.dtype, device=J.device)
        else:
            check_tracked_shape(self._Y, J)
            Y, lambda_ = self._Y.to(J), self._lambda.to(J)
        self._step += 1
        t = self._step
        if t > 1:
            Y = Y - self.beta / t**self.beta_sigma * (Y - J)
        gamma_t = self.gamma / t**self.gamma_sigma
        lambda_ = project_onto_simplex(
            lambda_ - gamma_t * (Y @ (Y.T @ lambda_) + self.rho * lambda_)
        )
        self._Y, self._lambda = Y, lambda_
        return lambda_ @ Y

    def __repr__(self) -> str:
        return _call_str("MoCo", self._params())

    def _params(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
            "gamma": self.gamma,
            "gamma_sigma": self.gamma_sigma,
            "rho": self.rho,
        }

r"""SDMGrad: Stochastic Direction-oriented Multi-objective Gradient descent (Xiao et al., 2023,
"Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS, Algorithm 1).

SDMGrad looks for the direction closest to a preferred direction :math:`g_0 = J^\top \tilde w`
among the regularised combinations of the gradients:

.. math::

    w^\star = \operatorname*{argmin}_{w \in \Delta_m}
    \tfrac12 \big\| J^\top w + \lambda g_0 \big\|^2, \qquad
    d = \frac{J^\top w^\star + \lambda g_0}{1 + \lambda},

so the returned weights are :math:`(w + \lambda \tilde w) / (1 + \lambda)`. The Gramian in the
gradient :math:`A w + \lambda A \tilde w` is estimated without bias from two independent
mini-batches, :math:`A = J_1 J_2^\top`, first divided by :math:`s^2`, with ``s`` the mean of the
square roots of the non-negative diagonal entries of ``A`` (unless ``s = 0``), so that ``lr``
does not depend on the scale of the gradients (paper, Section 6.1). Each call takes ``n_iter``
projected steps of SGD with momentum (the buffer starts at zero at each call), from the
:math:`w` of the previous call (:math:`\mathbf 1 / m` at the start):

.. math::

    b \leftarrow \mu b + (A w + \lambda A \tilde w), \qquad w \leftarrow \Pi_{\Delta_m}(w - \eta b).
"""

from typing import Any

import torch
from torch import Tensor

from torchjd import Stateful
from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import Weighting
from torchjd.aggregation._checks import (
    check_length,
    check_non_negative_float,
    check_positive_float,
    check_positive_int,
    vector_hyperparameter,
)
from torchjd.aggregation._parameters import (
    check_square,
    check_unit_interval_open_above,
)
from torchjd.linalg import Matrix
from torchjd.linalg._simplex import project_onto_simplex


class SDMGradWeighting(Weighting[Matrix], Stateful):
    r"""The weights :math:`(w + \lambda \tilde w) / (1 + \lambda)` of SDMGrad, from
    :math:`A = J_1 J_2^\top` (two independent mini-batches); keeps :math:`w` between calls.

    :param lr: The step size :math:`\eta > 0` of the inner SGD.
    :param momentum: The momentum :math:`\mu \in [0, 1)` of the inner SGD.
    :param n_iter: The number of inner steps per call.
    :param lambda_: The pull :math:`\lambda \ge 0` towards the preferred direction.
    :param pref_vector: The preference :math:`\tilde w` (shape ``[m]``); the mean when None.

    >>> import torch
    >>> from torchjd.aggregation import SDMGradWeighting
    >>> weighting = SDMGradWeighting(lr=0.1)
    >>> weighting(torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
    tensor([0.1154, 0.8846])
    """

    w: Tensor | None
    lr = hyperparameter(
        "lr", check_positive_float, r"The step size :math:`\eta > 0` of the inner SGD."
    )
    momentum = hyperparameter(
        "momentum",
        check_unit_interval_open_above,
        r"The momentum :math:`\mu \in [0, 1)` of the inner SGD.",
    )
    n_iter = hyperparameter(
        "n_iter", check_positive_int, "The number of inner steps per call (positive)."
    )
    lambda_ = hyperparameter(
        "lambda_",
        check_non_negative_float,
        r"The pull :math:`\lambda \ge 0` towards the preferred direction.",
    )
    pref_vector = vector_hyperparameter(
        "pref_vector",
        r"The preference :math:`\tilde w` ``[m]`` (a detached copy of the one set), or None for "
        r"the mean. :math:`w` is kept when a hyperparameter is set.",
    )

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.n_iter = n_iter
        self.lambda_ = lambda_
        self.register_buffer("_pref_vector", None, persistent=False)
        self.pref_vector = pref_vector
        self.register_buffer("w", None, persistent=False)

    def reset(self) -> None:
        self.w = None

    def _check_stat(self, stat: Tensor) -> None:
        check_square(stat, "matrix")

    def forward(self, matrix: Matrix, /) -> Tensor:
        A = matrix
        m = A.shape[0]
        pref_vector = self.pref_vector
        if pref_vector is None:
            pref = torch.full((m,), 1.0 / m, dtype=A.dtype, device=A.device)
        else:
            check_length(pref_vector, "pref_vector", m, "matrix")
            pref = pref_vector.to(dtype=A.dtype, device=A.device)
        s = A.diagonal().clamp_min(0.0).sqrt().mean()
        A = A / torch.where(s > 0, s, 1.0) ** 2
        w = self.w
        if w is None or w.shape[0] != m:
            w = torch.full((m,), 1.0 / m, dtype=A.dtype, device=A.device)
        w = w.to(dtype=A.dtype, device=A.device)
        lr, momentum, lambda_ = self.lr, self.momentum, self.lambda_
        pull = lambda_ * (A @ pref)
        buffer = torch.zeros_like(w)
        for _ in range(self.n_iter):
            buffer = momentum * buffer + (A @ w + pull)
            w = project_onto_simplex(w - lr * buffer)
        self.w = w.detach()
        return (w + lambda_ * pref) / (1 + lambda_)

    def _params(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "n_iter": self.n_iter,
            "lambda_": self.lambda_,
            "pref_vector": self.pref_vector,
        }

    def __str__(self) -> str:
        return repr(self)

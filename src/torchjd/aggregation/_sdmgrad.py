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
from torchjd.aggregation._bases import Weighting
from torchjd.aggregation._checks import (
    check_length,
    check_non_negative_float,
    check_positive_float,
    check_positive_int,
    check_vector,
)
from torchjd.aggregation._parameters import (
    check_float_in,
    check_square,
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

    pref_vector: Tensor | None
    w: Tensor | None

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lr = check_positive_float(lr, "lr")
        self.momentum = check_float_in(
            momentum, "momentum", 0.0, 1.0, low_open=False, high_open=True
        )
        self.n_iter = check_positive_int(n_iter, "n_iter")
        self.lambda_ = check_non_negative_float(lambda_, "lambda_")
        if pref_vector is not None:
            pref_vector = check_vector(pref_vector, "pref_vector", non_negative=False)
        self.register_buffer("pref_vector", pref_vector, persistent=False)
        self.register_buffer("w", None, persistent=False)

    def reset(self) -> None:
        self.w = None

    def _check_stat(self, stat: Tensor) -> None:
        check_square(stat, "matrix")

    def forward(self, matrix: Matrix, /) -> Tensor:
        A = matrix
        m = A.shape[0]
        if self.pref_vector is None:
            pref = torch.full((m,), 1.0 / m, dtype=A.dtype, device=A.device)
        else:
            check_length(self.pref_vector, "pref_vector", m, "matrix")
            pref = self.pref_vector.to(dtype=A.dtype, device=A.device)
        s = A.diagonal().clamp_min(0.0).sqrt().mean()
        A = A / torch.where(s > 0, s, 1.0) ** 2
        w = self.w
        if w is None or w.shape[0] != m:
            w = torch.full((m,), 1.0 / m, dtype=A.dtype, device=A.device)
        w = w.to(dtype=A.dtype, device=A.device)
        pull = self.lambda_ * (A @ pref)
        buffer = torch.zeros_like(w)
        for _ in range(self.n_iter):
            buffer = self.momentum * buffer + (A @ w + pull)
            w = project_onto_simplex(w - self.lr * buffer)
        self.w = w.detach()
        return (w + self.lambda_ * pref) / (1 + self.lambda_)

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

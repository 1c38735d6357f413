r"""GradDrop: Gradient Sign Dropout (Chen et al., 2020, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS, Algorithm 1, lines 10-15).

For each coordinate ``k``, the positive sign purity and the kept sign are

.. math::

    P_k = \frac12 \Big(1 + \frac{\sum_i J_{ik}}{\sum_i |J_{ik}|}\Big), \qquad
    M_{ik} = \mathbb 1[f(P_k) > U_k]\, \mathbb 1[J_{ik} > 0]
           + \mathbb 1[f(P_k) < U_k]\, \mathbb 1[J_{ik} < 0],

with :math:`U_k \sim \mathcal U(0, 1)` drawn once per coordinate, and the output is

.. math::

    \mathcal A(J)_k = \sum_i \big(\ell_i + (1 - \ell_i) M_{ik}\big) J_{ik}

for the leak :math:`\ell` (zero by default). A column of zeros has :math:`P_k = 1/2`.
``U`` is ``torch.rand(n)`` in the matrix's dtype, from torch's global generator of its device.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import Aggregator, _call_str, vector_suffix
from torchjd.aggregation._checks import check_length, vector_hyperparameter
from torchjd.linalg import Matrix


def _identity(P: Tensor) -> Tensor:
    return P


def _check_f(f: object, name: str) -> Callable[[Tensor], Tensor]:
    if not callable(f):
        raise TypeError(f"`{name}` must be callable (a function of a tensor). Found {f!r}.")
    return f


class GradDrop(Aggregator):
    r"""The GradDrop aggregator (Chen et al., 2020): in each coordinate, keeps the positive or
    the negative entries at random, with a probability of keeping the positive ones that grows
    with their share.

    :param f: A monotonically increasing function applied to the purity ``P`` (a tensor
        ``[n]``); the identity by default.
    :param leak: The leak :math:`\ell` (shape ``[m]``): the fraction of each row kept whatever
        its sign. None means no leak.

    >>> import torch
    >>> from torchjd.aggregation import GradDrop
    >>> _ = torch.manual_seed(0)
    >>> GradDrop()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([6., 2., 2.])
    """

    f = hyperparameter(
        "f",
        _check_f,
        "The increasing function applied to the purity ``P`` ``[n]``.",
    )
    leak = vector_hyperparameter(
        "leak",
        r"The leak :math:`\ell` ``[m]`` (a detached copy of the vector set), or None for no leak.",
    )

    def __init__(
        self, f: Callable[[Tensor], Tensor] = _identity, leak: Tensor | None = None
    ) -> None:
        super().__init__()
        self.f = f
        self.register_buffer("_leak", None, persistent=False)
        self.leak = leak

    def forward(self, matrix: Matrix, /) -> Tensor:
        J = matrix
        leak = self.leak
        if leak is None:
            leak = torch.zeros(J.shape[0], dtype=J.dtype, device=J.device)
        else:
            check_length(leak, "leak", J.shape[0], "matrix")
            leak = leak.to(dtype=J.dtype, device=J.device)
        total_abs = J.abs().sum(dim=0)
        P = 0.5 * (1 + J.sum(dim=0) / total_abs.where(total_abs > 0, 1.0))
        U = torch.rand(J.shape[1], dtype=J.dtype, device=J.device)
        fP = self.f(P)
        M = ((fP > U) & (J > 0)) | ((fP < U) & (J < 0))
        return ((leak.unsqueeze(1) + (1 - leak.unsqueeze(1)) * M) * J).sum(dim=0)

    def __repr__(self) -> str:
        return _call_str("GradDrop", {"f": self.f, "leak": self.leak})

    def __str__(self) -> str:
        return "GradDrop" + vector_suffix(self.leak)

    def _params(self) -> dict[str, Any]:
        return {"f": self.f, "leak": self.leak}

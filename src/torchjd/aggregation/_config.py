r"""ConFIG: Conflict-Free Inverse Gradients (Liu et al., 2024, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", Eq. 2).

With the unit rows :math:`u_i = g_i / \|g_i\|` (zero rows stay zero) and a preference ``p``
(ones by default), the direction has the prescribed cosines with every gradient, and its length
is the sum of the projections of the gradients on it:

.. math::

    v = U^{+} p, \qquad \hat v = \frac{v}{\|v\|}, \qquad
    \mathcal A_{\text{ConFIG}}(J) = \Big(\sum_{i=1}^m g_i^\top \hat v\Big)\, \hat v ,

where :math:`U^{+}` is the pseudo-inverse of the matrix of unit rows (the least-norm solution of
:math:`U v = p`). It is not a weighting of the Gramian: it needs the rows themselves.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd.aggregation._bases import Aggregator, _call_str, vector_suffix
from torchjd.aggregation._checks import check_length, vector_hyperparameter
from torchjd.aggregation._non_finite import finite_stand_in, nan_unless
from torchjd.linalg import Matrix


class ConFIG(Aggregator):
    r"""The ConFIG aggregator (Liu et al., 2024): the direction with equal (or
    preference-weighted) cosines with every row, scaled by the sum of the rows' projections on it.

    :param pref_vector: The targets ``p`` of :math:`U v = p` (shape ``[m]``); ones when None.

    >>> import torch
    >>> from torchjd.aggregation import ConFIG
    >>> ConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1588, 2.0706, 2.0706])
    """

    pref_vector = vector_hyperparameter(
        "pref_vector",
        "The targets ``p`` ``[m]`` (a detached copy of the vector set), or None for ones.",
    )

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("_pref_vector", None, persistent=False)
        self.pref_vector = pref_vector

    def forward(self, matrix: Matrix, /) -> Tensor:
        J, finite = finite_stand_in(matrix)
        m = J.shape[0]
        pref_vector = self.pref_vector
        if pref_vector is None:
            p = torch.ones(m, dtype=J.dtype, device=J.device)
        else:
            check_length(pref_vector, "pref_vector", m, "matrix")
            p = pref_vector.to(dtype=J.dtype, device=J.device)
        norms = J.norm(dim=1, keepdim=True)
        U = J / norms.where(norms > 0, 1.0)
        v = torch.linalg.pinv(U) @ p
        norm_v = v.norm()
        v_hat = v / norm_v.where(norm_v > 0, 1.0)
        return nan_unless(finite, (J @ v_hat).sum() * v_hat)

    def __repr__(self) -> str:
        return _call_str("ConFIG", self._params())

    def _params(self) -> dict[str, Any]:
        return {"pref_vector": self.pref_vector}

    def __str__(self) -> str:
        return "ConFIG" + vector_suffix(self.pref_vector)

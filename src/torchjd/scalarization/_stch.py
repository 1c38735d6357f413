r"""STCH, smooth Tchebycheff scalarization (Lin et al., 2024, "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization", ICML):

.. math::

    g_\mu(L \mid \lambda) = \mu \log \sum_{i=1}^K \exp\Big(\frac{\lambda_i (L_i - z_i)}{\mu}\Big),

a smooth approximation of the (weighted, shifted) Tchebycheff scalarization
:math:`\max_i \lambda_i (L_i - z_i)`, which it upper-bounds within :math:`\mu \log K`.
"""

from typing import Any

from torch import Tensor

from torchjd.aggregation._checks import check_positive_float
from torchjd.scalarization._checks import check_preference_and_reference, check_same_shape
from torchjd.scalarization._scalarizer import Scalarizer


class STCH(Scalarizer):
    r""":math:`\mu \log \sum_i \exp(\lambda_i (L_i - z_i) / \mu)` over all entries of the values.

    :param mu: The smoothing :math:`\mu > 0`; the Tchebycheff :math:`\max_i \lambda_i (L_i - z_i)`
        when :math:`\mu \to 0`.
    :param weights: The preference :math:`\lambda`, a finite tensor of the shape of the values;
        :math:`1/K` for each of the :math:`K` entries when None.
    :param reference: The reference (ideal) point :math:`z`, of the shape of the values; zero when
        None.

    >>> import torch
    >>> from torchjd.scalarization import STCH
    >>> STCH(0.5, torch.tensor([1.0, 2.0, 3.0]))(torch.tensor([1.0, 2.0, 4.0]))
    tensor(12.)
    """

    weights: Tensor | None
    reference: Tensor | None

    def __init__(
        self, mu: float, weights: Tensor | None = None, reference: Tensor | None = None
    ) -> None:
        super().__init__()
        self.mu = check_positive_float(mu, "mu")
        weights, reference = check_preference_and_reference(weights, reference)
        self.register_buffer("weights", weights)
        self.register_buffer("reference", reference)

    def forward(self, values: Tensor, /) -> Tensor:
        shifted = values
        if self.reference is not None:
            check_same_shape(values, tuple(self.reference.shape), "reference")
            shifted = values - self.reference.to(values)
        if self.weights is None:
            weighted = shifted / values.numel()
        else:
            check_same_shape(values, tuple(self.weights.shape), "weights")
            weighted = self.weights.to(values) * shifted
        return self.mu * (weighted.flatten() / self.mu).logsumexp(dim=0)

    def _params(self) -> dict[str, Any]:
        return {"mu": self.mu, "weights": self.weights, "reference": self.reference}

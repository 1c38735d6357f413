r"""Normalized: a weighting applied to the rows rescaled to unit norm (per-objective gradient
normalisation, e.g. before UPGrad).

With :math:`D = \operatorname{diag}(\lVert g_1 \rVert, \dots, \lVert g_m \rVert)`
(:math:`\lVert g_i \rVert = \sqrt{G_{ii}}`), the normalised rows :math:`\hat J = D^{+} J` have the
Gramian :math:`\hat G = D^{+} G D^{+}`, i.e. :math:`\hat G_{ij} = G_{ij} / (\lVert g_i \rVert
\lVert g_j \rVert)`, where :math:`D^{+}` inverts the non-zero norms and keeps zero for a zero row
(whose normalised row is zero: no NaN). If :math:`v = W(\hat G)` are the inner weighting's weights
of the normalised rows, the weights of the original rows are

.. math::

    w = D^{+} v, \quad\text{i.e.}\quad w_i = v_i / \lVert g_i \rVert \ (0 \text{ for a zero row}),
    \qquad\text{so that}\qquad w^\top J = v^\top \hat J .

The combination :math:`w^\top J` is therefore invariant to rescaling any row of :math:`J` by a
positive factor.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd.aggregation._bases import (
    GramianWeighting,
    Weighting,
    call_unchecked,
    check_weighting,
)
from torchjd.linalg import PSDMatrix


class Normalized(GramianWeighting):
    r"""The weights :math:`w = D^{+} W(D^{+} G D^{+})` with
    :math:`D = \operatorname{diag}(\sqrt{G_{ii}})`: ``weighting`` applied to the Gramian of the
    unit-norm rows, its weights divided by the rows' norms (zero for zero rows), so that
    :math:`w^\top J` is the inner weighting's combination of the normalised rows.

    :param weighting: The :class:`Weighting` of the Gramian of the normalised rows.

    >>> import torch
    >>> from torchjd.aggregation import GramianWeightedAggregator, MeanWeighting, Normalized
    >>> J = torch.tensor([[3.0, 4.0], [0.0, 10.0]])
    >>> Normalized(MeanWeighting())(J @ J.T)  # [1/2 / 5, 1/2 / 10]
    tensor([0.1000, 0.0500])
    >>> GramianWeightedAggregator(Normalized(MeanWeighting()))(J)  # mean of the unit rows
    tensor([0.3000, 0.9000])
    """

    def __init__(self, weighting: Weighting[PSDMatrix]) -> None:
        super().__init__()
        check_weighting(weighting, "weighting")
        self.weighting = weighting

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        norms = gramian.diagonal().clamp_min(0.0).sqrt()
        positive = norms > 0
        inverse = torch.where(positive, 1.0 / norms.where(positive, 1.0), 0.0)
        normalized_gramian = inverse.unsqueeze(1) * gramian * inverse.unsqueeze(0)
        v = call_unchecked(self.weighting, normalized_gramian)  # symmetric when G is
        return inverse * v

    def _params(self) -> dict[str, Any]:
        return {"weighting": self.weighting}

    def _str_suffix(self) -> str:
        return f"({self.weighting})"

r"""GeometricMean, the geometric loss strategy (Chennupati et al., 2019, "MultiNet++: Multi-Stream
Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops):

.. math::

    \mathcal L_{\text{GLS}} = \Big(\prod_{i=1}^K L_i\Big)^{1/K}
    = \exp\Big(\frac 1 K \sum_{i=1}^K \log L_i\Big).
"""

from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer


class GeometricMean(Scalarizer):
    r"""The geometric mean :math:`\big(\prod_{i=1}^K L_i\big)^{1/K}` of the values, computed as
    :math:`\exp\big(\frac 1 K \sum_i \log L_i\big)` so that the product neither underflows nor
    overflows. Its gradient is :math:`\frac{\mathcal L_{\text{GLS}}}{K} \sum_i \nabla L_i / L_i`:
    each loss is weighted by the inverse of its value.

    The values must be non-negative (a zero gives zero, with an undefined gradient).

    >>> import torch
    >>> from torchjd.scalarization import GeometricMean
    >>> GeometricMean()(torch.tensor([1.0, 2.0, 4.0]))
    tensor(2.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        if bool((values < 0).any()):
            raise ValueError(
                "GeometricMean is defined for non-negative values only. Found a negative entry in "
                f"`values`: min = {float(values.min()):.4g}."
            )
        return values.log().mean().exp()

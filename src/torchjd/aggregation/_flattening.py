r"""Flattening: a weighting of the Gramian, applied to a generalized Gramian.

The objectives :math:`f_{i_1 \dots i_k}` are flattened (row-major) into :math:`M = m_1 \cdots m_k`
rows, the weighting is applied to their :math:`[M, M]` Gramian, and the :math:`M` weights are
reshaped back to :math:`[m_1, \dots, m_k]`.
"""

from torch import Tensor

from torchjd.aggregation._bases import Weighting, check_weighting
from torchjd.aggregation._generalized_weighting import GeneralizedWeighting, flattened
from torchjd.linalg import PSDMatrix


class Flattening(GeneralizedWeighting):
    r"""The :class:`GeneralizedWeighting` that applies ``weighting`` to the flattened Gramian
    :math:`[M, M]` and reshapes its weights to :math:`[m_1, \dots, m_k]`.

    :param weighting: The :class:`Weighting` of a Gramian ``[M, M]``.

    >>> import torch
    >>> from torchjd.aggregation import Flattening, MeanWeighting
    >>> J = torch.randn(2, 3, 5)  # 2 × 3 objectives, 5 parameters
    >>> generalized_gramian = torch.einsum("abp,dcp->abcd", J, J)  # [2, 3, 3, 2]
    >>> Flattening(MeanWeighting())(generalized_gramian)
    tensor([[0.1667, 0.1667, 0.1667],
            [0.1667, 0.1667, 0.1667]])
    """

    def __init__(self, weighting: Weighting[PSDMatrix]) -> None:
        super().__init__()
        check_weighting(weighting, "weighting")
        self.weighting = weighting

    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        k = generalized_gramian.ndim // 2
        weights = self.weighting(flattened(generalized_gramian))
        return weights.reshape(generalized_gramian.shape[:k])

    def __repr__(self) -> str:
        return f"Flattening(weighting={self.weighting!r})"

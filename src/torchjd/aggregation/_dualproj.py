r"""DualProj: the projection of the preference-weighted combination of the rows onto their dual
cone (Quinton & Rey, 2024, arXiv 2406.16232, §4, inspired by Lopez-Paz & Ranzato's GEM, 2017).

.. math::

    \mathcal A_{\text{DualProj}}(J) = \pi_J(J^\top p) = J^\top v(p),
    \qquad v(p) = \operatorname*{argmin}_{v \ge p} v^\top G v .
"""

from torch import Tensor

from torchjd.aggregation._bases import GramianWeightedAggregator
from torchjd.aggregation._pref_vector import ProjectionWeighting
from torchjd.linalg import DualConeProjector, PSDMatrix


class DualProjWeighting(ProjectionWeighting):
    r"""The weighting of :class:`DualProj`: :math:`w = \operatorname{argmin}_{v \ge p} v^\top G v`.

    :param pref_vector: The preference :math:`p \ge 0` (shape ``[m]``); the mean when None.
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`;
        :class:`~torchjd.linalg.TorchProjector` when None.

    >>> import torch
    >>> from torchjd.aggregation import DualProjWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> DualProjWeighting()(J @ J.T)
    tensor([0.6109, 0.5000])
    """

    def __init__(
        self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None
    ) -> None:
        super().__init__(pref_vector, projector)

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        return self.projector(self.preference(gramian), gramian)


class DualProj(GramianWeightedAggregator):
    r"""The DualProj aggregator: the preference-weighted combination of the rows (their mean by
    default), projected onto the dual cone of the rows, so that it conflicts with none of them.

    :param pref_vector: The preference :math:`p \ge 0` (shape ``[m]``); the mean when None.
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`;
        :class:`~torchjd.linalg.TorchProjector` when None.

    >>> import torch
    >>> from torchjd.aggregation import DualProj
    >>> DualProj()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5563, 1.1109, 1.1109])
    """

    def __init__(
        self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, projector))

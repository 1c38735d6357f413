r"""DualProj: the projection of the preference-weighted combination of the rows onto their dual
cone (Quinton & Rey, 2024, arXiv 2406.16232, §4, inspired by Lopez-Paz & Ranzato's GEM, 2017).

.. math::

    \mathcal A_{\text{DualProj}}(J) = \pi_J(J^\top p) = J^\top v(p),
    \qquad v(p) = \operatorname*{argmin}_{v \ge p} v^\top G v .
"""

from torch import Tensor

from torchjd.aggregation._bases import GramianWeightedAggregator, of_weighting
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

    pref_vector = ProjectionWeighting.pref_vector  # (its own attribute, as published)
    projector = ProjectionWeighting.projector

    def __init__(
        self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None
    ) -> None:
        super().__init__(pref_vector, projector)

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        return self.projector(self.preference(gramian), gramian)


class DualProj(GramianWeightedAggregator):
    r"""The DualProj aggregator: the preference-weighted combination of the rows (their mean by
    default), projected onto the dual cone of the rows, so that it conflicts with none of them.

    **Non-conflict and the defaults.** The default projector regularises the problem as the paper
    does (Gramian divided by its trace, ``1e-4`` added to its diagonal, projection off below a
    trace of ``1e-4``), so the output can still conflict with rows whose gradient is small against
    the others (see :class:`UPGrad` for measured figures). ``DualProj(projector=
    TorchProjector(norm_eps=0.0, reg_eps=0.0))`` is the exact mode: no conflict on any Jacobian
    (:math:`J_i \cdot d \ge -10^{-8} \|J_i\| \max_j \|J_j\|` in float64), for one projection
    instead of UPGrad's ``m``: about the default's cost on nonsingular Gramians (fewer rows than
    columns), a few times it on singular ones (see :class:`UPGrad`).

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

    pref_vector = of_weighting(ProjectionWeighting.pref_vector)
    projector = of_weighting(ProjectionWeighting.projector)

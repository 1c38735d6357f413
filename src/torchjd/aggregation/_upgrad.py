r"""UPGrad: Unconflicting Projection of Gradients (Quinton & Rey, 2024, arXiv 2406.16232).

Each row :math:`g_i` of the Jacobian, scaled by its preference weight :math:`p_i`, is projected
onto the dual cone :math:`\{d : J d \ge 0\}` of the rows, and the projections are summed:

.. math::

    \mathcal A_{\text{UPGrad}}(J) = \sum_{i=1}^m \pi_J(p_i\, g_i),
    \qquad \pi_J(J^\top u) = J^\top v(u),
    \qquad v(u) = \operatorname*{argmin}_{v \ge u} v^\top G v .

So the weights are :math:`w = \sum_i v(p_i e_i)`, and :math:`w \ge p`.
"""

import torch
from torch import Tensor

from torchjd.aggregation._bases import GramianWeightedAggregator, of_weighting
from torchjd.aggregation._pref_vector import ProjectionWeighting
from torchjd.linalg import DualConeProjector, PSDMatrix, TorchProjector


class UPGradWeighting(ProjectionWeighting):
    r"""The weighting of :class:`UPGrad`: :math:`w = \sum_i v(p_i e_i)` with
    :math:`v(u) = \operatorname{argmin}_{v \ge u} v^\top G v`.

    :param pref_vector: The preference :math:`p \ge 0` (shape ``[m]``); the mean
        :math:`p = \mathbf 1 / m` when None.
    :param projector: The :class:`~torchjd.linalg.DualConeProjector` that solves the ``m``
        problems; :class:`~torchjd.linalg.TorchProjector` when None.

    >>> import torch
    >>> from torchjd.aggregation import UPGradWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> UPGradWeighting()(J @ J.T)
    tensor([1.1109, 0.7894])
    """

    pref_vector = ProjectionWeighting.pref_vector  # (its own attribute, as published)
    projector = ProjectionWeighting.projector

    def __init__(
        self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None
    ) -> None:
        super().__init__(pref_vector, projector)

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        projector = self.projector
        if isinstance(projector, TorchProjector):  # the same, in fewer operations
            p = None if self.pref_vector is None else self.preference(gramian)
            return projector._summed_projections(p, gramian)
        return projector(torch.diag(self.preference(gramian)), gramian).sum(dim=0)


class UPGrad(GramianWeightedAggregator):
    r"""The UPGrad aggregator (Quinton & Rey, 2024): the sum of the projections of the
    (preference-weighted) rows onto the dual cone of the rows.

    Its output never conflicts with a row (:math:`J\, \mathcal A(J) \ge 0`), up to the
    regularisation of the projector.

    **Non-conflict and the defaults.** Like the paper and the published library, the default
    projector divides the Gramian by its trace and adds ``1e-4`` to its diagonal (and switches the
    projection off, giving the mean, when the trace is below ``1e-4``). This keeps the solve cheap
    but only approximately keeps the promise: on 2,000 hard random Jacobians of 16 and 64 rows
    (``benchmarks/non_conflict.py``), the update conflicts with some row on 61% of them, by up to
    half the norm of the rows; mostly with rows whose gradient is small against the others.
    ``UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))`` is the **exact mode**: it
    solves the unregularised problem on any Jacobian (singular Gramians included), and its update
    conflicts with no row (:math:`J_i \cdot d \ge -10^{-8} \|J_i\| \max_j \|J_j\|` in float64,
    :math:`10^{-4}` in float32), on all of them. Its cost depends on the Gramian: a nonsingular
    one (fewer rows than columns, no near-duplicate rows) is solved by the default's own method
    on the unregularised Gramian, at 1.0x to 1.7x the default's time (median, 16 to 1,024 rows,
    ``benchmarks/exact_mode_routes.py``; up to 3.6x in float64 and 7x in float32 when the row
    norms spread over six decades); a singular or nearly singular one at about 1.5x to 3.0x up
    to 64 rows (median; in total time 1.8x (float32) to 3.0x (float64) at 16 rows, 2.7x to 3.2x
    at 64: float64 weights are brought to the least-norm ones); when many
    more rows than the rank positively span a subspace (low-rank Gramians), 0.9x (float64) to
    1.2x (float32) at 256 rows and 2.7x to 3.5x at 1,024; otherwise 2.4x to 4.1x at 128 rows,
    3.2x to 5.6x at 256 (up to about 0.6 s a call), and seconds to minutes a call from 512 rows.
    See
    :class:`~torchjd.linalg.TorchProjector` for the choice of weights when they are not unique.

    :param pref_vector: The preference :math:`p \ge 0` (shape ``[m]``); the mean when None.
    :param projector: The :class:`~torchjd.linalg.DualConeProjector`;
        :class:`~torchjd.linalg.TorchProjector` when None.

    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.linalg import TorchProjector
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> UPGrad()(J)
    tensor([0.2929, 1.9004, 1.9004])
    >>> UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))(J)  # exact mode
    tensor([0.2924, 1.9006, 1.9006])
    """

    def __init__(
        self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, projector))

    pref_vector = of_weighting(ProjectionWeighting.pref_vector)
    projector = of_weighting(ProjectionWeighting.projector)

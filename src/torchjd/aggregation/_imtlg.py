r"""IMTL-G: the gradient part of Impartial Multi-Task Learning (Liu et al., 2021, ICLR), in the
generalisation of Quinton & Rey (2024, arXiv 2406.16232) to linearly dependent rows.

IMTL-G looks for the combination :math:`d = J^\top w`, :math:`\mathbf 1^\top w = 1`, whose
projections on the unit gradients :math:`u_i = g_i / \|g_i\|` are all equal:
:math:`d \cdot u_i = (G w)_i / \sqrt{G_{ii}}` is the same for every ``i``. So
:math:`G w \propto \sqrt{\operatorname{diag}(G)}`, and with the pseudo-inverse:

.. math::

    v = G^{+} \sqrt{\operatorname{diag}(G)}, \qquad w = \frac{v}{\mathbf 1^\top v},

and :math:`w = 0` when :math:`\mathbf 1^\top v = 0` (e.g. a zero matrix, or two opposite rows).
"""

import torch
from torch import Tensor

from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting
from torchjd.aggregation._non_finite import finite_stand_in, nan_unless
from torchjd.linalg import PSDMatrix


class IMTLGWeighting(GramianWeighting):
    r"""The weighting of :class:`IMTLG`:
    :math:`w = v / \mathbf 1^\top v` with :math:`v = G^{+} \sqrt{\operatorname{diag}(G)}`.

    >>> import torch
    >>> from torchjd.aggregation import IMTLGWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> IMTLGWeighting()(J @ J.T)
    tensor([0.5923, 0.4077])
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G, finite = finite_stand_in(gramian)
        norms = G.diagonal().clamp_min(0.0).sqrt()
        v = torch.linalg.pinv(G, hermitian=True) @ norms
        total = v.sum()
        # A sum that is zero up to rounding (relative to |v|) gives no direction.
        degenerate = total.abs() <= G.shape[0] * torch.finfo(G.dtype).eps * v.abs().sum()
        weights = torch.where(degenerate, torch.zeros_like(v), v / total.where(~degenerate, 1.0))
        return nan_unless(finite, weights)


class IMTLG(GramianWeightedAggregator):
    r"""The IMTL-G aggregator (Liu et al., 2021), generalised to linearly dependent rows: the
    combination of the rows, with weights summing to one, that has equal projections on every
    unit row.

    >>> import torch
    >>> from torchjd.aggregation import IMTLG
    >>> IMTLG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0767, 1.0000, 1.0000])
    """

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())

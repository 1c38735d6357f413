r"""Krum and Multi-Krum (Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS).

With ``f`` Byzantine rows among ``m``, the score of row ``i`` is the sum of its squared distances
to its ``m − f − 2`` nearest other rows,

.. math::

    s(i) = \sum_{j \in N_i} \|g_i - g_j\|^2, \qquad
    \|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij},

and Multi-Krum averages the ``n_selected`` rows of lowest score (Krum is ``n_selected = 1``).
Ties are broken by :func:`torch.topk`.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_positive_int
from torchjd.aggregation._parameters import check_non_negative_int
from torchjd.linalg import PSDMatrix


class KrumWeighting(GramianWeighting):
    r"""The weighting of :class:`Krum`: weight :math:`1 / \text{n\_selected}` on each of the
    ``n_selected`` rows of lowest score, zero elsewhere.

    :param n_byzantine: The number ``f ≥ 0`` of rows that may be adversarial. The Gramian must
        have at least ``f + 3`` rows.
    :param n_selected: The number of rows averaged (Multi-Krum). At most the number of rows.

    >>> import torch
    >>> from torchjd.aggregation import KrumWeighting
    >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-5.0, 8.0]])
    >>> KrumWeighting(n_byzantine=1, n_selected=2)(J @ J.T)
    tensor([0.5000, 0.5000, 0.0000, 0.0000])
    """

    n_byzantine = hyperparameter(
        "n_byzantine",
        check_non_negative_int,
        "The number ``f ≥ 0`` of rows that may be adversarial.",
    )
    n_selected = hyperparameter(
        "n_selected", check_positive_int, "The number of rows averaged (positive)."
    )

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G = gramian
        m = G.shape[0]
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Krum with `n_byzantine={self.n_byzantine}` needs a matrix with at least "
                f"n_byzantine + 3 = {self.n_byzantine + 3} rows. Found {m} rows."
            )
        if m < self.n_selected:
            raise ValueError(
                f"Krum with `n_selected={self.n_selected}` needs a matrix with at least "
                f"{self.n_selected} rows. Found {m} rows."
            )
        squared_norms = G.diagonal()
        distances = squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * G
        distances = distances.clamp_min(0.0).fill_diagonal_(torch.inf)  # a row is not its neighbour
        n_neighbours = m - self.n_byzantine - 2
        scores = distances.sort(dim=1).values[:, :n_neighbours].sum(dim=1)
        selected = torch.topk(scores, self.n_selected, largest=False).indices
        weights = torch.zeros(m, dtype=G.dtype, device=G.device)
        return weights.index_fill(0, selected, 1.0 / self.n_selected)

    def _params(self) -> dict[str, Any]:
        return {"n_byzantine": self.n_byzantine, "n_selected": self.n_selected}

    def _str_suffix(self) -> str:
        return f"{self.n_byzantine}-{self.n_selected}"


class Krum(GramianWeightedAggregator):
    r"""The (Multi-)Krum aggregator (Blanchard et al., 2017): the mean of the ``n_selected`` rows
    closest to their ``m − f − 2`` nearest neighbours.

    :param n_byzantine: The number ``f ≥ 0`` of rows that may be adversarial. The matrix must
        have at least ``f + 3`` rows.
    :param n_selected: The number of rows averaged. At most the number of rows.

    >>> import torch
    >>> from torchjd.aggregation import Krum
    >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-5.0, 8.0]])
    >>> Krum(n_byzantine=1, n_selected=2)(J)
    tensor([1.0500, 0.0000])
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))

    n_byzantine = of_weighting(KrumWeighting.n_byzantine)
    n_selected = of_weighting(KrumWeighting.n_selected)

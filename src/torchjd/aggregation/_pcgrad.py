r"""PCGrad: Projecting Conflicting Gradients (Yu et al., 2020, "Gradient Surgery for Multi-Task
Learning", NeurIPS, Algorithm 1).

Each gradient :math:`g_i` visits the other gradients :math:`g_j` in a random order and, whenever
they conflict, loses its component along :math:`g_j`:

.. math::

    g_i^{\text{PC}} \leftarrow g_i^{\text{PC}}
    - \frac{\min(g_i^{\text{PC}} \cdot g_j,\ 0)}{\|g_j\|^2}\, g_j ,
    \qquad \mathcal A_{\text{PCGrad}}(J) = \sum_{i=1}^m g_i^{\text{PC}} .

In the Gramian: with :math:`g_i^{\text{PC}} = \sum_k W_{ik} g_k` (``W = I`` at the start),
:math:`g_i^{\text{PC}} \cdot g_j = (W G)_{ij}` and the projection subtracts the coefficient from
:math:`W_{ij}`, so the weights are :math:`w = \mathbf 1^\top W`. All ``m`` tasks take their
``s``-th step together, so there are ``m`` batched steps.

The order in which task ``i`` visits the tasks is row ``i`` of
``torch.rand(m, m).argsort(dim=1)`` (drawn from torch's global generator of the Gramian's device;
``i`` itself is skipped), so ``torch.manual_seed`` makes the result reproducible.
"""

import torch
from torch import Tensor

from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting
from torchjd.linalg import PSDMatrix


class PCGradWeighting(GramianWeighting):
    r"""The weighting of :class:`PCGrad`: :math:`w = \mathbf 1^\top W` where row ``i`` of ``W``
    holds the coefficients of :math:`g_i^{\text{PC}}` in the rows of ``J``.

    >>> import torch
    >>> from torchjd.aggregation import PCGradWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> PCGradWeighting()(J @ J.T)
    tensor([2.2222, 1.5789])
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G = gramian
        m = G.shape[0]
        order = torch.rand(m, m, device=G.device).argsort(dim=1)
        tasks = torch.arange(m, device=G.device)
        squared_norms = G.diagonal()
        W = torch.eye(m, dtype=G.dtype, device=G.device)
        for step in range(m):
            j = order[:, step]
            dots = (W * G[j]).sum(dim=1)  # g_i^PC · g_j, for every task i at once
            conflict = (dots < 0) & (j != tasks)
            coefficient = torch.where(conflict, dots / squared_norms[j].where(conflict, 1.0), 0.0)
            W[tasks, j] -= coefficient
        return W.sum(dim=0)


class PCGrad(GramianWeightedAggregator):
    r"""The PCGrad aggregator (Yu et al., 2020): the sum of the rows, each first stripped of its
    conflicting components with the other rows, visited in a random order.

    >>> import torch
    >>> from torchjd.aggregation import PCGrad
    >>> PCGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5848, 3.8012, 3.8012])
    """

    def __init__(self) -> None:
        super().__init__(PCGradWeighting())

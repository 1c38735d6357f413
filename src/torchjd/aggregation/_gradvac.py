r"""GradVac: Gradient Vaccine (Wang et al., 2021, "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR, Algorithm 1).

Like PCGrad, each gradient :math:`g_i` visits the other gradients :math:`g_j` in a random order,
but it is corrected whenever its cosine :math:`\phi_{ij}` with :math:`g_j` falls below a target
:math:`\hat\phi_{ij}`, an exponential moving average of the cosines seen so far:

.. math::

    g_i^{\text{PC}} \leftarrow g_i^{\text{PC}} + \frac{\|g_i^{\text{PC}}\| \big(\hat\phi_{ij}
    \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\big)}{\|g_j\|
    \sqrt{1 - \hat\phi_{ij}^2}}\, g_j
    \quad \text{if } \phi_{ij} < \hat\phi_{ij},
    \qquad \hat\phi_{ij} \leftarrow (1 - \beta) \hat\phi_{ij} + \beta \phi_{ij},

with :math:`\phi_{ij} = \cos(g_i^{\text{PC}}, g_j)` taken before the correction and
:math:`\hat\phi = 0` at the start; :math:`\epsilon` is added to the denominators. The output is
:math:`\sum_i g_i^{\text{PC}}`. In the Gramian, as for :class:`PCGrad`, with
:math:`g_i^{\text{PC}} = \sum_k W_{ik} g_k`: :math:`g_i^{\text{PC}} \cdot g_j = (WG)_{ij}`,
:math:`\|g_i^{\text{PC}}\|^2 = (W G W^\top)_{ii}`.

The visiting order of task ``i`` is row ``i`` of ``torch.rand(m, m).argsort(dim=1)`` (torch's
global generator of the Gramian's device). The targets :math:`\hat\phi` start afresh when the
number of rows, the dtype or the device changes.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd import Stateful
from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_non_negative_float
from torchjd.aggregation._parameters import check_unit_interval
from torchjd.linalg import PSDMatrix


class GradVacWeighting(GramianWeighting, Stateful):
    r"""The weighting of :class:`GradVac`: :math:`w = \mathbf 1^\top W`, where row ``i`` of
    ``W`` holds the coefficients of :math:`g_i^{\text{PC}}`; keeps the targets
    :math:`\hat\phi` between calls.

    :param beta: The rate :math:`\beta \in [0, 1]` of the moving average of the cosines.
    :param eps: The non-negative :math:`\epsilon` added to the denominators.

    >>> import torch
    >>> from torchjd.aggregation import GradVacWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> weighting = GradVacWeighting()
    >>> weighting(J @ J.T)  # with zero targets, PCGrad's projections
    tensor([2.2222, 1.5789])
    >>> weighting(J @ J.T)  # the targets are now negative: smaller corrections
    tensor([1.8580, 1.4064])
    """

    phi_hat: Tensor | None
    beta = hyperparameter(
        "beta",
        check_unit_interval,
        r"The rate :math:`\beta \in [0, 1]` of the moving average (the targets are kept when it "
        "is set).",
    )
    eps = hyperparameter(
        "eps", check_non_negative_float, r"The :math:`\epsilon \ge 0` of the denominators."
    )

    def __init__(self, beta: float = 0.5, eps: float = 1e-08) -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps
        self.register_buffer("phi_hat", None)

    def reset(self) -> None:
        self.phi_hat = None

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G = gramian
        m = G.shape[0]
        phi_hat = self.phi_hat
        if (
            phi_hat is None
            or phi_hat.shape[0] != m
            or phi_hat.dtype != G.dtype
            or phi_hat.device != G.device
        ):
            phi_hat = torch.zeros_like(G)
        phi_hat = phi_hat.clone()
        beta, eps = self.beta, self.eps
        order = torch.rand(m, m, device=G.device).argsort(dim=1)
        tasks = torch.arange(m, device=G.device)
        norms = G.diagonal().clamp_min(0.0).sqrt()
        W = torch.eye(m, dtype=G.dtype, device=G.device)
        for step in range(m):
            j = order[:, step]
            others = j != tasks
            dots = (W * G[j]).sum(dim=1)  # g_i^PC · g_j
            norms_pc = ((W @ G) * W).sum(dim=1).clamp_min(0.0).sqrt()  # ‖g_i^PC‖
            phi = dots / (norms_pc * norms[j] + eps)
            target = phi_hat[tasks, j]
            root, root_target = (
                (1 - phi**2).clamp_min(0.0).sqrt(),
                (1 - target**2).clamp_min(0.0).sqrt(),
            )
            coefficient = (
                norms_pc * (target * root - phi * root_target) / (norms[j] * root_target + eps)
            )
            W[tasks, j] += torch.where(others & (phi < target), coefficient, 0.0)
            updated = (1 - beta) * target + beta * phi
            phi_hat[tasks, j] = torch.where(others, updated, target)
        self.phi_hat = phi_hat
        return W.sum(dim=0)

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta, "eps": self.eps}


class GradVac(GramianWeightedAggregator, Stateful):
    r"""The GradVac aggregator (Wang et al., 2021): the sum of the rows, each corrected towards
    the cosine similarity that it usually has with the other rows.

    :param beta: The rate :math:`\beta \in [0, 1]` of the moving average of the cosines.
    :param eps: The non-negative :math:`\epsilon` added to the denominators.

    >>> import torch
    >>> from torchjd.aggregation import GradVac
    >>> GradVac()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5848, 3.8012, 3.8012])
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-08) -> None:
        super().__init__(GradVacWeighting(beta, eps))

    beta = of_weighting(GradVacWeighting.beta)
    eps = of_weighting(GradVacWeighting.eps)

    def reset(self) -> None:
        self.gramian_weighting.reset()  # type: ignore[operator]

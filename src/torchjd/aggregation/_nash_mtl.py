r"""Nash-MTL: Multi-Task Learning as a Bargaining Game (Navon et al., 2022, ICML, Algorithm 1).

The update :math:`d = J^\top \alpha` is the Nash bargaining solution: the weights
:math:`\alpha > 0` solve

.. math::

    G \alpha = 1 / \alpha \quad \text{(entrywise)}, \qquad \text{i.e.} \quad
    \alpha_i\, g_i^\top d = 1 \ \text{ for every task } i .

The paper approximates it by a sequence of convex programs (CCP); here it is solved to
rounding accuracy by damped Newton steps on :math:`\tfrac12 \alpha^\top G \alpha - \sum_i \log
\alpha_i` (see :func:`~torchjd.linalg._power_equation.solve_power_equation`), at most
``optim_niter`` of them. At the solution, :math:`\|d\|^2 = \alpha^\top G \alpha = m`. When
``max_norm > 0`` and :math:`\|d\| >` ``max_norm``, :math:`\alpha` is scaled down so that
:math:`\|d\| =` ``max_norm``. The weights are recomputed once every ``update_weights_every``
calls and reused in between (Algorithm 1's speed-up), which makes the aggregator stateful.
"""

from typing import Any, cast

from torch import Tensor

from torchjd import Stateful
from torchjd._properties import Hyperparameter, hyperparameter
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_non_negative_float, check_positive_int
from torchjd.linalg import PSDMatrix
from torchjd.linalg._power_equation import solve_power_equation


class _NashMTLWeighting(GramianWeighting, Stateful):
    max_norm = hyperparameter(
        "max_norm", check_non_negative_float, "The largest norm of the output; 0: no clip."
    )
    update_weights_every = hyperparameter(
        "update_weights_every",
        check_positive_int,
        "The weights are recomputed once every that many calls (the count goes on when it is set).",
    )
    optim_niter = hyperparameter(
        "optim_niter", check_positive_int, "The largest number of Newton steps of the solver."
    )

    def __init__(
        self, n_tasks: int, max_norm: float, update_weights_every: int, optim_niter: int
    ) -> None:
        super().__init__()
        self.step = 0
        self.alpha: Tensor | None = None
        self.n_tasks = n_tasks
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter

    @property
    def n_tasks(self) -> int:
        """The number of rows of the matrices (positive). Setting another number resets the state:
        the weights kept have one entry per task."""
        return self._n_tasks

    @n_tasks.setter
    def n_tasks(self, value: int) -> None:
        n_tasks = check_positive_int(value, "n_tasks")
        if n_tasks != getattr(self, "_n_tasks", n_tasks):
            self.reset()
        self._n_tasks = n_tasks

    def reset(self) -> None:
        self.step = 0
        self.alpha = None

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G = gramian
        if G.shape[0] != self.n_tasks:
            raise ValueError(
                f"NashMTL has `n_tasks={self.n_tasks}`, so the matrix must have "
                f"{self.n_tasks} rows. Found {G.shape[0]} rows."
            )
        if self.alpha is None or self.step % self.update_weights_every == 0:
            alpha = solve_power_equation(G, 1.0, self.optim_niter)
            if self.max_norm > 0:
                norm = (alpha @ G @ alpha).clamp_min(0.0).sqrt()
                alpha = alpha * (self.max_norm / norm.clamp_min(self.max_norm))
            self.alpha = alpha.detach()
        self.step += 1
        return self.alpha.to(dtype=G.dtype, device=G.device)

    def _params(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "max_norm": self.max_norm,
            "update_weights_every": self.update_weights_every,
            "optim_niter": self.optim_niter,
        }


class NashMTL(GramianWeightedAggregator, Stateful):
    r"""The Nash-MTL aggregator (Navon et al., 2022): :math:`J^\top \alpha` with
    :math:`G \alpha = 1 / \alpha`, clipped to the norm ``max_norm``.

    :param n_tasks: The number of rows of the matrices it will receive.
    :param max_norm: The largest norm of the output; ``0`` disables the clipping.
    :param update_weights_every: The weights are recomputed once every that many calls.
    :param optim_niter: The largest number of Newton steps of the solver.

    >>> import torch
    >>> from torchjd.aggregation import NashMTL
    >>> NashMTL(n_tasks=2, max_norm=0.0)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0766, 0.9985, 0.9985])
    """

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(_NashMTLWeighting(n_tasks, max_norm, update_weights_every, optim_niter))

    n_tasks = of_weighting(cast(Hyperparameter[int], _NashMTLWeighting.n_tasks))  # a property
    max_norm = of_weighting(_NashMTLWeighting.max_norm)
    update_weights_every = of_weighting(_NashMTLWeighting.update_weights_every)
    optim_niter = of_weighting(_NashMTLWeighting.optim_niter)

    def reset(self) -> None:
        self.gramian_weighting.reset()  # type: ignore[operator]

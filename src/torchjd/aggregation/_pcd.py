r"""PCD: Priority-Constrained Descent (Varam et al., 2026, "Not All Objectives Are Born Equal:
Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR).

The first row :math:`g_1` is the primary objective. PCD follows it as closely as possible while
every secondary objective ``j ≥ 2`` gets at least a fraction :math:`\tau_j` of the first-order
progress of a step along its own (normalised) gradient:

.. math::

    \tilde d = \operatorname*{argmin}_d \tfrac12 \|d - \tilde g_1\|^2
    \quad \text{s.t.} \quad \tilde g_j^\top d \ge \tau_j \|\tilde g_j\|^2 \ (j \ge 2),
    \qquad d = \frac{\|g_1\|}{\|\tilde d\|}\, \tilde d ,

with :math:`\tilde g_i = g_i / \sqrt{\hat v_i + \epsilon}` and :math:`\hat v_i` the bias-corrected
moving average (decay :math:`\beta`) of :math:`\|g_i\|^2` over the calls. With the Gramian
:math:`\tilde G` of the normalised rows and :math:`B` the secondary rows,
:math:`\tilde d = \tilde g_1 + \sum_{j \in B} \mu_j \tilde g_j` where :math:`\mu \ge 0` solves the
dual :math:`\min_{\mu \ge 0} \tfrac12 \mu^\top \tilde G_{BB} \mu + c^\top \mu`,
:math:`c = \tilde G_{B1} - \tau \odot \operatorname{diag}(\tilde G_{BB})`. With
:math:`\tilde G_{BB} z = c` it is :math:`\min_{v \ge z} v^\top \tilde G_{BB} v`,
:math:`\mu = v - z` (with a tiny Tikhonov term on :math:`\tilde G_{BB}`), solved exactly by
:func:`~torchjd.linalg._bounded_qp.solve_lower_bounded_qp`.

Special cases: :math:`g_1 = 0` or :math:`\tilde d = 0` give zero; constraints that cannot hold
together (e.g. two opposite secondary gradients) are dropped, giving :math:`g_1`; non-finite
inputs give NaN and leave the moving average unchanged. The moving average starts afresh when
the number of rows changes.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd import Stateful
from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_length, check_non_negative_float, check_vector
from torchjd.aggregation._parameters import check_unit_interval, check_unit_interval_open_above
from torchjd.linalg import PSDMatrix
from torchjd.linalg._bounded_qp import TIKHONOV, solve_lower_bounded_qp, tikhonov


def _check_tau(tau: object, name: str) -> float | Tensor:
    if isinstance(tau, Tensor):
        tau = check_vector(tau, name, non_negative=True)
        if bool((tau > 1).any()):
            raise ValueError(f"`{name}` must have entries in [0, 1]. Found {tau}.")
        return tau
    return check_unit_interval(tau, name)


class PCDWeighting(GramianWeighting, Stateful):
    r"""The weighting of :class:`PCD`: :math:`w = \frac{\sqrt{G_{11}}}{\|\tilde d\|}\, u`, where
    :math:`u = (s_1, \mu \odot s_B)` are the coefficients of :math:`\tilde d` in the rows and
    :math:`s_i = 1 / \sqrt{\hat v_i + \epsilon}`.

    :param tau: The fraction :math:`\tau \in [0, 1]` guaranteed to each secondary objective: a
        float, or a vector with one entry per secondary objective (``m − 1`` entries).
    :param beta: The decay :math:`\beta \in [0, 1)` of the moving average of the squared norms.
    :param eps: The non-negative :math:`\epsilon` added to the moving average.

    >>> import torch
    >>> from torchjd.aggregation import PCDWeighting
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> PCDWeighting(tau=0.5)(J @ J.T)
    tensor([1.1547, 0.9856])
    """

    tau = hyperparameter(
        "tau",
        _check_tau,
        r"The fraction :math:`\tau \in [0, 1]`: a float, or a vector of ``m − 1`` entries (a "
        "detached copy of the one set).",
    )
    beta = hyperparameter(
        "beta",
        check_unit_interval_open_above,
        r"The decay :math:`\beta \in [0, 1)` of the moving average (kept when it is set).",
    )
    eps = hyperparameter(
        "eps", check_non_negative_float, r"The :math:`\epsilon \ge 0` added to the average."
    )

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-08) -> None:
        super().__init__()
        self.tau = tau
        self.beta = beta
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        self.average: Tensor | None = None
        self.step = 0

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        G = gramian
        m = G.shape[0]
        if isinstance(self.tau, Tensor):
            check_length(self.tau, "tau", m - 1, "matrix")  # message says m - 1 rows
        if not bool(torch.isfinite(G).all()):
            return torch.full((m,), torch.nan, dtype=G.dtype, device=G.device)
        if self.average is None or self.average.shape[0] != m:
            self.reset()
            self.average = torch.zeros(m, dtype=G.dtype, device=G.device)
        self.step += 1
        squared_norms = G.diagonal().clamp_min(0.0)
        self.average = self.beta * self.average.to(G) + (1 - self.beta) * squared_norms
        v_hat = self.average / (1 - self.beta**self.step)
        s = (v_hat + self.eps).rsqrt()
        u = torch.zeros(m, dtype=G.dtype, device=G.device)
        u[0] = s[0]
        if m > 1:
            mu, feasible = self._multipliers(s.unsqueeze(1) * G * s.unsqueeze(0))
            u[1:] = torch.where(feasible, mu * s[1:], 0.0)
        norm_d = (u @ G @ u).clamp_min(0.0).sqrt()
        tiny = norm_d <= 1e3 * torch.finfo(G.dtype).eps * u.abs().max() * squared_norms.max().sqrt()
        scale = squared_norms[0].sqrt() / norm_d.where(~tiny, 1.0)
        return torch.where(tiny, 0.0, scale) * u

    def _multipliers(self, G_tilde: Tensor) -> tuple[Tensor, Tensor]:
        """The optimal ``μ ≥ 0`` of the dual, and whether the constraints can hold together."""
        Q, G_B1 = G_tilde[1:, 1:], G_tilde[1:, 0]
        tau = self.tau.to(Q) if isinstance(self.tau, Tensor) else self.tau
        bounds = tau * Q.diagonal()
        c = G_B1 - bounds
        largest = Q.diagonal().max()
        floor = torch.where(largest > 0, 1e-12 * largest, 1.0)  # for zero secondary rows
        Q_reg = tikhonov(Q) + floor * torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
        z = torch.linalg.solve(Q_reg, c)
        v = solve_lower_bounded_qp(Q_reg, z.unsqueeze(0), least_norm=False).squeeze(0)
        mu = (v - z).clamp_min(0.0)
        slack = G_B1 + Q @ mu - bounds
        # The Tikhonov term moves the active constraints by O(TIKHONOV) (relative).
        tolerance = 100 * TIKHONOV.get(Q.dtype, 1e-3) * G_tilde.diagonal().max()
        return mu, (slack >= -tolerance).all()

    def _params(self) -> dict[str, Any]:
        return {"tau": self.tau, "beta": self.beta, "eps": self.eps}

    def __str__(self) -> str:
        return repr(self)


class PCD(GramianWeightedAggregator, Stateful):
    r"""The PCD aggregator (Varam et al., 2026): the closest direction to the (normalised) first
    row that guarantees each other objective a fraction ``tau`` of its own progress, rescaled to
    the norm of the first row.

    :param tau: The fraction :math:`\tau \in [0, 1]` (a float, or ``m − 1`` values).
    :param beta: The decay :math:`\beta \in [0, 1)` of the moving average of the squared norms.
    :param eps: The non-negative :math:`\epsilon` added to the moving average.

    >>> import torch
    >>> from torchjd.aggregation import PCD
    >>> PCD(tau=0.5)(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    tensor([0.1691, 0.9856])
    """

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-08) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))

    tau = of_weighting(PCDWeighting.tau)
    beta = of_weighting(PCDWeighting.beta)
    eps = of_weighting(PCDWeighting.eps)

    def reset(self) -> None:
        self.gramian_weighting.reset()  # type: ignore[operator]

r"""CAGrad: Conflict-Averse Gradient descent (Liu et al., 2021, NeurIPS, Algorithm 1).

CAGrad maximises the worst improvement of the objectives in a ball around the mean gradient
:math:`g_0 = J^\top b`, :math:`b = \mathbf 1 / m`:

.. math::

    \max_{d}\ \min_i\ g_i^\top d
    \quad \text{s.t.} \quad \|d - g_0\| \le c \|g_0\| .

With :math:`r = c \|g_0\|`, its dual over the simplex is

.. math::

    w^\star = \operatorname*{argmin}_{w \in \Delta_m}\ F(w),
    \qquad F(w) = b^\top G w + r \sqrt{w^\top G w},

and the update is :math:`d = g_0 + \frac{r}{\|g_{w^\star}\|} g_{w^\star}`, where
:math:`g_w = J^\top w` and :math:`\|g_w\| = \sqrt{w^\top G w}`; so the weights are
:math:`b + \frac{r}{\|g_{w^\star}\|} w^\star`. Optimality: :math:`\nabla F(w^\star) = J d`, and
:math:`w^{\star\top} \nabla F(w^\star) = F(w^\star) = \min_i (J d)_i` (the duality gap is zero).

The dual is solved on :math:`G / \operatorname{tr}(G)` (the weights do not depend on the scale)
by projected gradient steps of Barzilai-Borwein length (the first one
:math:`\|g_w\| / (r \lambda_{\max})`, from the curvature of ``F``), then polished exactly on
the support ``S`` that they found: there
:math:`G_{SS} y = (\lambda \mathbf 1 - a_S) / r` with :math:`a = G b`, :math:`y^\top G_{SS} y = 1`
and :math:`w_S = y / \mathbf 1^\top y`, a quadratic equation in the optimal value
:math:`\lambda`. The polished point is kept when it is feasible and has a smaller duality gap.

When :math:`\operatorname{tr}(G) <` ``norm_eps``, or when the optimum has :math:`g_{w^\star} = 0`
(the convex hull of the rows contains 0 and the direction of the correction is undefined), the
weights are zero.
"""

from typing import Any

import torch
from torch import Tensor

from torchjd._properties import hyperparameter
from torchjd.aggregation._bases import GramianWeightedAggregator, GramianWeighting, of_weighting
from torchjd.aggregation._checks import check_non_negative_float
from torchjd.aggregation._non_finite import finite_stand_in, nan_unless
from torchjd.linalg import PSDMatrix
from torchjd.linalg._gramian import normalized
from torchjd.linalg._simplex import project_onto_simplex

_N_STEPS = 200  # at most, of projected gradient
_POLISH_EVERY = 10


class CAGradWeighting(GramianWeighting):
    r"""The weighting of :class:`CAGrad`: :math:`b + \frac{r}{\|g_{w^\star}\|} w^\star`.

    :param c: The radius of the ball, relative to :math:`\|g_0\|`. Must be non-negative;
        ``c = 0`` gives the mean.
    :param norm_eps: The weights are zero when :math:`\operatorname{tr}(G)` is below it.

    >>> import torch
    >>> from torchjd.aggregation import CAGradWeighting
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> CAGradWeighting(c=0.5)(J @ J.T)
    tensor([0.7041, 0.5000])
    """

    c = hyperparameter(
        "c", check_non_negative_float, r"The radius :math:`c \ge 0` of the ball (relative)."
    )
    norm_eps = hyperparameter(
        "norm_eps",
        check_non_negative_float,
        r"The weights are zero when :math:`\operatorname{tr}(G)` is below it (non-negative).",
    )

    def __init__(self, c: float, norm_eps: float = 0.0001) -> None:
        super().__init__()
        self.c = c
        self.norm_eps = norm_eps

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        stand_in, finite = finite_stand_in(gramian)
        G = normalized(stand_in, self.norm_eps)
        m = G.shape[0]
        b = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
        a = G @ b
        r = self.c * (b @ a).clamp_min(0.0).sqrt()
        w = _solve_dual(G, a, r)
        norm_gw = (w @ G @ w).clamp_min(0.0).sqrt()
        # ‖g_w‖² at the rounding level of G / tr(G): the correction has no direction
        degenerate = norm_gw**2 <= 100 * torch.finfo(G.dtype).eps * G.trace()
        weights = b + r / norm_gw.where(~degenerate, 1.0) * w
        return nan_unless(finite, torch.where(degenerate, torch.zeros_like(weights), weights))

    def _params(self) -> dict[str, Any]:
        return {"c": self.c, "norm_eps": self.norm_eps}

    def _str_suffix(self) -> str:
        return f"{self.c}"


def _gradient(G: Tensor, a: Tensor, r: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``∇F(w) = a + r G w / ‖g_w‖`` and ``‖g_w‖``."""
    Gw = G @ w
    norm_gw = (w @ Gw).clamp_min(0.0).sqrt()
    return a + r * Gw / norm_gw.clamp_min(torch.finfo(G.dtype).tiny), norm_gw


def _duality_gap(G: Tensor, a: Tensor, r: Tensor, w: Tensor) -> Tensor:
    """``F(w) − min_i (J d)_i = wᵀ∇F(w) − min_i ∇F(w)_i`` (``F`` is homogeneous)."""
    grad, _ = _gradient(G, a, r, w)
    return w @ grad - grad.min()


def _solve_dual(G: Tensor, a: Tensor, r: Tensor) -> Tensor:
    """Projected gradient with Barzilai-Borwein steps (keeping the iterate of smallest duality
    gap); every ``_POLISH_EVERY`` steps, the exact polish on the support of the best iterate,
    which ends the loop once its gap is at the rounding level."""
    m = G.shape[0]
    tiny = torch.finfo(G.dtype).tiny
    tolerance = 16 * torch.finfo(G.dtype).eps  # F is O(1) on G / tr(G)
    largest = torch.linalg.eigvalsh(G)[-1].clamp_min(tiny)
    w = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
    grad, norm_gw = _gradient(G, a, r, w)
    step = norm_gw / (r * largest).clamp_min(tiny)  # 1 / curvature of F at w
    best, best_gap = w, w @ grad - grad.min()
    for iteration in range(1, _N_STEPS + 1):
        new_w = project_onto_simplex(w - step * grad)
        new_grad, _ = _gradient(G, a, r, new_w)
        s, y = new_w - w, new_grad - grad
        step = torch.where(s @ y > 0, (s @ s) / (s @ y).clamp_min(tiny), step).clamp(0.0, 1e12)
        w, grad = new_w, new_grad
        gap = w @ grad - grad.min()
        improved = gap < best_gap
        best, best_gap = torch.where(improved, w, best), torch.where(improved, gap, best_gap)
        if iteration % _POLISH_EVERY == 0 or iteration == _N_STEPS:
            polished = _polish(G, a, r, best > 0)
            polished_gap = _duality_gap(G, a, r, polished)
            better = (polished >= 0).all() & (polished_gap < best_gap)
            best = torch.where(better, polished, best)
            best_gap = torch.where(better, polished_gap, best_gap)
            if bool(best_gap <= tolerance):  # one host synchronisation per round
                break
    return best


def _polish(G: Tensor, a: Tensor, r: Tensor, support: Tensor) -> Tensor:
    """The stationary point on ``support``: ``G_SS y = (λ1 − a_S) / r`` with ``yᵀ G_SS y = 1``."""
    outside = ~support
    both = support.unsqueeze(0) & support.unsqueeze(1)
    G_SS = torch.where(both, G, torch.diag(outside.to(G.dtype)))
    inverse = torch.linalg.pinv(G_SS, hermitian=True)
    ones = support.to(G.dtype)
    a_S = torch.where(support, a, 0.0)
    p, q = inverse @ ones, inverse @ a_S
    P, Q, A = ones @ p, ones @ q, a_S @ q
    lambda_ = (Q + (Q**2 - P * (A - r**2)).clamp_min(0.0).sqrt()) / P
    y = torch.where(support, lambda_ * p - q, 0.0)
    return y / y.sum()


class CAGrad(GramianWeightedAggregator):
    r"""The CAGrad aggregator (Liu et al., 2021): the direction that maximises the worst
    improvement of the objectives in the ball of radius :math:`c \|g_0\|` around the mean
    gradient :math:`g_0`, solved exactly in torch.

    :param c: The radius of the ball, relative to :math:`\|g_0\|`. Must be non-negative.
    :param norm_eps: The output is zero when :math:`\operatorname{tr}(J J^\top)` is below it.

    >>> import torch
    >>> from torchjd.aggregation import CAGrad
    >>> CAGrad(c=0.5)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1835, 1.2041, 1.2041])
    """

    def __init__(self, c: float, norm_eps: float = 0.0001) -> None:
        super().__init__(CAGradWeighting(c, norm_eps))

    c = of_weighting(CAGradWeighting.c)
    norm_eps = of_weighting(CAGradWeighting.norm_eps)

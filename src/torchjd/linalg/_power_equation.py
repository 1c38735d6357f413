r"""The positive solution of :math:`G x = x^{-p}` (entrywise power, :math:`p > 0`), behind
Nash-MTL (:math:`p = 1`) and FairGrad (:math:`p = 1 / \alpha`).

It is the minimiser of the strictly convex function (on :math:`x > 0`)

.. math::

    \varphi(x) = \tfrac12 x^\top G x - \sum_i h(x_i), \qquad h'(t) = t^{-p},

found by Newton steps :math:`x \leftarrow x + \Delta` or, when that does not lower
:math:`\varphi`, damped ones :math:`x \leftarrow x + \Delta / (1 + \lambda)`, with
:math:`(G + p \operatorname{diag}(x^{-p-1})) \Delta = x^{-p} - G x` and the Newton decrement
:math:`\lambda = \sqrt{-\nabla\varphi^\top \Delta}` (Nesterov & Nemirovskii's damping, exact for
the self-concordant :math:`p = 1`), further shortened so that each entry keeps at least a tenth
of its value. ``G`` is first divided by the mean of its diagonal (the solution scales as
:math:`s^{-1/(1+p)}`). The start :math:`x_i = G_{ii}^{-1/(1+p)}` solves orthogonal rows.

When ``G`` is singular the solution may not exist (a zero row, two opposite rows: ``x`` grows
without bound along a null direction of ``G``). ``G`` is therefore regularised by
:math:`\delta (\operatorname{diag}(G) + \delta \bar g)`, with :math:`\bar g` the mean of the
diagonal and a tiny :math:`\delta`: relative to each row, so that a well-posed solution moves by
a relative :math:`O(\delta)` even when the row norms span many decades.
"""

import torch
from torch import Tensor

_CHECK_EVERY = 4


def solve_power_equation(G: Tensor, p: float, max_iters: int, tol: float = 1e-13) -> Tensor:
    """``x > 0`` with ``G x = x^{-p}``, to a relative residual ``tol`` or after ``max_iters``
    Newton steps."""
    # Scale equivariance: with G = s G', the solution is x = s^{-1/(1+p)} x'.
    s = G.diagonal().mean()
    s = torch.where(s > 0, s, 1.0)
    G = G / s
    delta = max(1e-10, 16 * torch.finfo(G.dtype).eps)
    diagonal = G.diagonal()
    G = G + delta * torch.diag(diagonal + delta)  # relative to each row; δ² for zero rows
    x = G.diagonal() ** (-1.0 / (1.0 + p))
    tol = max(tol, 64 * torch.finfo(G.dtype).eps)
    for iteration in range(1, max_iters + 1):
        target = x ** (-p)
        gradient = G @ x - target
        H = G + torch.diag(p * target / x)
        delta_x = -torch.linalg.solve(H, gradient)
        decrement = (-(gradient @ delta_x)).clamp_min(0.0).sqrt()
        shrink = (-delta_x / (0.9 * x)).amax().clamp_min(1.0)  # keep x_i ≥ x_i / 10
        full = x + delta_x / shrink
        damped = x + delta_x / torch.maximum(1 + decrement, shrink)
        x = torch.where(_objective(G, p, full) <= _objective(G, p, damped), full, damped)
        if iteration % _CHECK_EVERY == 0:
            residual = ((G @ x - x ** (-p)).abs() / x ** (-p)).amax()
            if bool(residual <= tol):
                break
    return x * s ** (-1.0 / (1.0 + p))


def _objective(G: Tensor, p: float, x: Tensor) -> Tensor:
    """``½ xᵀGx − Σ h(x_i)`` with ``h(t) = log t`` (p = 1) or ``t^{1−p} / (1 − p)``."""
    barrier = x.log().sum() if p == 1.0 else (x ** (1 - p)).sum() / (1 - p)
    return 0.5 * x @ G @ x - barrier

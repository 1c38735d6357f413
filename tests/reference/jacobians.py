"""Brute-force Jacobians and Gramians: one autograd.grad per objective (the oracle of autogram)."""

from collections.abc import Sequence

import torch
from torch import Tensor


def brute_force_jacobian(output: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``[m, n]``: row ``k`` is the gradient of ``output.flatten()[k]`` w.r.t. ``params``."""
    rows = []
    for objective in output.flatten():
        grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def brute_force_gramian(output: Tensor, params: Sequence[Tensor]) -> Tensor:
    J = brute_force_jacobian(output, params)
    return J @ J.T

"""Writing results into the ``.jac`` and ``.grad`` fields, summed into what they already hold (as
autograd accumulates ``.grad``). Called only once every check has passed."""

from collections.abc import Sequence

from torch import Tensor


def accumulate_jacs(leaves: Sequence[Tensor], jacobians: Sequence[Tensor]) -> None:
    for leaf, J in zip(leaves, jacobians, strict=True):
        existing = getattr(leaf, "jac", None)
        leaf.jac = J if existing is None else existing + J  # type: ignore[attr-defined]


def accumulate_grads(leaves: Sequence[Tensor], gradients: Sequence[Tensor]) -> None:
    for leaf, g in zip(leaves, gradients, strict=True):
        g = g.to(dtype=leaf.dtype)
        leaf.grad = g if leaf.grad is None else leaf.grad + g

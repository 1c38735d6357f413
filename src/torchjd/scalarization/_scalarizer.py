"""The base class of scalarizers: a tensor of losses (of any shape) → a scalar."""

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn


class Scalarizer(nn.Module, ABC):
    """Reduces a tensor of values (losses, of any shape) to a scalar (a 0-dim tensor) that can be
    minimised with a plain ``backward()``.

    Subclass it and implement :meth:`forward`. Calling a scalarizer checks that its input is a
    floating-point tensor, then runs :meth:`forward` (forward hooks run as on any
    :class:`torch.nn.Module`). A scalarizer with learnable parameters exposes them as
    :class:`torch.nn.Parameter`: add ``scalarizer.parameters()`` to the optimizer.

    >>> import torch
    >>> from torchjd.scalarization import Mean
    >>> losses = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    >>> Mean()(losses)
    tensor(3., grad_fn=<MeanBackward0>)
    """

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, values: Tensor, /) -> Tensor:
        """The scalar (0-dim tensor) that combines ``values``."""

    def __call__(self, values: Tensor, /) -> Tensor:
        if not isinstance(values, Tensor):
            raise TypeError(
                f"`values` must be a torch.Tensor (of losses, any shape). "
                f"Found {type(values).__name__}."
            )
        if not values.is_floating_point():
            raise TypeError(
                f"`values` must have a floating-point dtype. Found {values.dtype}: use e.g. "
                "`values.float()`."
            )
        return super().__call__(values)

    def _params(self) -> dict[str, Any]:
        """Constructor arguments, shown by ``repr``."""
        return {}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self._params().items())
        return f"{type(self).__name__}({arguments})"

    def __str__(self) -> str:
        return type(self).__name__

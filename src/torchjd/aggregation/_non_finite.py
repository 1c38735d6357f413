"""Non-finite inputs give NaN outputs (never an exception from a decomposition), without a host
synchronisation: the decomposition runs on a finite stand-in and the result is masked."""

import torch
from torch import Tensor


def finite_stand_in(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``matrix`` with non-finite entries zeroed, and whether it was all finite (0-d bool)."""
    finite = torch.isfinite(matrix)
    return torch.where(finite, matrix, 0.0), finite.all()


def nan_unless(finite: Tensor, result: Tensor) -> Tensor:
    """``result``, or NaN everywhere when ``finite`` is False."""
    return torch.where(finite, result, torch.nan)

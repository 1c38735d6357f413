"""Edge-case matrices shared by the tests: named generators ``(m, n, dtype, generator) → J``."""

from collections.abc import Callable

import torch
from torch import Tensor

MatrixFactory = Callable[[int, int, torch.dtype, torch.Generator], Tensor]


def _normal(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    return torch.randn(m, n, dtype=dtype, generator=g)


def _zero(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    return torch.zeros(m, n, dtype=dtype)


def _zero_row(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    J = _normal(m, n, dtype, g)
    J[m // 2] = 0.0
    return J


def _duplicate_rows(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    J = _normal(m, n, dtype, g)
    J[-1] = J[0]
    return J


def _opposite_rows(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    J = _normal(m, n, dtype, g)
    J[-1] = -J[0]
    return J


def _rank_deficient(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    rank = max(1, min(m, n) // 2)
    return _normal(m, rank, dtype, g) @ _normal(rank, n, dtype, g)


def _common_direction(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """Per-sample-like gradients: a shared mean plus noise (few conflicts)."""
    return 0.5 * _normal(1, n, dtype, g) + _normal(m, n, dtype, g)


def _tiny(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    return 1e-6 * _normal(m, n, dtype, g)


def _huge(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    return 1e4 * _normal(m, n, dtype, g)


def _mixed_row_norms(m: int, n: int, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    scales = torch.logspace(-3, 3, m, dtype=dtype)
    return scales.unsqueeze(1) * _normal(m, n, dtype, g)


FACTORIES: dict[str, MatrixFactory] = {
    "normal": _normal,
    "zero": _zero,
    "zero_row": _zero_row,
    "duplicate_rows": _duplicate_rows,
    "opposite_rows": _opposite_rows,
    "rank_deficient": _rank_deficient,
    "common_direction": _common_direction,
    "tiny": _tiny,
    "huge": _huge,
    "mixed_row_norms": _mixed_row_norms,
}


def make(name: str, m: int, n: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    return FACTORIES[name](m, n, dtype, torch.Generator().manual_seed(seed))

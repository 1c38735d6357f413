"""Validation of the hyperparameters of the methods: ranges beyond those of ``_checks``."""

import math

from torch import Tensor

from torchjd.aggregation._checks import check_matrix


def check_non_negative_int(value: object, name: str) -> int:
    if isinstance(value, (int, float)) and not value >= 0:  # the range first, as in _checks
        raise ValueError(f"`{name}` must be non-negative. Found {name}={value}.")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int. Found {value!r} of type {type(value).__name__}.")
    return value


def check_float_in(
    value: object, name: str, low: float, high: float, *, low_open: bool, high_open: bool
) -> float:
    """A finite float in the interval from ``low`` to ``high`` (open at the ends as told)."""
    if isinstance(value, (int, float)):  # the range first, as in _checks
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if math.isnan(value) or not (above and below):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"`{name}` must be in {interval}. Found {name}={value!r}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a float. Found {value!r} of type {type(value).__name__}."
        )
    return float(value)


def check_unit_interval(value: object, name: str) -> float:
    """A float in ``[0, 1]``."""
    return check_float_in(value, name, 0.0, 1.0, low_open=False, high_open=False)


def check_unit_interval_open_above(value: object, name: str) -> float:
    """A float in ``[0, 1)``."""
    return check_float_in(value, name, 0.0, 1.0, low_open=False, high_open=True)


def check_square(matrix: Tensor, name: str) -> None:
    check_matrix(matrix, name)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"`{name}` must be a square matrix [m, m] (J_1 J_2ᵀ from two mini-batches). "
            f"Found `{name}.shape = {tuple(matrix.shape)}`."
        )

"""Validation at the public boundary: clear errors that name the argument and what was expected."""

import math
from functools import partial

import torch
from torch import Tensor

from torchjd._properties import Hyperparameter, hyperparameter


def check_matrix(matrix: object, name: str) -> None:
    """A floating-point tensor of shape ``[m, n]`` with ``m ≥ 1``."""
    if not isinstance(matrix, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape [m, n]. Found {type(matrix).__name__}."
        )
    if matrix.ndim != 2:
        raise ValueError(
            f"`{name}` must be a matrix (2-D tensor of shape [m, n], one row per objective). "
            f"Found `{name}.shape = {tuple(matrix.shape)}`."
        )
    if matrix.shape[0] == 0:
        raise ValueError(
            f"`{name}` must have at least one row (one per objective). "
            f"Found `{name}.shape = {tuple(matrix.shape)}`."
        )
    if not matrix.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype. Found {matrix.dtype}.")


def check_gramian(gramian: object, name: str) -> None:
    """A symmetric floating-point tensor of shape ``[m, m]`` with ``m ≥ 1``.

    Symmetry is checked up to rounding: ``max|G − Gᵀ| ≤ √ε · max|G|``. Non-finite entries are let
    through (they give NaN weights).
    """
    check_matrix(gramian, name)
    assert isinstance(gramian, Tensor)
    m, n = gramian.shape
    if m != n:
        raise ValueError(
            f"`{name}` must be a square matrix [m, m] (a Gramian J Jᵀ). "
            f"Found `{name}.shape = {tuple(gramian.shape)}`."
        )
    if torch.equal(gramian, gramian.T):  # one operation in the common case
        return
    asymmetry = (gramian - gramian.T).abs().amax()
    tolerance = math.sqrt(torch.finfo(gramian.dtype).eps) * gramian.abs().amax()
    if bool(asymmetry > tolerance):
        raise ValueError(
            f"`{name}` must be symmetric (a Gramian J Jᵀ). Found max|{name} − {name}ᵀ| = "
            f"{float(asymmetry):.3g}, for max|{name}| = {float(gramian.abs().amax()):.3g}."
        )


def check_vector(vector: object, name: str, *, non_negative: bool) -> Tensor:
    """A finite floating-point 1-D tensor (with no negative entry if ``non_negative``)."""
    if not isinstance(vector, Tensor):
        raise TypeError(
            f"`{name}` must be a 1-D torch.Tensor. Found {type(vector).__name__}: {vector!r}."
        )
    if vector.ndim != 1:
        raise ValueError(
            f"`{name}` must be a vector (1-D tensor). Found `{name}.shape = {tuple(vector.shape)}`."
        )
    if vector.shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one entry. Found an empty vector.")
    if not vector.is_floating_point():
        raise TypeError(
            f"`{name}` must have a floating-point dtype. Found {vector.dtype}: use e.g. "
            f"`{name}.float()`."
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"`{name}` must have finite entries. Found {vector}.")
    if non_negative and bool((vector < 0).any()):
        raise ValueError(f"`{name}` must have non-negative entries. Found {vector}.")
    return vector.detach().clone()


def check_length(vector: Tensor, name: str, m: int, input_name: str) -> None:
    """``vector`` has one entry per row of the input (whose name is ``input_name``)."""
    if vector.shape[0] != m:
        raise ValueError(
            f"`{name}` has {vector.shape[0]} entries, so `{input_name}` must have "
            f"{vector.shape[0]} rows. Found `{input_name}` with {m} rows."
        )


# The range is checked before the type: a number out of range raises ValueError, as in the
# published library (which refuses only those), and a number of the wrong type TypeError.


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, (int, float)) and not value > 0:  # a range error first, whatever type
        raise ValueError(f"`{name}` must be positive. Found {name}={value}.")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int. Found {value!r} of type {type(value).__name__}.")
    return value


def check_positive_float(value: object, name: str) -> float:
    if isinstance(value, (int, float)) and not value > 0:  # also refuses NaN
        raise ValueError(f"`{name}` must be positive. Found {name}={value!r}.")
    return _float(value, name)


def check_non_negative_float(value: object, name: str) -> float:
    if isinstance(value, (int, float)) and not value >= 0:  # also refuses NaN
        raise ValueError(f"`{name}` must be non-negative. Found {name}={value!r}.")
    return _float(value, name)


def _float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a float. Found {value!r} of type {type(value).__name__}."
        )
    return float(value)


def check_optional_vector(value: object, name: str, *, non_negative: bool) -> Tensor | None:
    """None, or a vector accepted by :func:`check_vector` (a detached copy of it)."""
    return None if value is None else check_vector(value, name, non_negative=non_negative)


def vector_hyperparameter(
    name: str, doc: str, *, non_negative: bool = False
) -> Hyperparameter[Tensor | None]:
    """The hyperparameter ``name``: None or a vector ``[m]`` (:func:`check_optional_vector`), kept
    in ``_name``, which the class registers as a (non-persistent) buffer."""
    check = partial(check_optional_vector, non_negative=non_negative)
    return hyperparameter(name, check, doc)


def check_tracked_shape(tracked: Tensor, matrix: Tensor) -> None:
    """A stateful aggregator's input keeps the shape of the matrix that it tracks."""
    if tracked.shape != matrix.shape:
        raise ValueError(
            f"`matrix` must keep the shape of the previous calls, {tuple(tracked.shape)}, since "
            f"the aggregator tracks it. Found `matrix.shape = {tuple(matrix.shape)}`; call "
            "`reset()` to start over with a new shape."
        )


def vector_str(vector: Tensor) -> str:
    """Entries with at most two decimals, trailing zeros dropped: ``[0.12, 2.]``."""
    entries = []
    for value in vector.tolist():
        text = f"{value:.2f}".rstrip("0")
        entries.append(text)
    return "[" + ", ".join(entries) + "]"

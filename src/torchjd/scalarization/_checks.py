"""Validation of the scalarizers' arguments and inputs."""

from collections.abc import Sequence

from torch import Tensor

from torchjd.aggregation._checks import check_non_negative_float, check_positive_int

__all__ = [
    "check_non_negative_float",
    "check_preference_and_reference",
    "check_same_shape",
    "check_shape",
    "check_tensor",
]


def check_shape(shape: object, name: str) -> tuple[int, ...]:
    """An int ``m`` (meaning ``(m,)``) or a sequence of positive ints."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        return (check_positive_int(shape, name),)
    if not isinstance(shape, Sequence) or isinstance(shape, str) or len(shape) == 0:
        raise TypeError(
            f"`{name}` must be a positive int or a non-empty sequence of positive ints (the shape "
            f"of the values). Found {shape!r}."
        )
    return tuple(check_positive_int(size, f"{name}[{i}]") for i, size in enumerate(shape))


def check_same_shape(values: Tensor, shape: tuple[int, ...], what: str) -> None:
    """``values`` has the ``shape`` of the scalarizer's ``what`` (weights, parameters, ...)."""
    if tuple(values.shape) != shape:
        raise ValueError(
            f"`values` must have the shape of the {what}, {shape}. "
            f"Found `values.shape = {tuple(values.shape)}`."
        )


def check_tensor(tensor: object, name: str) -> Tensor:
    """A finite floating-point tensor of any shape; returns a detached copy."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor. Found {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise TypeError(
            f"`{name}` must have a floating-point dtype. Found {tensor.dtype}: use e.g. "
            f"`{name}.float()`."
        )
    if not bool(tensor.isfinite().all()):
        raise ValueError(f"`{name}` must have finite entries. Found {tensor}.")
    return tensor.detach().clone()


def check_preference_and_reference(
    weights: Tensor | None, reference: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Checked copies of the optional ``weights`` and ``reference``, which must share a shape."""
    weights = None if weights is None else check_tensor(weights, "weights")
    reference = None if reference is None else check_tensor(reference, "reference")
    if weights is not None and reference is not None and weights.shape != reference.shape:
        raise ValueError(
            "`weights` and `reference` must have the same shape (that of the values). Found "
            f"{tuple(weights.shape)} and {tuple(reference.shape)}."
        )
    return weights, reference

"""Validation at the public boundary of autojac: errors that name the argument, what was expected
and what was received. Everything here runs before any ``.jac`` or ``.grad`` field is touched."""

from collections.abc import Iterable, Sequence

from torch import Tensor


def as_tensors(value: object, name: str, *, may_be_empty: bool = False) -> list[Tensor]:
    """``value`` as a list of tensors (one tensor, or a sequence or iterable of them), non-empty
    unless ``may_be_empty``."""
    if isinstance(value, Tensor):
        return [value]
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes)):
        raise TypeError(
            f"`{name}` must be a torch.Tensor or a sequence of tensors. "
            f"Found {type(value).__name__}."
        )
    tensors = list(value)
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"`{name}` must contain only tensors. Found `{name}[{i}]` of type "
                f"{type(tensor).__name__}."
            )
    if not tensors and not may_be_empty:
        raise ValueError(f"`{name}` must contain at least one tensor. Found an empty sequence.")
    return tensors


def check_differentiable(tensors: Sequence[Tensor], name: str) -> None:
    """Each tensor is non-empty and part of a graph (it requires grad)."""
    for i, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            raise ValueError(
                f"`{name}[{i}]` is empty (shape {tuple(tensor.shape)}): each of its elements "
                "would be one objective, so it must have at least one element."
            )
        if not tensor.requires_grad:
            raise ValueError(
                f"`{name}[{i}]` does not require grad, so there is nothing to differentiate. "
                "Compute it from tensors with `requires_grad=True`."
            )


def check_leaves(tensors: Sequence[Tensor], name: str) -> None:
    """Each tensor requires grad and is a leaf (or retains grad, as for ``.grad``): a tensor
    whose ``.jac`` can be filled."""
    for i, tensor in enumerate(tensors):
        if not tensor.requires_grad:
            raise ValueError(
                f"`{name}[{i}]` must require grad (e.g. a parameter of the model). Found a tensor "
                "with `requires_grad=False`."
            )
        if not (tensor.is_leaf or tensor.retains_grad):
            raise ValueError(
                f"`{name}[{i}]` must be a leaf tensor (e.g. a parameter of the model), since its "
                f"Jacobian is stored in its `.jac` field. Found a tensor computed by "
                f"{type(tensor.grad_fn).__name__}; call its `.retain_grad()` first, or use "
                "`torchjd.autojac.jac` to differentiate with respect to intermediate tensors."
            )


def check_distinct(tensors: Sequence[Tensor], name: str) -> None:
    seen: dict[int, int] = {}
    for i, tensor in enumerate(tensors):
        if id(tensor) in seen:
            raise ValueError(
                f"`{name}` must not contain the same tensor twice. Found it at positions "
                f"{seen[id(tensor)]} and {i}."
            )
        seen[id(tensor)] = i


def check_chunk_size(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`parallel_chunk_size` must be None or a positive int. Found {value!r} of type "
            f"{type(value).__name__}."
        )
    if value <= 0:
        raise ValueError(
            f"`parallel_chunk_size` must be None (all rows at once) or a positive int (1: no "
            f"vmap at all). Found parallel_chunk_size={value}."
        )
    return value


def check_initial_jacobians(
    jacobians: object, outputs: Sequence[Tensor], name: str, outputs_name: str
) -> list[Tensor]:
    """One tensor ``[k, *output.shape]`` per output, with the same ``k ≥ 1`` for all."""
    initial = as_tensors(jacobians, name)
    if len(initial) != len(outputs):
        raise ValueError(
            f"`{name}` must have one tensor per tensor of `{outputs_name}` ({len(outputs)}). "
            f"Found {len(initial)}."
        )
    k = initial[0].shape[0] if initial[0].ndim > 0 else None
    for i, (J, output) in enumerate(zip(initial, outputs, strict=True)):
        expected = (k, *output.shape)
        if J.ndim == 0 or tuple(J.shape) != expected or k == 0:
            expected_str = "[" + ", ".join(["k", *map(str, output.shape)]) + "]"
            raise ValueError(
                f"`{name}[{i}]` must have shape {expected_str} (k ≥ 1 rows, the same k for all, "
                f"then the shape of `{outputs_name}[{i}]`). Found shape {tuple(J.shape)}."
            )
        if J.dtype != output.dtype or J.device != output.device:
            raise ValueError(
                f"`{name}[{i}]` must have the dtype and device of `{outputs_name}[{i}]` "
                f"({output.dtype}, {output.device}). Found {J.dtype}, {J.device}."
            )
    return initial


def check_existing_jacs(leaves: Sequence[Tensor], k: int, name: str) -> None:
    """An existing ``.jac`` field must have the shape of the one about to be added to it."""
    for i, leaf in enumerate(leaves):
        existing = getattr(leaf, "jac", None)
        if existing is None:
            continue
        expected = (k, *leaf.shape)
        if tuple(existing.shape) != expected:
            raise ValueError(
                f"`{name}[{i}].jac` already holds a tensor of shape {tuple(existing.shape)}, so "
                f"the new Jacobian of shape {expected} cannot be added to it. Delete the `.jac` "
                "fields (or call `jac_to_grad`) between two backward passes with a different "
                "number of objectives."
            )

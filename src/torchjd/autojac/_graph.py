"""Walks of the autograd graph: the leaves that a tensor depends on, and whether it depends on
given intermediate tensors. Iterative (no recursion limit on deep graphs), each node visited
once."""

from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.autograd.graph import Node


def _roots(tensors: Iterable[Tensor]) -> tuple[list[Node], list[Tensor]]:
    """The graph nodes that produced ``tensors``, and those of them that are leaves."""
    nodes, leaves = [], []
    for tensor in tensors:
        if tensor.grad_fn is not None:
            nodes.append(tensor.grad_fn)
        elif tensor.requires_grad:
            leaves.append(tensor)
    return nodes, leaves


def leaves_of(tensors: Sequence[Tensor], stop_at: Sequence[Tensor] = ()) -> list[Tensor]:
    """The leaves requiring grad on which ``tensors`` depend, in the order of a depth-first walk,
    without walking below the tensors of ``stop_at``."""
    return list(walk(tensors, stop_at)[1].values())


def walk(
    tensors: Sequence[Tensor], stop_at: Sequence[Tensor] = ()
) -> tuple[set[int], dict[int, Tensor]]:
    """The ids of the nodes visited by a depth-first walk from ``tensors`` that does not go below
    the tensors of ``stop_at``, and the leaves requiring grad that it reaches (by id, in the order
    of the walk)."""
    nodes, found = _roots(tensors)
    stops = {id(t.grad_fn) for t in stop_at if t.grad_fn is not None}
    stop_leaves = {id(t) for t in stop_at if t.grad_fn is None}
    leaves: dict[int, Tensor] = {id(t): t for t in found if id(t) not in stop_leaves}
    visited: set[int] = set()
    stack = [node for node in nodes if id(node) not in stops][::-1]
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if variable is not None:
            if id(variable) not in stop_leaves:
                leaves.setdefault(id(variable), variable)
            continue
        for child, _ in reversed(node.next_functions):
            if child is not None and id(child) not in visited and id(child) not in stops:
                stack.append(child)
    return visited, leaves


def nested(tensors: Sequence[Tensor]) -> bool:
    """Whether one of ``tensors`` depends on another (a walk from their nodes' inputs reaches the
    node of one of them, or one of them that is a leaf)."""
    targets = {id(t.grad_fn) if t.grad_fn is not None else id(t) for t in tensors}
    nodes, _ = _roots(tensors)
    stack = [child for node in nodes for child, _ in node.next_functions if child is not None]
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        variable = getattr(node, "variable", None)
        if id(node) in targets or (variable is not None and id(variable) in targets):
            return True
        if variable is None:
            stack.extend(child for child, _ in node.next_functions if child is not None)
    return False


def unreached(tensors: Sequence[Tensor], targets: Sequence[Tensor]) -> list[int]:
    """The positions of the ``targets`` on which none of ``tensors`` depends."""
    wanted: dict[int, list[int]] = {}
    for i, target in enumerate(targets):
        node = target.grad_fn if target.grad_fn is not None else None
        key = id(node) if node is not None else id(target)
        wanted.setdefault(key, []).append(i)
    nodes, leaves = _roots(tensors)
    reached = {id(leaf) for leaf in leaves}
    visited: set[int] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        reached.add(id(node))
        if id(node) in wanted:
            continue  # found: what lies below it does not matter
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return sorted(i for key, positions in wanted.items() if key not in reached for i in positions)

r"""Rules run during the Gramian's backward pass, as soon as their module's output gradients exist.

A backward pass that returns the gradients w.r.t. every hooked call's output holds them all at
its end: about the activations' size again, on top of the graph. Instead, the engine registers a
hook on each recorded output (and on the nodes of the points inside a call whose gradients its
rule wants); during the Gramian's backward pass, the hook of a module whose rule needs nothing
but the recorded tensors (its ``pure(module, calls)``) stores the gradient in the call, and once
every output of every call of the module has its gradient, the rule gives the module's block
:math:`J_\ell J_\ell^\top` and the gradients are released (or kept for the fused step), while
the pass goes on to the layers below.

The backward pass is asked (``inputs=``) only for the gradients that it must return: those of the
other calls, and of the lowest streamed outputs, with no other recorded output below them in the
graph. Asking for one of the others would make autograd keep its gradient to the end. Every
output above a requested one lies on the way to it, so autograd computes its gradient, and calls
its hook. A lowest output is not on the way to any requested gradient: its hook hands autograd a
stand-in (zero, expanded) to return in place of the gradient (unless other hooks of the tensor
follow ours: they would receive the stand-in).

A lowest output that reaches the rest of the graph only through an elementwise activation (a
convolution's ReLU, in a CNN; see :func:`activation_folds`) is not requested with one objective
per sample: the pass returns the gradient above the activation instead (its node is not run), and
the engine applies the activation's backward formula (autograd's own) in place on it
(:func:`fold_activation`), and hands the result to the rule after the pass. With the graph kept,
the activation's backward held the gradients above and below it together, often the largest of
the pass (on cnn64 of ``benchmarks/autogram_memory.py``, 16 MiB over 21 MiB of activations). The
hooks of the output are then not run: there is none but the engine's (those of the activation's
output run; a ``retain_grad`` of the output keeps no gradient, where without the fold it kept the
stand-in). Its node's own hooks would not run: the engine does not fold while a module has a
non-full backward hook (``Module.register_backward_hook``, or a module-wide one), which sits on
such a node; hooks put on the node itself (``grad_fn.register_hook``) are not seen. A pass that
frees the graph as it goes (a fused step's, see ``Engine.backward``) folds nothing: the
activation's node, not run, would keep its saved tensor (the activation's input or output) until
the graph is freed, beyond the pass.

With :math:`R > 1` objectives per sample, the pass is vectorised over the objectives (a
``vmap`` of the backward pass): a hook receives one objective's gradient as a batched tensor, and
takes the gradients of all :math:`R` objectives, ``[R, *shape]``, from the batched tensor's
storage. If the vectorised pass fails (an operation without a batching rule), the engine undoes
what the rules did and runs the pass again without the stream (see ``Engine._compute_gramian``).
"""

import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torchjd.autogram._module_call import ModuleCall, shape_only


class GramianStream:
    """The state of one streamed backward pass.

    :param modules: The calls of each module whose rule runs during the pass.
    :param lowest: The ``(call, output index)`` pairs whose gradients the pass returns.
    :param run: Runs the rule of a module (given its calls), once they all have their gradients.
    :param R: The number of objectives per sample (of the vectorised pass when > 1).
    """

    def __init__(
        self,
        modules: dict[nn.Module, list[ModuleCall]],
        lowest: set[tuple[int, int]],
        run: Callable[[nn.Module, list[ModuleCall]], None],
        R: int = 1,
    ) -> None:
        self.lowest = lowest
        self.run = run
        self.R = R
        self.module_of = {id(call): module for module, calls in modules.items() for call in calls}
        self.missing = {
            module: sum(len(call.edges) + len(call.inner_edges) for call in calls)
            for module, calls in modules.items()
        }
        self.calls = modules
        self.done: set[nn.Module] = set()
        self.reached: set[int] = set()  # the ids of the calls that received a gradient
        for calls in modules.values():
            for call in calls:
                call.grad_outputs = [None] * len(call.edges)
                call.inner_grads = [None] * len(call.inner_edges)

    def receive(
        self, call: ModuleCall, k: int, grad: Tensor, handle: RemovableHandle | None
    ) -> Tensor | None:
        """Stores the gradient w.r.t. output ``k`` of ``call``; runs the module's rule when it was
        the last one missing. Returns what autograd keeps in place of the gradient (None: the
        gradient itself): a stand-in for a lowest output, when no other hook of the tensor
        follows the one of ``handle`` (None: not a hook of the tensor), since they would receive
        it."""
        module = self.module_of.get(id(call))
        if module is None:
            return None
        grads = grad.unsqueeze(0) if self.R == 1 else all_objectives(grad, self.R)
        if k < len(call.edges):
            call.grad_outputs[k] = grads
        else:
            call.inner_grads[k - len(call.edges)] = grads
        self.reached.add(id(call))
        self.missing[module] -= 1
        if self.missing[module] == 0:
            self.run(module, self.calls[module])
            self.done.add(module)
        if handle is None or (id(call), k) not in self.lowest or not _is_last(handle):
            return None
        stand_in = call.outputs[k]  # kept by the engine for the output, with its metadata
        if (
            self.R == 1  # the gradient is not batched
            and type(grad) is Tensor
            and grad.dtype == stand_in.dtype
            and grad.shape == stand_in.shape
        ):
            return stand_in
        return shape_only(grad)


def all_objectives(grad: Tensor, R: int) -> Tensor:
    """The gradients ``[R, *shape]`` of every objective, from the gradient that a hook receives
    during the backward pass vectorised over the ``R`` objectives (batched at the innermost
    level of ``vmap``)."""
    level = torch._C._vmapmode_increment_nesting()  # one above the current level
    torch._C._vmapmode_decrement_nesting()
    return torch._remove_batch_dim(grad, level - 1, R, 0)  # type: ignore[attr-defined]


def streams_several_objectives() -> bool:
    """Whether this torch lets the hooks take the gradients of every objective (see above)."""
    return hasattr(torch, "_remove_batch_dim") and hasattr(torch._C, "_vmapmode_increment_nesting")


def lowest_edges(
    root: Any, edges: Sequence[tuple[Any, Any]], below: dict[Any, bool] | None = None
) -> set[Any]:
    """The keys of ``edges`` (pairs of a key and a gradient edge) whose node has no other edge's
    node below it in the graph from ``root`` (``below``: :func:`walk_graph`'s, for the nodes of
    ``edges``, if already known)."""
    if below is None:
        below = walk_graph(root, {edge.node for _, edge in edges})[1]
    return {key for key, edge in edges if not below.get(edge.node, False)}


def walk_graph(
    root: Any, nodes: set[Any], parents: dict[Any, list[Any]] | None = None
) -> tuple[dict[int, tuple[Tensor, int]], dict[Any, bool]]:
    """One walk of the graph from ``root``: the leaf tensors whose ``.grad`` a backward pass from
    ``root`` fills, by id, each with the number of graph edges that reach it (its uses), and for
    each node, whether one of ``nodes`` lies strictly below it (iterative post-order: graphs can
    be deeper than Python's recursion limit). With ``parents``, also fills it with the nodes from
    which an edge enters each of ``nodes`` (once per edge)."""
    leaves: dict[int, tuple[Tensor, int]] = {}
    below: dict[Any, bool] = {}
    if root is None:
        return leaves, below
    accumulate_grad = torch._C._functions.AccumulateGrad
    # each node with its edges (read once: each read builds a new tuple) and where it stands in
    # them; a leaf's node has no edges: it is not entered
    edges = root.next_functions
    stack: list[tuple[Any, Any, Iterator[Any]]] = [(root, edges, iter(edges))]
    while stack:
        node, edges, children = stack[-1]
        for child, _ in children:
            if child is None or child in below:
                continue
            below[child] = False  # visited (its own value is set when it is left)
            if type(child) is not accumulate_grad:
                child_edges = child.next_functions
                stack.append((child, child_edges, iter(child_edges)))
                break
        else:
            stack.pop()
            reaches = False
            for child, _ in edges:
                if child is None:
                    continue
                if child in nodes:
                    reaches = True
                    if parents is not None:
                        parents.setdefault(child, []).append(node)
                reaches = reaches or below[child]
                if type(child) is accumulate_grad:
                    leaf = child.variable
                    leaves[id(leaf)] = (leaf, leaves.get(id(leaf), (leaf, 0))[1] + 1)
            below[node] = reaches
    return leaves, below


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private: not in every torch
FOLDS_IN_PLACE = (
    _USE_COUNT is not None
    and sys.version_info < (3, 14)
    and tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 10)
)
"""Whether the engine folds activations (see :func:`activation_folds`): only where
:func:`fold_activation` can write in place (elsewhere the gradients above and below the activation
are alive together anyway), that is, where its test that nothing else holds the gradient reads the
counts as counted there: a storage's use count (a private function of torch), torch's own reference
to a tensor's base (since torch 2.10; before, a base held by one more Python variable read as held
by none), and CPython's counts of stack references (before 3.14, whose stack references may go
uncounted)."""

FOLD_MIN_BYTES = 1 << 20
"""The smallest gradient of a lowest output that :func:`activation_folds` folds with its
activation: the fold costs about 25 microseconds a step on one CPU thread (the capture of the
gradient above the activation, the checks, the backward formula out of the pass), 3 % of the whole
step of a 10-32-10 MLP on 16 samples, for no memory worth saving there."""

_aten = torch.ops.aten

IN_PLACE_BACKWARDS: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "ReluBackward0": lambda node, g: _aten.threshold_backward.grad_input(
        g, node._saved_result, 0, grad_input=g
    ),
    "GeluBackward0": lambda node, g: _aten.gelu_backward.grad_input(
        g, node._saved_self, approximate=node._saved_approximate, grad_input=g
    ),
    "SiluBackward0": lambda node, g: _aten.silu_backward.grad_input(
        g, node._saved_self, grad_input=g
    ),
    "LeakyReluBackward0": lambda node, g: _aten.leaky_relu_backward.grad_input(
        g, node._saved_self, node._saved_negative_slope, False, grad_input=g
    ),
    "TanhBackward0": lambda node, g: _aten.tanh_backward.grad_input(
        g, node._saved_result, grad_input=g
    ),
    "SigmoidBackward0": lambda node, g: _aten.sigmoid_backward.grad_input(
        g, node._saved_result, grad_input=g
    ),
}
"""The elementwise activations whose backward formula (autograd's own, of the node's type) the
engine applies in place, given the node and the gradient ``g`` w.r.t. its output (of the shape
and dtype of its saved tensor): it returns ``g``, overwritten by the gradient w.r.t. the input."""


def activation_folds(
    keyed: Sequence[tuple[tuple[int, int], Any]],
    lowest: set[tuple[int, int]],
    calls: dict[int, ModuleCall],
    parents: dict[Any, list[Any]],
) -> dict[tuple[int, int], Any]:
    """Among the ``lowest`` streamed outputs (keys of ``keyed``, pairs of a key and a gradient
    edge; ``calls`` by id), those whose gradient reaches the graph only through an elementwise
    activation (a node of ``IN_PLACE_BACKWARDS``, its only entry in ``parents``:
    :func:`walk_graph`'s) with no other input, with no other recorded edge at either node, no hook
    of the output but the engine's, and a gradient of at least ``FOLD_MIN_BYTES``: each with its
    activation's node (see :func:`fold_activation`)."""
    count: dict[Any, int] = {}
    for _, edge in keyed:
        count[edge.node] = count.get(edge.node, 0) + 1
    folds = {}
    for key, edge in keyed:
        if key not in lowest:  # (the lowest are streamed calls')
            continue
        call = calls[key[0]]
        if key[1] >= len(call.edges) or count[edge.node] > 1:
            continue
        output = call.outputs[key[1]]
        if output.numel() * output.element_size() < FOLD_MIN_BYTES:
            continue
        above = parents.get(edge.node, [])
        if len(above) != 1 or type(above[0]).__name__ not in IN_PLACE_BACKWARDS:
            continue
        node = above[0]
        (child, nr), *rest = node.next_functions
        hooks = call.grad_hooks[key[1]].hooks_dict_ref() if call.grad_hooks else None
        if (
            node not in count
            and child is edge.node
            and nr == edge.output_nr
            and not rest
            and hooks is not None
            and len(hooks) == 1
        ):
            folds[key] = node
    return folds


def fold_activation(node: Any, grad: Tensor) -> Tensor:
    """The gradient ``[*shape]`` below the activation of ``node`` (see ``IN_PLACE_BACKWARDS``)
    from the one above it, ``grad`` ``[1, *shape]``, by autograd's own formula: written over
    ``grad`` when nothing else holds it, as returned by the pass (``batched_grad``'s view of
    autograd's tensor), so that the gradients above and below the activation are never both in
    memory; otherwise, and for another dtype, by the node itself (a new tensor). (In place only
    where the reference counts read as counted here, ``FOLDS_IN_PLACE``, and where the node's
    saved tensors are where this torch keeps them.)"""
    base = grad._base
    owned = (
        base is not None
        and _USE_COUNT is not None
        and sys.getrefcount(grad) <= 3  # the caller's, the argument, getrefcount's
        and sys.getrefcount(base) <= 3  # grad's, ours, getrefcount's
        and _dense(base)
        and base.numel() == grad.numel()
        and _USE_COUNT(grad.untyped_storage()._cdata) <= 3  # grad's, base's, this storage object's
    )
    del base
    saved = getattr(node, "_saved_result", None)
    saved = getattr(node, "_saved_self", None) if saved is None else saved
    with torch.no_grad():  # the saved tensors require grad
        if owned and isinstance(saved, Tensor) and saved.dtype == grad.dtype:
            try:
                return IN_PLACE_BACKWARDS[type(node).__name__](node, grad[0])
            except AttributeError:  # (another torch's names of the saved values: not written yet)
                pass
        return node(grad[0])


def _dense(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds its elements once each, without gaps, in the default or a
    channels-last layout (a convolution's output may have either)."""
    if tensor.is_contiguous():
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    return layout is not None and tensor.is_contiguous(memory_format=layout)


def register_grad_hooks(
    engine: "weakref.ref[Any]", call: ModuleCall, outputs: Sequence[Tensor]
) -> list[RemovableHandle]:
    """Registers the hooks that hand the gradients w.r.t. the call's ``outputs`` and inner edges
    to the engine's stream, if a streamed pass is running (both held weakly: the hooks live in
    the graph). An output's is a hook of the tensor (it runs even where autograd only returns
    the gradient); an inner edge's, a pre-hook of its node (it runs when the node runs)."""
    call_ref = weakref.ref(call)
    handles: list[RemovableHandle] = []

    def receive(k: int, grad: Tensor | None, handle: RemovableHandle | None) -> Tensor | None:
        alive, recorded = engine(), call_ref()
        stream = None if alive is None else alive._stream
        if stream is None or recorded is None or grad is None:
            return None
        return stream.receive(recorded, k, grad, handle)

    for k, output in enumerate(outputs):

        def hook(grad: Tensor, k: int = k) -> Tensor | None:
            return receive(k, grad, handles[k])

        handles.append(output.register_hook(hook))
    for j, edge in enumerate(call.inner_edges):

        def pre_hook(
            grad_outputs: Any, k: int = len(outputs) + j, nr: int = edge.output_nr
        ) -> None:
            receive(k, grad_outputs[nr], None)

        handles.append(edge.node.register_prehook(pre_hook))
    return handles


def _is_last(handle: RemovableHandle) -> bool:
    """Whether the hook of ``handle`` is the last one of its tensor: the hooks after it would
    receive what it returns."""
    hooks = handle.hooks_dict_ref()
    return hooks is not None and next(reversed(hooks), None) == handle.id

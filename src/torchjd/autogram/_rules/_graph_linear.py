r"""The linear maps inside a call's autograd graph, found without re-running the call.

A module that applies ``F.linear`` (or ``x @ w.T``) to intermediate tensors, like
``MultiheadAttention`` with its projections, leaves in the graph of its output one matrix
product node per map: ``addmm(b, X, W^T)`` or ``mm(X, W^T)``, whose saved ``X`` is the map's
input ``[N, d_in]`` (rows: positions, of every sample). The weight ``W`` is a parameter, or a
block of rows of one (``w.chunk``, ``w.split``). The gradient of the objectives w.r.t. the node's
output ``[N, d_out]``, collected by the engine's single backward pass (the node is one of the
call's ``inner_edges``), is :math:`\Gamma`, and the map's weight gradient is
:math:`\Gamma^\top X`, as for a ``Linear`` layer.

The search accepts a graph only when it can account for every use of the parameters: each
parameter's rows are covered exactly once by the found maps, and no other node reaches them.

As for ``Linear`` layers, a map whose per-objective gradients are formed whole (see
:func:`~torchjd.autogram._rules._linear.linear_keeps_jacobian`) keeps them for the fused step in
place of :math:`\Gamma`.
"""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.autograd.graph import GradientEdge

from torchjd.autogram._fused import call_walk
from torchjd.autogram._module_call import ModuleCall, cat, gram, weighted
from torchjd.autogram._onednn import symmetric, transposed_product
from torchjd.autogram._rules._linear import (
    add_lean_gramian,
    lean_applies,
    weight_gramian_and_jacobian,
    weighted_jacobian,
)


@dataclass
class GraphLinear:
    """One linear map found in a call's graph: ``weight[row : row + d_out]`` applied to ``X``."""

    weight: Tensor
    row: int
    d_out: int
    X: Tensor
    edge: GradientEdge


_PRODUCTS = {"AddmmBackward0": 2, "MmBackward0": 1}  # the index of W^T among the node's inputs
_SPLITS = {"SplitBackward0", "SplitWithSizesBackward0"}
_PATH = {"TBackward0", "AccumulateGrad", *_SPLITS}  # the nodes that a weight's path may hold


def find_graph_linears(call: ModuleCall, weights: list[Tensor]) -> list[GraphLinear] | None:
    """The linear maps of the call whose weights are (blocks of rows of) ``weights``, sorted by
    weight and row, or None when the graph holds other uses of ``weights`` or leaves rows of one
    uncovered.

    One walk of the call's nodes (from its outputs down to its inputs, each once), which counts
    the graph edges into the nodes that a weight's path may hold (transpositions, splits, leaves'
    accumulators), the only counts that the checks read."""
    owned = {id(w): w for w in weights}
    uses: dict[Any, int] = {}  # the number of graph edges into each node of _PATH kind
    found: list[GraphLinear] = []
    chain: dict[Any, set[Any]] = {}  # node of a found weight path -> its parents on such paths
    for node, edges in call_walk(call):
        for child, _ in edges:
            if type(child).__name__ in _PATH:
                uses[child] = uses.get(child, 0) + 1
        index = _PRODUCTS.get(type(node).__name__)
        if index is None:  # most nodes (the call's own operations)
            continue
        linear = _as_linear(node, index, edges, owned)
        if linear is not None:
            found.append(linear[0])
            for parent, child in itertools.pairwise([node, *linear[1]]):
                chain.setdefault(child, set()).add(parent)
    for node in uses:
        if node in chain or type(node).__name__ != "AccumulateGrad":
            continue
        if id(node.variable) in owned:
            return None  # a use of a weight that is not one of the found maps
    if any(uses.get(node) != len(users) for node, users in chain.items()):
        return None  # a transposed or split weight used elsewhere too
    order = {id(w): k for k, w in enumerate(weights)}
    found.sort(key=lambda f: (order[id(f.weight)], f.row))
    for w in weights:
        rows = [(f.row, f.d_out) for f in found if f.weight is w]
        starts = [0] + [row + d for row, d in rows]
        if not rows or [row for row, _ in rows] != starts[:-1] or starts[-1] != w.shape[0]:
            return None
    return found


def _as_linear(
    node: Any, index: int, edges: tuple[Any, ...], owned: dict[int, Tensor]
) -> tuple[GraphLinear, list[Any]] | None:
    """The linear map of a product node (whose ``next_functions`` are ``edges``, ``W^T`` at
    ``index``) whose weight is owned, with the nodes of its weight's path (transposition, split,
    accumulation), or None."""
    transpose, _ = edges[index]
    if type(transpose).__name__ != "TBackward0":
        return None
    source, output_nr = transpose.next_functions[0]
    path = [transpose]
    row = 0
    if type(source).__name__ in _SPLITS:
        if source._saved_dim != 0:
            return None
        if type(source).__name__ == "SplitBackward0":
            row = output_nr * source._saved_split_size
        else:
            row = sum(source._saved_split_sizes[:output_nr])
        path.append(source)
        source, _ = source.next_functions[0]
    weight = getattr(source, "variable", None)
    if not isinstance(weight, Tensor) or id(weight) not in owned:
        return None
    path.append(source)
    if index == 2:
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return None
        X = node._saved_mat1
    else:
        X = node._saved_self
    d_out = node._saved_mat2_sym_sizes[1]
    return GraphLinear(weight, row, d_out, X, GradientEdge(node, 0)), path


BiasOf = Callable[[GraphLinear], tuple[Tensor | None, int]]
"""The bias added to a map's output, if any, and the row of the bias where it starts."""


def graph_linear_gramian(
    calls: Sequence[ModuleCall],
    linears: list[list[GraphLinear]],
    bias_of: BiasOf,
    owner: object = None,
) -> Tensor:
    r"""The Gramian of the maps' weights (and biases): the sum of their ``Linear`` blocks, each
    map's calls concatenated along the positions.

    :param linears: For each call, its maps (the same weights and rows for every call), whose
        inputs' rows are (position, sample) pairs, the samples varying fastest.
    :param owner: The module whose engine buffers hold the kept per-objective gradients (one per
        map) from step to step; None: new tensors.
    """
    G: Tensor | int = 0
    lean: Tensor | None = None  # the maps' Gramians by add_lean_gramian, made symmetric at the end
    pairs = list(zip(calls, linears, strict=True))
    kept: dict[int, tuple[Tensor, Tensor | None]] = {}
    for k, first in enumerate(linears[0]):
        X = cat([_inputs_by_sample(c, found[k].X) for c, found in pairs], dim=1)
        Gamma = cat([_grads_by_sample(c, k, found[k]) for c, found in pairs], dim=2)
        bias, _ = bias_of(first)
        with_bias = bias is not None and bias.requires_grad
        if lean_applies(X, Gamma):
            lean = add_lean_gramian(lean, X, Gamma, with_bias)
            continue
        sums = Gamma.sum(dim=2) if with_bias else None
        G_w, J = weight_gramian_and_jacobian(X, Gamma, owner, f"jacobian {k}")
        G = G + G_w if sums is None else G + G_w + gram(sums)
        if J is not None:  # kept for the fused step in place of Γ (see _linear.py)
            kept[k] = (J, sums)
            for call in calls:
                call.inner_grads[k] = None
    calls[0].saved["jacobians"] = kept
    return G if lean is None else G + symmetric(lean)  # type: ignore[return-value]


def graph_linear_weighted_gradients(
    calls: Sequence[ModuleCall], linears: list[list[GraphLinear]], bias_of: BiasOf, W: Tensor
) -> list[tuple[Tensor, Tensor]]:
    r"""The gradients of the weighted objectives w.r.t. the maps' weights and biases:
    :math:`\sum_i \bar\Gamma_i^\top X_i` and :math:`\sum_i \sum_t \bar\gamma_{it}` per map, the
    blocks of rows of a parameter concatenated.

    :param W: The weights ``[B, R]`` of the objectives.
    """
    pieces: dict[int, tuple[Tensor, dict[int, Tensor]]] = {}  # parameter -> (it, row -> block)
    kept = calls[0].saved.get("jacobians", {})
    for k, first in enumerate(linears[0]):
        weight_grad: Tensor | int = 0
        bias_grad: Tensor | int = 0
        if k in kept:
            flat, summed = weighted_jacobian(*kept[k], W)
            weight_grad, bias_grad = (
                flat.reshape(first.d_out, -1),
                0 if summed is None else summed,
            )
        for call, found in zip(calls, linears, strict=True):
            gamma = call.inner_grads[k]  # None when kept
            if gamma is None:
                continue
            gamma_bar = _weighted_rows(call, gamma, W)  # [N, d_out]
            weight_grad = weight_grad + transposed_product(
                gamma_bar, found[k].X.to(gamma_bar.dtype)
            )
            bias_grad = bias_grad + gamma_bar.sum(dim=0)
        if isinstance(weight_grad, int):
            weight_grad = first.weight.new_zeros(first.d_out, first.weight.shape[1])
            bias_grad = first.weight.new_zeros(first.d_out)
        bias, bias_row = bias_of(first)
        for param, row, grad in (
            (first.weight, first.row, weight_grad),
            (bias, bias_row, bias_grad),
        ):
            if param is not None and param.requires_grad:
                pieces.setdefault(id(param), (param, {}))[1][row] = grad  # type: ignore[assignment]
    return [
        (param, cat([blocks[row] for row in sorted(blocks)], dim=0))
        for param, blocks in pieces.values()
    ]


def _inputs_by_sample(call: ModuleCall, X: Tensor) -> Tensor:
    """Rows ``[T B, d]`` (the samples varying fastest) as ``[B, T, d]``."""
    if call.batch_dim is None:
        return X.unsqueeze(0)
    B = call.num_samples
    return X.reshape(-1, B, X.shape[-1]).transpose(0, 1)


def _grads_by_sample(call: ModuleCall, k: int, linear: GraphLinear) -> Tensor:
    """The objectives' gradients w.r.t. the map's output, ``[R, T B, d]``, as ``[B, R, T, d]``."""
    gamma = call.inner_grads[k]
    R = call.num_objectives_per_sample
    if gamma is None:
        gamma = linear.X.new_zeros(R, linear.X.shape[0], linear.d_out)
    if call.batch_dim is None:
        return gamma.unsqueeze(0)
    B = call.num_samples
    return gamma.reshape(R, -1, B, gamma.shape[-1]).permute(2, 0, 1, 3)


def _weighted_rows(call: ModuleCall, gamma: Tensor, W: Tensor) -> Tensor:
    r""":math:`\bar\Gamma` ``[T B, d]`` of gradients ``[R, T B, d]``."""
    if call.batch_dim is None:
        return weighted(gamma, None, W)
    R, N, d = gamma.shape
    B = call.num_samples
    return weighted(gamma.reshape(R, N // B, B, d), 1, W).reshape(N, d)

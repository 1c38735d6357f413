"""The search for the linear maps inside a call's graph (``find_graph_linears``, one walk of the
call's nodes): it finds every map of the given weights, with its rows and input, and refuses a
graph where a weight has another use inside the call, a row block is used twice or left out, or a
transposed weight serves elsewhere too; uses below the call's inputs do not count."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from torchjd.autogram._engine import _gradient_edge
from torchjd.autogram._module_call import ModuleCall
from torchjd.autogram._rules._graph_linear import find_graph_linears

N, D = 5, 6


def _call(inputs: Sequence[Tensor], output: Tensor) -> ModuleCall:
    """A call with positional ``inputs`` and one ``output``, as the engine records it."""
    return ModuleCall(
        args=tuple(inputs),
        kwargs={},
        outputs=[output],
        output_batch_dims=[None],
        batch_dim=None,
        edges=[_gradient_edge(output)],
    )


def _weight(rows: int = D) -> Tensor:
    return torch.randn(rows, D, dtype=torch.float64, requires_grad=True)


def _input() -> Tensor:
    return torch.randn(N, D, dtype=torch.float64, requires_grad=True)


def test_finds_each_map_with_its_rows_and_input() -> None:
    x, w1, b1, w2 = _input(), _weight(), torch.randn(D, dtype=torch.float64), _weight(4)
    b1.requires_grad_()
    h = F.linear(x, w1, b1)
    y = F.linear(torch.tanh(h), w2)
    found = find_graph_linears(_call([x], y), [w2, w1])
    assert found is not None
    assert [(f.weight is w, f.row, f.d_out) for f, w in zip(found, [w2, w1], strict=True)] == [
        (True, 0, 4),
        (True, 0, D),
    ]  # sorted by the order of the weights given
    assert torch.equal(found[0].X, torch.tanh(h))
    assert torch.equal(found[1].X, x)
    assert found[1].edge.node is h.grad_fn  # the product's output: where Γ is collected


def test_row_blocks_of_one_weight() -> None:
    x, w = _input(), _weight(2 * D)
    q, k = w.chunk(2)
    y = F.linear(x, q) * F.linear(x, k)
    found = find_graph_linears(_call([x], y), [w])
    assert found is not None
    assert [(f.row, f.d_out) for f in found] == [(0, D), (D, D)]
    q, k = w.split([D - 2, D + 2])
    y = F.linear(x, k) + F.linear(x, q).sum()
    found = find_graph_linears(_call([x], y), [w])
    assert found is not None
    assert [(f.row, f.d_out) for f in found] == [(0, D - 2), (D - 2, D + 2)]


def test_refuses_a_weight_with_another_use() -> None:
    x, w = _input(), _weight()
    assert find_graph_linears(_call([x], F.linear(x, w) + w.sum()), [w]) is None
    assert find_graph_linears(_call([x], F.linear(x, w) + F.linear(2 * x, w)), [w]) is None
    transposed = w.t()
    assert find_graph_linears(_call([x], x @ transposed + transposed.sum()), [w]) is None


def test_refuses_uncovered_rows_and_missing_weights() -> None:
    x, w, other = _input(), _weight(2 * D), _weight()
    q, _ = w.chunk(2)
    assert find_graph_linears(_call([x], F.linear(x, q)), [w]) is None
    assert find_graph_linears(_call([x], F.linear(x, other)), [other, _weight()]) is None


def test_uses_below_the_inputs_do_not_count() -> None:
    x, w, other = _input(), _weight(), _weight()
    h = F.linear(x, w) + w.sum()  # before the call: not part of its graph
    y = F.linear(h, w) + F.linear(h, other)  # another weight's map is not one of those asked
    found = find_graph_linears(_call([h], y), [w])
    assert found is not None
    assert len(found) == 1
    assert found[0].weight is w
    assert torch.equal(found[0].X, h)

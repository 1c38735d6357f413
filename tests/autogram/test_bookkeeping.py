"""The engine's bookkeeping against independent references: the graph walk (leaves, their uses,
what lies below each node), the uses of the parameters inside the recorded calls, the stand-ins
kept from step to step, and the grad mode in which the rules run."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

import torchjd.autogram._engine as engine_module
from tests.autogram._helpers import assert_gramian_exact
from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine, register_rule
from torchjd.autogram._fused import call_graph, calls_uses
from torchjd.autogram._streaming import walk_graph

ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def reachable(roots: list) -> set:
    """The nodes reachable from ``roots`` (themselves included), by a breadth-first search."""
    seen: set = set()
    queue = [node for node in roots if node is not None]
    while queue:
        node = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        queue.extend(child for child, _ in node.next_functions if child is not None)
    return seen


def leaf_edges(nodes: set) -> dict[int, int]:
    """The graph edges from ``nodes`` into each leaf's node, by the leaf's id."""
    uses: dict[int, int] = {}
    for node in nodes:
        for child, _ in node.next_functions:
            if type(child) is ACCUMULATE_GRAD:
                uses[id(child.variable)] = uses.get(id(child.variable), 0) + 1
    return uses


def random_graph(data: st.DataObject) -> tuple[Tensor, set, list[Tensor]]:
    """A random computation on a few leaves (some used several times, some inputs that require
    grad), its output, and a random set of its nodes (operations and leaves' nodes)."""
    leaves = [torch.randn(3, requires_grad=True) for _ in range(data.draw(st.integers(1, 4)))]
    pool: list[Tensor] = list(leaves)
    for _ in range(data.draw(st.integers(1, 12))):
        a = pool[data.draw(st.integers(0, len(pool) - 1))]
        b = pool[data.draw(st.integers(0, len(pool) - 1))]
        op = data.draw(st.sampled_from(["add", "mul", "tanh", "split", "twice"]))
        if op == "add":
            pool.append(a + b)
        elif op == "mul":
            pool.append(a * b)
        elif op == "tanh":
            pool.append(torch.tanh(a))
        elif op == "split":  # a node with several outputs
            pool.extend(torch.cat([a, b]).split(3))
        else:
            pool.append(a * a + a)
    used = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=4))
    output = sum(pool[k] for k in used)
    if not isinstance(output, Tensor) or output.grad_fn is None:
        output = pool[-1].sum() + leaves[0].sum()
    marked = data.draw(st.lists(st.integers(0, len(pool) - 1), max_size=5))
    nodes = {get_gradient_edge(pool[k]).node for k in marked}
    return output, nodes, leaves


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_walk_graph_matches_a_breadth_first_reference(data):
    output, nodes, _ = random_graph(data)
    leaves, below = walk_graph(output.grad_fn, nodes)
    everything = reachable([output.grad_fn])
    assert set(below) == everything
    for node in everything:  # strictly below: among the nodes reachable from its children
        under = reachable([child for child, _ in node.next_functions])
        assert below[node] == bool(under & nodes)
    assert {key: count for key, (_, count) in leaves.items()} == leaf_edges(everything)
    assert all(id(leaf) == key for key, (leaf, _) in leaves.items())


class TwiceLinear(nn.Module):
    """Uses its weight twice in each call."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight.T) @ self.weight.T


def region(call) -> set:
    """The nodes of a call: reachable from its outputs but not from its inputs (the nodes below
    its inputs were all created before it)."""
    inputs = [t.grad_fn for t in call.args if isinstance(t, Tensor) and t.grad_fn is not None]
    return reachable([edge.node for edge in call.edges]) - reachable(inputs)


def region_uses(call) -> dict[int, int]:
    """The uses of each leaf inside a call: edges from its nodes."""
    return leaf_edges(region(call))


def test_uses_inside_the_calls_match_the_reference():
    torch.manual_seed(0)
    linear, twice = nn.Linear(3, 3), TwiceLinear()
    with Engine(linear, twice, batch_dim=0) as engine:
        x = torch.randn(4, 3, requires_grad=True)
        # the Linear called three times, chained (a call's input is the previous call's output)
        # and on another branch; its weight also used outside the calls
        h = linear(linear(x)) + twice(linear(x)) + twice(x)
        output = h.sum(dim=1) + linear.weight.sum()
        reference = {}
        for module in (linear, twice):
            calls = engine._calls[module]
            total: dict[int, int] = {}
            for call in calls:
                assert calls_uses([call]) == region_uses(call)
                nodes = list(call_graph(call))
                assert len(nodes) == len(set(nodes))
                operations = {node for node in region(call) if type(node) is not ACCUMULATE_GRAD}
                leaves = {  # a leaf's node may also lie below the inputs: it is the call's too
                    child
                    for node in operations
                    for child, _ in node.next_functions
                    if type(child) is ACCUMULATE_GRAD
                }
                assert set(nodes) == operations | leaves
                for key, count in region_uses(call).items():
                    total[key] = total.get(key, 0) + count
            assert calls_uses(calls) == total
            reference[module] = total
        assert reference[linear][id(linear.weight)] == 3
        assert reference[linear][id(linear.bias)] == 3
        assert reference[twice][id(twice.weight)] == 4
        graph_uses = walk_graph(output.grad_fn, set())[0]
        assert graph_uses[id(linear.weight)][1] == 4  # the use outside the calls
        engine.compute_gramian(output)


def test_stand_ins_follow_shapes_and_dtypes_and_stay_bounded(monkeypatch):
    monkeypatch.setattr(engine_module, "_MAX_STAND_INS", 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    with Engine(model, batch_dim=0) as engine:
        shapes = [(2, 1), (3, 2), (2, 1), (4, 3), (5, 1), (5, 1), (2, 1), (3, 2)]
        for step, shape in enumerate(shapes):  # shapes, dtype, trainable parameters change
            if step == 5:  # the shape of the step before, another dtype
                model.float()
            model[0].weight.requires_grad_(step % 3 != 1)
            dtype = model[0].weight.dtype
            x = torch.randn(*shape, 4, dtype=dtype)
            output = model(x).sum(dim=(1, 2))
            for module in (model[0], model[2]):
                (call,) = engine._calls[module]
                assert call.outputs[0].shape == (*x.shape[:-1], module.out_features)
                assert call.outputs[0].dtype == dtype
            params = [p for p in model.parameters() if p.requires_grad]
            G = engine.compute_gramian(output)
            expected = brute_force_gramian(output, params)
            tolerance = 1e-10 if dtype == torch.float64 else 1e-5
            assert (G - expected).abs().max() <= tolerance * expected.abs().max()
            assert len(engine._stand_ins) <= 3
            assert len(engine._zeros) == (1 if step < 5 else 2)  # one zero per dtype, expanded
        engine.close()
        assert not engine._stand_ins
        assert not engine._zeros


def test_one_module_on_two_branches_of_equal_shapes_in_the_fused_step():
    """Both calls are lowest streamed outputs: autograd returns the stand-in of each."""
    torch.manual_seed(0)
    shared = nn.Linear(3, 2)
    head = nn.Linear(2, 1)
    x, z = torch.randn(5, 3), torch.randn(5, 3)

    def forward() -> Tensor:
        return head(torch.tanh(shared(x)) * shared(z)).squeeze(dim=1)

    G = assert_gramian_exact([shared, head], forward, batch_dim=0)
    weights = UPGradWeighting()(G)
    forward().backward(weights)
    expected = [p.grad.clone() for p in (*shared.parameters(), *head.parameters())]
    for p in (*shared.parameters(), *head.parameters()):
        p.grad = None
    with Engine(shared, head, batch_dim=0) as engine:
        returned = engine.backward(forward(), UPGradWeighting())
    assert torch.allclose(returned, weights, rtol=0, atol=1e-12)
    for p, grad in zip((*shared.parameters(), *head.parameters()), expected, strict=True):
        assert (p.grad - grad).abs().max() <= 1e-10 * grad.abs().max()


class Offset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b


def test_rules_run_without_grad_during_and_after_the_pass():
    modes: list[bool] = []

    def offset_rule(module: nn.Module, calls) -> Tensor:
        modes.append(torch.is_grad_enabled())
        J = sum(call.grad_output(0)[0] for call in calls)  # [B, 3]
        return J @ J.T

    register_rule(Offset, offset_rule)
    torch.manual_seed(0)
    offset, linear = Offset(), nn.Linear(3, 3)
    x = torch.randn(4, 3)
    G = assert_gramian_exact([offset, linear], lambda: linear(offset(x)).square().sum(dim=1), 0)
    assert not G.requires_grad
    offset_rule.pure = lambda module, calls: True  # now streamed: run during the pass
    G = assert_gramian_exact([offset, linear], lambda: linear(offset(x)).square().sum(dim=1), 0)
    assert not G.requires_grad
    assert modes == [False, False]


def test_sum_of_blocks_is_a_new_tensor_equal_to_the_sum_from_zeros():
    torch.manual_seed(0)
    output = torch.randn(4)
    square = [torch.randn(4, 4) for _ in range(3)]
    others = [  # another dtype, a transposed view, a block that broadcasts
        [square[0], square[1].float()],
        [square[0], square[1].T],
        [square[0], torch.randn(4)],
    ]
    for blocks in [square[:1], square[:2], square, *others]:
        expected = torch.zeros(4, 4)
        for block in blocks:
            expected = expected + block
        G = engine_module._sum_blocks(blocks, output, 4)
        assert torch.equal(G, expected.to(output.dtype))
        assert G.dtype == output.dtype
        assert G.is_contiguous()
        assert all(G.data_ptr() != block.data_ptr() for block in blocks)
        G.add_(1.0)  # the blocks are left as they were
        assert not any(torch.equal(G, block) for block in blocks if block.shape == G.shape)

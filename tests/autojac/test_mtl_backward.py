"""mtl_backward: task parameters get each task's gradient, shared parameters the Jacobian of the
task losses, compared with one autograd call per task."""

import pytest
import torch
from torch import nn

from torchjd.aggregation import Mean, UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward


def _setup(n_tasks: int = 3):
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU()).double()
    heads = [nn.Linear(5, 1).double() for _ in range(n_tasks)]
    x = torch.randn(7, 4, dtype=torch.float64)
    targets = torch.randn(n_tasks, 7, dtype=torch.float64)

    def losses():
        features = trunk(x)
        values = [
            ((h(features).squeeze(-1) - t) ** 2).mean() for h, t in zip(heads, targets, strict=True)
        ]
        return features, values

    return trunk, heads, losses


def _manual(trunk, heads, losses, scales=None):
    _, values = losses()
    shared = list(trunk.parameters())
    rows, head_grads = [], []
    for i, (head, loss) in enumerate(zip(heads, values, strict=True)):
        scale = None if scales is None else scales[i]
        grads = torch.autograd.grad(
            loss, shared + list(head.parameters()), scale, retain_graph=True
        )
        rows.append(grads[: len(shared)])
        head_grads.append(grads[len(shared) :])
    jacs = [torch.stack([row[j] for row in rows]) for j in range(len(shared))]
    return jacs, head_grads


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_equals_per_task_autograd(chunk: int | None):
    trunk, heads, losses = _setup()
    expected_jacs, expected_head_grads = _manual(trunk, heads, losses)
    features, values = losses()
    mtl_backward(values, features=features, parallel_chunk_size=chunk)
    for p, J in zip(trunk.parameters(), expected_jacs, strict=True):
        torch.testing.assert_close(p.jac, J, rtol=1e-12, atol=1e-12)
        assert p.grad is None
    for head, grads in zip(heads, expected_head_grads, strict=True):
        for p, g in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
            assert not hasattr(p, "jac")


def test_explicit_params_grad_tensors_and_accumulation():
    trunk, heads, losses = _setup(2)
    scales = [torch.tensor(2.0, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)]
    expected_jacs, expected_head_grads = _manual(trunk, heads, losses, scales)
    for _ in range(2):
        features, values = losses()
        mtl_backward(
            values,
            features=[features],
            grad_tensors=scales,
            tasks_params=[heads[0].parameters(), heads[1].parameters()],
            shared_params=trunk.parameters(),
        )
    for p, J in zip(trunk.parameters(), expected_jacs, strict=True):
        torch.testing.assert_close(p.jac, 2 * J)
    for head, grads in zip(heads, expected_head_grads, strict=True):
        for p, g in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, 2 * g)


def test_with_jac_to_grad_mean_is_the_gradient_of_the_mean_loss():
    trunk, _, losses = _setup()
    _, values = losses()
    torch.stack(values).mean().backward()
    expected = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad(set_to_none=True)

    features, values = losses()
    mtl_backward(values, features=features)
    jac_to_grad(trunk.parameters(), Mean())
    for p, g in zip(trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


def test_upgrad_step_conflicts_with_no_task():
    trunk, _, losses = _setup(4)
    features, values = losses()
    mtl_backward(values, features=features)
    J = torch.cat([p.jac.flatten(1) for p in trunk.parameters()], dim=1)
    jac_to_grad(trunk.parameters(), UPGrad())
    g = torch.cat([p.grad.flatten() for p in trunk.parameters()])
    assert bool((J @ g >= -1e-6 * J.norm() * g.norm()).all())


@pytest.mark.parametrize(
    ("make_call", "match"),
    [
        (lambda f, v: ([], {"features": f}), "`tensors` must contain at least one tensor"),
        (
            lambda f, v: (v, {"features": torch.ones(5, requires_grad=True)}),
            r"do not depend on `features\[0\]`",
        ),
        (lambda f, v: (v, {"features": []}), "`features` must contain at least one tensor"),
        (lambda f, v: ([f.sum(1), *v], {"features": f}), r"`tensors\[0\]` must be a scalar"),
        (
            lambda f, v: (v, {"features": f, "grad_tensors": [torch.ones(())]}),
            "one tensor per loss",
        ),
        (lambda f, v: (v, {"features": f, "tasks_params": [[]]}), "one iterable of parameters"),
        (
            lambda f, v: (v, {"features": f, "shared_params": [f]}),
            r"`shared_params\[0\]` must be a leaf",
        ),
        (lambda f, v: (v, {"features": f, "parallel_chunk_size": 0}), "parallel_chunk_size=0"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(make_call, match: str):
    trunk, heads, losses = _setup()
    features, values = losses()
    args, kwargs = make_call(features, values)
    with pytest.raises((ValueError, TypeError), match=match):
        mtl_backward(args, **kwargs)
    for module in [trunk, *heads]:
        for p in module.parameters():
            assert not hasattr(p, "jac")
            assert p.grad is None


def test_a_parameter_listed_by_two_tasks_gets_the_sum_of_their_gradients():
    trunk = nn.Linear(3, 4).double()
    common = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    features = trunk(x)
    loss1 = (features @ common).sum()
    loss2 = (features @ common).pow(2).sum()
    expected = torch.autograd.grad(loss1 + loss2, common, retain_graph=True)[0]
    mtl_backward([loss1, loss2], features=features, tasks_params=[[common], [common]])
    torch.testing.assert_close(common.grad, expected)
    assert not hasattr(common, "jac")


def test_no_shared_params_trains_the_heads_only():
    """As the published ``mtl_backward``: with ``shared_params=[]`` the task parameters get their
    gradients and no ``.jac`` is filled."""
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    heads = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    features = x @ w
    mtl_backward([(features @ h).sum() for h in heads], features=features, shared_params=[])
    assert not hasattr(w, "jac")
    assert w.grad is None
    for h in heads:
        torch.testing.assert_close(h.grad, features.detach().sum(dim=0))


def _freed(loss: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """Whether backpropagating ``loss`` to ``inputs`` again fails because the graph was freed."""
    try:
        torch.autograd.grad(loss, inputs, allow_unused=True)
    except RuntimeError as error:
        if "second time" not in str(error):
            raise
        return True
    return False


@pytest.mark.parametrize("retain_graph", [False, True])
def test_the_heads_graphs_are_freed_unless_retained(retain_graph: bool):
    # As the published library: without retain_graph, the whole graph is freed, heads included,
    # so that their saved tensors do not outlive the call.
    trunk, heads, losses = _setup()
    features, values = losses()
    mtl_backward(values, features=features, retain_graph=retain_graph)
    for head, loss in zip(heads, values, strict=True):
        assert _freed(loss, list(head.parameters())) != retain_graph
    assert _freed(features.sum(), list(trunk.parameters())) != retain_graph


def _shared_graph_cases():
    trunk, heads, _ = _setup(3)
    x = torch.randn(7, 4, dtype=torch.float64)

    def head_shares_a_node():  # the second and third losses share the second head's output
        features = trunk(x)
        out1, out2 = heads[0](features), heads[1](features).tanh()
        values = [(out1**2).mean(), (out2**2).mean(), (out2 * heads[2](features)).mean()]
        return features, values, [heads[0], heads[1], heads[2]]

    def skip_around_the_features():  # a loss also reads the trunk below the features (its
        # head's pass must then keep the trunk's graph)
        hidden = trunk[1](trunk[0](x))
        features = trunk[3](trunk[2](hidden))
        values = [
            (heads[0](features) ** 2).mean(),
            (heads[1](features) ** 2).mean() + hidden.sin().mean(),
            (heads[2](features) ** 2).mean(),
        ]
        return features, values, heads

    def nested_features():  # the second feature is computed from the first (as in a pyramid)
        low = trunk[1](trunk[0](x))
        high = trunk[3](trunk[2](low))
        values = [
            (heads[0](high) ** 2).mean(),
            (heads[1](high) ** 2).mean() + (low**2).mean(),
            (heads[2](high) * low.sum(dim=1, keepdim=True)).mean(),
        ]
        return [low, high], values, heads

    return trunk, [head_shares_a_node, skip_around_the_features, nested_features]


@pytest.mark.parametrize("case", [0, 1, 2])
def test_heads_sharing_nodes_with_each_other_or_the_trunk_are_still_exact(case: int):
    trunk, cases = _shared_graph_cases()
    make = cases[case]
    shared = list(trunk.parameters())
    features, values, heads = make()
    head_params = [list(h.parameters()) for h in heads]
    expected = []  # (the shared parameters' rows go through the features only, by definition)
    for loss, params in zip(values, head_params, strict=True):
        feats = features if isinstance(features, list) else [features]
        grads = torch.autograd.grad(loss, [*feats, *params], retain_graph=True, allow_unused=True)
        grads = [
            torch.zeros_like(t) if g is None else g
            for g, t in zip(grads, feats + params, strict=True)
        ]
        row = torch.autograd.grad(feats, shared, grads[: len(feats)], retain_graph=True)
        expected.append([*row, *grads[len(feats) :]])
    features, values, _ = make()
    mtl_backward(values, features=features, tasks_params=head_params, shared_params=shared)
    for j, p in enumerate(shared):
        torch.testing.assert_close(p.jac, torch.stack([e[j] for e in expected]), rtol=0, atol=1e-12)
    for params, e in zip(head_params, expected, strict=True):  # (each head listed by one task)
        for p, g in zip(params, e[len(shared) :], strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


def test_a_task_parameter_below_the_features_keeps_the_trunk_graph():
    # Its head's pass runs through the trunk: freeing it would break the trunk's pass.
    trunk, heads, losses = _setup(2)
    below = trunk[0].weight
    shared = list(trunk[2].parameters())
    tasks = [[*heads[0].parameters(), below], list(heads[1].parameters())]
    features, values = losses()
    expected_below = torch.autograd.grad(values[0], below, retain_graph=True)[0]
    expected_rows = [torch.autograd.grad(v, shared, retain_graph=True) for v in values]
    mtl_backward(values, features=features, tasks_params=tasks, shared_params=shared)
    torch.testing.assert_close(below.grad, expected_below, rtol=1e-12, atol=1e-12)
    for j, p in enumerate(shared):
        torch.testing.assert_close(p.jac, torch.stack([r[j] for r in expected_rows]))

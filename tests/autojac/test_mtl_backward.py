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

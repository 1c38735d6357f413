"""backward: the Jacobian equals autograd's per-objective gradients; aggregated with Mean or Sum it
gives exactly the .grad of autograd's mean or sum."""

import pytest
import torch
from torch import nn

from tests.autojac.models import MODELS, per_sample_losses
from torchjd.aggregation import Mean, Sum
from torchjd.autojac import backward, jac_to_grad

CHUNKS = {"mlp": None, "cnn": None, "rnn": 1, "transformer": None}


def _autograd_grads(model: nn.Module, x: torch.Tensor, reduce: str) -> list[torch.Tensor]:
    losses = per_sample_losses(model, x)
    getattr(losses, reduce)().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("reduce", "aggregator"), [("mean", Mean), ("sum", Sum)])
def test_aggregated_jacobian_is_autograd_gradient(name: str, reduce: str, aggregator: type):
    model, x = MODELS[name]()
    expected = _autograd_grads(model, x, reduce)

    backward(per_sample_losses(model, x), parallel_chunk_size=CHUNKS[name])
    weights = jac_to_grad(model.parameters(), aggregator())

    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
        assert not hasattr(p, "jac")
    assert weights is not None
    m = x.shape[0]
    torch.testing.assert_close(
        weights, torch.full((m,), 1 / m if reduce == "mean" else 1.0, dtype=x.dtype)
    )


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 100])
def test_rows_are_per_objective_gradients(chunk: int | None):
    model, x = MODELS["mlp"]()
    losses = per_sample_losses(model, x)
    expected = [
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in losses
    ]
    backward(losses, parallel_chunk_size=chunk)
    for j, p in enumerate(model.parameters()):
        assert p.jac.shape == (len(losses), *p.shape)
        for i in range(len(losses)):
            torch.testing.assert_close(p.jac[i], expected[i][j], rtol=1e-12, atol=1e-12)


def test_several_tensors_of_any_shape_are_flattened_in_order():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    a = torch.outer(w, w)  # 9 objectives
    b = w.sum()  # 1 objective
    backward([a, b], retain_graph=True)
    rows = [torch.autograd.grad(y, w, retain_graph=True)[0] for y in [*a.flatten(), b]]
    torch.testing.assert_close(w.jac, torch.stack(rows))


def test_jac_tensors_are_initial_jacobians():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = torch.stack([w.sin().sum(), (w**2).sum(), w.prod()])
    J0 = torch.randn(2, 3, dtype=torch.float64)
    backward(y, jac_tensors=J0, retain_graph=True)
    full = torch.stack([torch.autograd.grad(y_i, w, retain_graph=True)[0] for y_i in y])
    torch.testing.assert_close(w.jac, J0 @ full)


def test_jac_accumulates_and_inputs_restrict():
    model, x = MODELS["mlp"]()
    first, last = next(iter(model.parameters())), list(model.parameters())[-1]
    backward(per_sample_losses(model, x), inputs=[first])
    once = first.jac.clone()
    assert not hasattr(last, "jac")
    backward(per_sample_losses(model, x), inputs=[first])
    torch.testing.assert_close(first.jac, 2 * once)


def test_non_leaf_that_retains_grad_gets_jac():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    h = 2 * w
    h.retain_grad()
    backward(torch.stack([h.sum(), (h**2).sum()]), inputs=[h])
    torch.testing.assert_close(h.jac, torch.stack([torch.ones_like(h), 2 * h.detach()]))


def test_retain_graph_allows_a_second_pass():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = (w.exp() * 2).sum()
    backward(y, retain_graph=True)
    backward(y)
    torch.testing.assert_close(w.jac, 2 * (2 * w.detach().exp()).unsqueeze(0))
    with pytest.raises(RuntimeError, match="second time"):
        backward(y)


def _w() -> torch.Tensor:
    return torch.randn(3, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda w: backward([]), "`tensors` must contain at least one tensor"),
        (lambda w: backward(torch.empty(0, requires_grad=True)), r"`tensors\[0\]` is empty"),
        (lambda w: backward(torch.ones(2)), r"`tensors\[0\]` does not require grad"),
        (lambda w: backward("loss"), "`tensors` must be a torch.Tensor"),
        (lambda w: backward(w.sum(), inputs=[torch.ones(2)]), r"`inputs\[0\]` must require grad"),
        (lambda w: backward(w.sum(), inputs=[w * 2]), r"`inputs\[0\]` must be a leaf"),
        (lambda w: backward(w.sum(), inputs=[w, w]), "must not contain the same tensor twice"),
        (
            lambda w: backward(w.sum(), jac_tensors=torch.ones(2, 3)),
            r"`jac_tensors\[0\]` must have shape \[k\]",
        ),
        (
            lambda w: backward([w.sum(), w], jac_tensors=[w.new_ones(2), w.new_ones(3, 3)]),
            r"`jac_tensors\[1\]` must have shape \[k, 3\]",
        ),
        (
            lambda w: backward(w.sum(), jac_tensors=[w.new_ones(1), w.new_ones(1)]),
            "one tensor per tensor of `tensors`",
        ),
        (
            lambda w: backward(w.sum(), jac_tensors=torch.ones(1, dtype=torch.float32)),
            "dtype and device",
        ),
        (lambda w: backward(w.sum(), parallel_chunk_size=0), "parallel_chunk_size=0"),
        (lambda w: backward(w.sum(), parallel_chunk_size=2.0), "must be None or a positive int"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(call, match: str):
    w = _w()
    with pytest.raises((ValueError, TypeError), match=match):
        call(w)
    assert not hasattr(w, "jac")
    assert w.grad is None


def test_existing_jac_of_other_shape_is_refused_untouched():
    w = _w()
    y = torch.stack([w.sum(), w.prod()])
    backward(y, retain_graph=True)
    before = w.jac.clone()
    with pytest.raises(ValueError, match=r"already holds a tensor of shape \(2, 3\)"):
        backward(y[0])
    torch.testing.assert_close(w.jac, before)
    backward(y)  # the graph was not consumed by the refused call
    torch.testing.assert_close(w.jac, 2 * before)


class _ScalarBackward(torch.autograd.Function):
    """Doubles its input; its backward reads a Python number, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.sum().item() * 0 + 2)


def test_layers_that_vmap_cannot_batch_work_with_chunks_of_one():
    w = _w()
    y = _ScalarBackward.apply(w)
    with pytest.raises(RuntimeError, match="parallel_chunk_size=1"):
        backward(y, retain_graph=True)
    assert not hasattr(w, "jac")
    backward(y, parallel_chunk_size=1)
    torch.testing.assert_close(w.jac, 2 * torch.eye(3, dtype=torch.float64))


def test_no_inputs_fills_nothing():
    """As the published ``backward``: with ``inputs=[]`` nothing is filled (the tensors are still
    checked), and the graph can still be used."""
    w = _w()
    y = (w**2).sum()
    backward(y, inputs=[], retain_graph=True)
    assert not hasattr(w, "jac")
    assert w.grad is None
    backward(y)
    torch.testing.assert_close(w.jac, 2 * w.detach().unsqueeze(0))
    with pytest.raises(ValueError, match=r"`tensors\[0\]` does not require grad"):
        backward(torch.ones(2), inputs=[])

"""jac: compared with brute force, one torch.autograd.grad call per objective."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.autojac import jac


def _brute_force(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    rows = [
        torch.autograd.grad(y, inputs, retain_graph=True, allow_unused=True, materialize_grads=True)
        for output in outputs
        for y in output.flatten()
    ]
    return [torch.stack([row[j] for row in rows]) for j in range(len(inputs))]


@given(
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n_outputs=st.integers(1, 3),
    chunk=st.sampled_from([None, 1, 2, 3]),
)
def test_equals_brute_force(shape: list[int], n_outputs: int, chunk: int | None):
    gen = torch.Generator().manual_seed(len(shape) * 10 + n_outputs)
    a = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(tuple(shape), dtype=torch.float64, generator=gen, requires_grad=True)
    h = a.tanh()  # a non-leaf input
    outputs = [(h.sum() * (i + 1) + b.sin() * h[i]) for i in range(n_outputs)]
    inputs = [a, h, b]
    expected = _brute_force(outputs, inputs)
    result = jac(outputs, inputs, parallel_chunk_size=chunk)
    assert isinstance(result, tuple)
    for J, E in zip(result, expected, strict=True):
        torch.testing.assert_close(J, E, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_jac_outputs_and_unused_inputs(chunk: int | None):
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y = torch.stack([x.prod(), x.norm()])
    V = torch.randn(5, 2, dtype=torch.float64)
    (Jx, Ju) = jac(y, [x, unused], jac_outputs=V, retain_graph=True, parallel_chunk_size=chunk)
    (full,) = _brute_force([y], [x])
    torch.testing.assert_close(Jx, V @ full)
    torch.testing.assert_close(Ju, torch.zeros(5, 2, 2, dtype=torch.float64))
    assert not hasattr(x, "jac")
    assert x.grad is None


def test_a_leaf_can_be_an_output():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (J,) = jac(x, x)
    torch.testing.assert_close(J, torch.eye(2))


def test_single_tensor_input_returns_a_tuple():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (J,) = jac((x**2).sum(), x)
    torch.testing.assert_close(J, torch.tensor([[2.0, 4.0]]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: jac([], [x]), "`outputs` must contain at least one tensor"),
        (lambda x: jac(x.sum(), [torch.ones(1)]), r"`inputs\[0\]` must require grad"),
        (lambda x: jac(torch.ones(2), [x]), r"`outputs\[0\]` does not require grad"),
        (
            lambda x: jac(x.sum(), [x], jac_outputs=torch.ones(0, dtype=x.dtype)),
            r"`jac_outputs\[0\]` must have shape \[k\]",
        ),
        (lambda x: jac(x.sum(), [x], parallel_chunk_size=-1), "parallel_chunk_size=-1"),
    ],
)
def test_bad_input_is_refused(call, match: str):
    x = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x)


def test_no_inputs_gives_an_empty_tuple():
    """As the published ``jac``: the Jacobians with respect to no input are none (the outputs are
    still checked)."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    assert jac((x**2).sum(), []) == ()
    with pytest.raises(ValueError, match=r"`outputs\[0\]` does not require grad"):
        jac(torch.ones(2), [])

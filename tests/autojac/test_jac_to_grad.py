"""jac_to_grad: the aggregation of the concatenated Jacobian, split into .grad; the block-wise
Gramian path gives the same result; refusals leave every field as it was."""

import pytest
import torch
from torch import Tensor

from torchjd.aggregation import MGDA, Aggregator, DualProj, Mean, UPGrad
from torchjd.autojac import jac_to_grad

SHAPES = [(3, 4), (4,), (), (2, 1, 3)]


def _params_with_jacs(m: int = 3, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    params = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in SHAPES]
    for p in params:
        p.jac = torch.randn(m, *p.shape, dtype=dtype)
    return params


def _matrix(params: list[Tensor]) -> Tensor:
    return torch.cat([p.jac.reshape(p.jac.shape[0], -1) for p in params], dim=1)


@pytest.mark.parametrize("aggregator", [UPGrad(), DualProj(), MGDA(), Mean()])
def test_grad_is_aggregation_of_the_concatenated_jacobian(aggregator: Aggregator):
    params = _params_with_jacs()
    expected = aggregator(_matrix(params))
    weights = jac_to_grad(params, aggregator)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), expected)
    for p in params:
        assert not hasattr(p, "jac")
        assert p.grad.shape == p.shape
    assert weights is not None
    assert weights.shape == (3,)


@pytest.mark.parametrize("aggregator", [UPGrad(), DualProj(), MGDA()])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_blockwise_gramian_gives_the_same_grads(aggregator: Aggregator, m: int):
    params = _params_with_jacs(m)
    jacs = [p.jac.clone() for p in params]
    w_default = jac_to_grad(params, aggregator)
    default = [p.grad for p in params]
    for p, J in zip(params, jacs, strict=True):
        p.grad = None
        p.jac = J
    w_blocks = jac_to_grad(params, aggregator, optimize_gramian_computation=True)
    for p, g in zip(params, default, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
        assert not hasattr(p, "jac")
    torch.testing.assert_close(w_blocks, w_default, rtol=1e-9, atol=1e-12)


def test_hooks_of_the_aggregator_are_never_bypassed():
    params = _params_with_jacs()
    aggregator = UPGrad()
    seen: list[Tensor] = []
    aggregator.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    expected = aggregator(_matrix(params))
    seen.clear()
    jac_to_grad(params, aggregator, optimize_gramian_computation=True)
    assert len(seen) == 1
    assert seen[0].shape == (3, sum(p.numel() for p in params))
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), expected)


def test_accumulates_into_grad_and_retains_jac():
    params = _params_with_jacs()
    jacs = [p.jac.clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    expected = UPGrad()(_matrix(params))
    jac_to_grad(params, UPGrad(), retain_jac=True)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), expected + 1)
    for p, J in zip(params, jacs, strict=True):
        torch.testing.assert_close(p.jac, J)
    jac_to_grad(params, UPGrad(), retain_jac=True, optimize_gramian_computation=True)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), 2 * expected + 1)


def test_float32_parameters():
    params = _params_with_jacs(dtype=torch.float32)
    expected = UPGrad()(_matrix(params))
    jac_to_grad(params, UPGrad())
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), expected)
    assert all(p.grad.dtype == torch.float32 for p in params)


class _NotWeighted(Aggregator):
    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.max(dim=0).values


class _Failing(Aggregator):
    def forward(self, matrix: Tensor, /) -> Tensor:
        raise RuntimeError("solver failed")


def test_returns_none_for_an_aggregator_without_weights():
    params = _params_with_jacs()
    expected = _matrix(params).max(dim=0).values
    assert jac_to_grad(params, _NotWeighted()) is None
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), expected)


def _no_jac(params: list[Tensor]) -> None:
    del params[2].jac


def _other_rows(params: list[Tensor]) -> None:
    params[3].jac = torch.randn(4, *params[3].shape, dtype=torch.float64)


def _wrong_shape(params: list[Tensor]) -> None:
    params[1].jac = torch.randn(3, 5, dtype=torch.float64)


@pytest.mark.parametrize(
    ("corrupt", "kwargs", "match", "error"),
    [
        (_no_jac, {}, r"`tensors\[2\]` \(shape \(\)\) has no `.jac` field", ValueError),
        (_other_rows, {}, r"3 rows in `tensors\[0\].jac` and 4 in `tensors\[3\].jac`", ValueError),
        (_wrong_shape, {}, r"`tensors\[1\].jac` must have shape \[m, \*tensors", ValueError),
        (None, {"aggregator": Mean(), "optimize_gramian_computation": True}, "needs", ValueError),
        (None, {"aggregator": "upgrad"}, "must be a torchjd.aggregation.Aggregator", TypeError),
        (None, {"aggregator": _Failing()}, "solver failed", RuntimeError),
    ],
)  # fmt: skip
def test_refusals_leave_every_field_as_it_was(corrupt, kwargs: dict, match: str, error: type):
    params = _params_with_jacs()
    if corrupt is not None:
        corrupt(params)
    before = [getattr(p, "jac", None) for p in params]
    before = [None if J is None else J.clone() for J in before]
    with pytest.raises(error, match=match):
        jac_to_grad(params, **({"aggregator": UPGrad()} | kwargs))
    for p, J in zip(params, before, strict=True):
        assert p.grad is None
        if J is None:
            assert not hasattr(p, "jac")
        else:
            torch.testing.assert_close(p.jac, J)


def test_empty_or_repeated_tensors_are_refused():
    with pytest.raises(ValueError, match="`tensors` must contain at least one tensor"):
        jac_to_grad(iter([]), UPGrad())
    p = _params_with_jacs()[0]
    with pytest.raises(ValueError, match="same tensor twice"):
        jac_to_grad([p, p], UPGrad())

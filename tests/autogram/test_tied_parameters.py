"""A module holding one tensor under two of its own names: the closed-form rules treat the names
as distinct parameters and would miss the cross terms of the two uses, so the engine gives such a
module the generic rule. Gramians and fused steps against brute force (float64)."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_fused import assert_fused_exact, leaves_of

B = 4


def _layer_norm() -> tuple[nn.Module, Callable[[], Tensor]]:
    norm = nn.LayerNorm(5)
    norm.bias = norm.weight  # (weight and bias have one shape)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
    model = nn.Sequential(norm, nn.Linear(5, 2))
    x = torch.randn(B, 3, 5)
    return model, lambda: model(x).sum(dim=(1, 2))


def _group_norm() -> tuple[nn.Module, Callable[[], Tensor]]:
    norm = nn.GroupNorm(2, 4)
    norm.bias = norm.weight
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4))
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(12, 1))
    x = torch.randn(B, 4, 3)
    return model, lambda: model(x).squeeze(1)


def _recurrent(kind: type[nn.RNNBase]) -> tuple[nn.Module, Callable[[], Tensor]]:
    rnn = kind(4, 4, batch_first=True)
    rnn.weight_hh_l0 = rnn.weight_ih_l0  # input and hidden sizes are equal
    rnn.bias_hh_l0 = rnn.bias_ih_l0
    head = nn.Linear(4, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    x = torch.randn(B, 3, 4)
    return model, lambda: head(rnn(x)[0][:, -1]).squeeze(1)


def _attention() -> tuple[nn.Module, Callable[[], Tensor]]:
    mha = nn.MultiheadAttention(6, 2, batch_first=True, vdim=3)  # separate projections
    mha.out_proj.weight = mha.q_proj_weight  # a child's parameter tied to the module's own
    head = nn.Linear(6, 1)
    model = nn.ModuleDict({"mha": mha, "head": head})
    x, v = torch.randn(B, 5, 6), torch.randn(B, 5, 3)
    return model, lambda: head(mha(x, x, v)[0]).sum(dim=(1, 2))


CASES = {
    "layer_norm": _layer_norm,
    "group_norm": _group_norm,
    "rnn": lambda: _recurrent(nn.RNN),
    "lstm": lambda: _recurrent(nn.LSTM),
    "gru": lambda: _recurrent(nn.GRU),
    "attention": _attention,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tied_parameters_within_a_module(name: str) -> None:
    torch.manual_seed(0)
    model, forward = CASES[name]()
    assert_gramian_exact([model], forward, 0)
    assert_fused_exact([model], forward, 0, leaves_of([model]))

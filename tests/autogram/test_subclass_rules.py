"""Subclasses of the layers that have closed-form rules: a subclass that changes the computation
(its own ``forward``, or the method that ``forward`` calls) gets the exact generic rule, one that
does not keeps the closed form."""

import pytest
import torch
from torch import Tensor, nn

from tests.autogram._helpers import assert_gramian_exact
from torchjd.autogram import Engine
from torchjd.autogram._rules._generic import generic_rule, generic_subtree_rule
from torchjd.autogram._rules._linear import linear_rule


class DoubledLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x) + self.weight.sum()


class InitialisedLinear(nn.Linear):  # another initialisation, the same computation
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        nn.init.normal_(self.bias)


class SquaredEmbedding(nn.Embedding):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) ** 2


class CircularConv(nn.Conv1d):
    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(nn.functional.pad(x, (1, 1), mode="circular"), weight, bias)


class ShiftedLayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.weight


class ScaledAttention(nn.MultiheadAttention):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> tuple[Tensor, Tensor | None]:
        out, weights = super().forward(q, k, v, **kwargs)
        return out * self.out_proj.bias.sum(), weights


def _data(kind: str) -> Tensor:
    torch.manual_seed(0)
    if kind == "embedding":
        return torch.randint(0, 7, (4, 3))
    if kind == "conv":
        return torch.randn(4, 2, 6, dtype=torch.float64)
    return torch.randn(4, 3, 5, dtype=torch.float64)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: DoubledLinear(5, 3), "sequence"),
        (lambda: SquaredEmbedding(7, 3), "embedding"),
        (lambda: CircularConv(2, 3, 3), "conv"),
        (lambda: ShiftedLayerNorm(5), "sequence"),
    ],
)
def test_a_subclass_that_changes_the_computation_is_exact(make, kind: str):
    torch.manual_seed(1)
    module = make().to(torch.float64)
    x = _data(kind)
    rules = Engine(module, batch_dim=0)._rules
    assert rules[module][0] is generic_rule
    assert_gramian_exact([module], lambda: module(x).flatten(1).pow(2).sum(dim=1), batch_dim=0)


def test_an_attention_subclass_with_its_own_forward_is_exact():
    torch.manual_seed(2)
    attention = ScaledAttention(4, 2, batch_first=True, dtype=torch.float64)
    nn.init.normal_(attention.out_proj.bias)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    assert Engine(attention, batch_dim=0)._rules[attention][0] is generic_subtree_rule
    assert_gramian_exact(
        [attention], lambda: attention(x, x, x)[0].pow(2).sum(dim=(1, 2)), batch_dim=0
    )


def test_a_subclass_with_the_same_computation_keeps_the_closed_form():
    torch.manual_seed(3)
    linear = InitialisedLinear(5, 3, dtype=torch.float64)
    x = _data("sequence")
    assert Engine(linear, batch_dim=0)._rules[linear][0] is linear_rule
    assert_gramian_exact([linear], lambda: linear(x).pow(2).sum(dim=(1, 2)), batch_dim=0)

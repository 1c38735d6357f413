"""The fused step keeps a layer's per-objective gradients in place of its output gradients when
they are at most ``KEEP_RATIO`` times larger (and are the Gramian's cheaper path): exact against
the two-pass step (float64, 1e-10) on either side of the ratio, for Linear layers and the
projections of attention found in the graph."""

import pytest
import torch
from torch import Tensor, nn

import torchjd.autogram._rules._graph_linear as graph_linear_module
import torchjd.autogram._rules._linear as linear_module
from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_fused import assert_fused_exact, leaves_of


def _count(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    used: list[int] = []
    original = getattr(module, name)

    def spy(*args: object) -> object:
        used.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return used


@pytest.mark.parametrize("ratio", [1, 8])
def test_linear_keeps_up_to_the_ratio(ratio, monkeypatch):
    """8 input features, 4 positions: the per-objective gradients are twice the output gradients,
    kept at ratio 8 and not at ratio 1."""
    monkeypatch.setattr(linear_module, "KEEP_RATIO", ratio)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    used = _count(monkeypatch, linear_module, "_weighted_rows")
    layer = nn.Linear(8, 3)
    x = torch.randn(5, 4, 8)

    def forward() -> Tensor:
        return layer(x).tanh().pow(2).sum(dim=(1, 2))

    assert_gramian_exact([layer], forward, 0)
    assert_fused_exact([layer], forward, 0, leaves_of([layer]))
    assert bool(used) == (ratio == 8)


@pytest.mark.parametrize("ratio", [1, 8])
def test_attention_projections_keep_up_to_the_ratio(ratio, monkeypatch):
    monkeypatch.setattr(linear_module, "KEEP_RATIO", ratio)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    used = _count(monkeypatch, graph_linear_module, "weighted_jacobian")
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 4, 8)

    def forward() -> Tensor:
        return attention(x, x, x)[0].pow(2).sum(dim=(1, 2))

    assert_gramian_exact([attention], forward, 0)
    assert_fused_exact([attention], forward, 0, leaves_of([attention]))
    assert bool(used) == (ratio == 8)


def test_gradients_from_kept_jacobians_are_contiguous(monkeypatch):
    """The gradients weighted from the kept (transposed) per-objective gradients are laid out as
    the parameters, as autograd's are."""
    from torchjd.aggregation import MeanWeighting
    from torchjd.autogram import Engine

    monkeypatch.setattr(linear_module, "KEEP_RATIO", 8)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    used = _count(monkeypatch, linear_module, "_weighted_rows")
    conv, layer = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 4)
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(2, 2, 5, 5)
    with Engine(conv, layer, attention, batch_dim=0) as engine:
        h = layer(conv(x).flatten(2).transpose(1, 2))  # [2, 25, 4]
        losses = attention(h, h, h)[0].pow(2).sum(dim=(1, 2))
        engine.backward(losses, MeanWeighting())
    assert used
    for param in [*conv.parameters(), *layer.parameters(), *attention.parameters()]:
        assert param.grad is not None
        assert param.grad.is_contiguous()

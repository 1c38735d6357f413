"""The fused step keeps a layer's per-objective gradients in place of its output gradients when
they are at most ``SMALL_KEEP_RATIO`` times larger (``KEEP_RATIO`` beyond ``CHUNK_BYTES``) and are
the Gramian's cheaper path: exact against the two-pass step (float64, 1e-10) on either side of the
ratio, for Linear layers and the projections of attention found in the graph, with one or several
objectives per sample, in the engine's buffers from step to step."""

import pytest
import torch
from torch import Tensor, nn

import torchjd.autogram._rules._graph_linear as graph_linear_module
import torchjd.autogram._rules._linear as linear_module
from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_fused import assert_fused_exact, leaves_of
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine


def _count(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    used: list[int] = []
    original = getattr(module, name)

    def spy(*args: object) -> object:
        used.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return used


def _set_ratio(monkeypatch: pytest.MonkeyPatch, ratio: int, small: bool) -> None:
    """The ratio that applies (``SMALL_KEEP_RATIO`` when ``small``, else ``KEEP_RATIO``, with a
    ``CHUNK_BYTES`` that every Jacobian exceeds) set to ``ratio``, the other to the opposite
    answer."""
    applied, other = (
        ("SMALL_KEEP_RATIO", "KEEP_RATIO") if small else ("KEEP_RATIO", "SMALL_KEEP_RATIO")
    )
    monkeypatch.setattr(linear_module, applied, ratio)
    monkeypatch.setattr(linear_module, other, 9 - ratio)
    if not small:
        monkeypatch.setattr(linear_module, "CHUNK_BYTES", 1)


@pytest.mark.parametrize(
    ("jacobian_bytes", "gamma_bytes", "expected"),
    [
        (1 << 20, 1 << 17, True),  # 8 times, small
        ((1 << 20) + 8, 1 << 17, False),
        (1 << 24, 1 << 21, True),  # 8 times, CHUNK_BYTES
        ((1 << 24) + 8, ((1 << 24) + 8) // 8, False),  # 8 times, beyond CHUNK_BYTES
        (1 << 26, 1 << 25, True),  # twice, large
        (1 << 26, (1 << 25) - 1, False),
    ],
)
def test_linear_keeps_jacobian(jacobian_bytes, gamma_bytes, expected):
    assert linear_module.linear_keeps_jacobian(jacobian_bytes, gamma_bytes) == expected


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("ratio", [1, 8])
def test_linear_keeps_up_to_the_ratio(ratio, small, monkeypatch):
    """8 input features, 4 positions: the per-objective gradients are twice the output gradients,
    kept at ratio 8 and not at ratio 1."""
    _set_ratio(monkeypatch, ratio, small)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    used = _count(monkeypatch, linear_module, "_weighted_rows")
    layer = nn.Linear(8, 3)
    x = torch.randn(5, 4, 8)

    def forward() -> Tensor:
        return layer(x).tanh().pow(2).sum(dim=(1, 2))

    assert_gramian_exact([layer], forward, 0)
    assert_fused_exact([layer], forward, 0, leaves_of([layer]))
    assert bool(used) == (ratio == 8)


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("ratio", [1, 8])
def test_attention_projections_keep_up_to_the_ratio(ratio, small, monkeypatch):
    _set_ratio(monkeypatch, ratio, small)
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


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "attention": nn.MultiheadAttention(8, 2, batch_first=True),
            "linear": nn.Linear(8, 3),
        }
    ).double()


def _objectives(model: nn.Module, x: Tensor, R: int) -> Tensor:
    """``[B, R]`` objectives (``[B]`` for ``R = 1``); the Linear layer called twice."""
    h = model["attention"](x, x, x)[0]
    y = model["linear"](h).tanh() + model["linear"](h.flip(1)).pow(2)  # [B, T, 3]
    losses = torch.stack([y[..., r % 3].mul(r + 1).sum(dim=1) for r in range(R)], dim=1)
    return losses[:, 0] if R == 1 else losses


@pytest.mark.parametrize("R", [1, 3])
def test_kept_with_several_objectives_per_sample(R, monkeypatch):
    """The per-objective gradients, formed per objective of the samples (rows by objective, then
    sample), give the Gramian and the fused step's gradients exactly."""
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    in_linear = _count(monkeypatch, linear_module, "weighted_jacobian")
    in_graph = _count(monkeypatch, graph_linear_module, "weighted_jacobian")
    model = _encoder()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    modules = [model["attention"], model["linear"]]
    assert_gramian_exact(modules, lambda: _objectives(model, x, R), 0)
    assert_fused_exact(modules, lambda: _objectives(model, x, R), 0, leaves_of(modules))
    assert len(in_linear) == 1
    assert len(in_graph) == 2  # the two projections of attention found in the graph


@pytest.mark.parametrize("fused", [False, True])
def test_kept_jacobians_in_the_engine_buffers(fused, monkeypatch):
    """Over steps of varying batch sizes, the same Gramians (or weights) and gradients as a new
    engine at each step; in fused steps, the per-objective gradients formed in one buffer per
    Linear layer and per projection of attention, of the last step's shape, kept as long as the
    shape stays; with ``compute_gramian`` (nothing to keep them for), no buffer held."""
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    model = _encoder()
    engine = Engine(model, batch_dim=0)
    pointers = []
    for batch in [3, 3, 2, 4, 4]:
        x = torch.randn(batch, 5, 8, dtype=torch.float64)
        results = []
        reference = _encoder()
        reference.load_state_dict(model.state_dict())
        for step_model, step_engine in [
            (reference, Engine(reference, batch_dim=0)),
            (model, engine),
        ]:
            step_model.zero_grad()
            losses = _objectives(step_model, x, 2)
            if fused:
                first = step_engine.backward(losses, UPGradWeighting())
            else:
                first = step_engine.compute_gramian(losses)
                losses.backward(torch.ones_like(losses))
            results.append([first, *(p.grad for p in step_model.parameters())])
        for result, expected in zip(*results, strict=True):
            torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
        buffers = list(engine._workspaces._buffers.values())
        if not fused:
            assert buffers == []
            continue
        assert len(buffers) == 3  # in_proj and out_proj of attention, the Linear
        assert all(buffer.shape[:2] == (2, batch) for buffer in buffers)
        pointers.append([buffer.data_ptr() for buffer in buffers])
    if fused:
        assert pointers[1] == pointers[0]
        assert pointers[4] == pointers[3]

"""The convolution rule's Gramian of float32 per-objective gradients by oneDNN's matrix product
(see ``_onednn.py``, tested in ``test_onednn.py``): taken by the rule (grouped, unfolded or looped
paths) and agreeing with float64 brute force there; never taken in float64."""

import pytest
import torch
from torch import Tensor, nn

import torchjd.autogram._onednn as onednn
import torchjd.autogram._rules._conv as conv_module
from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_conv_per_sample import force_loop, objectives
from torchjd.autogram import Engine

pytestmark = pytest.mark.skipif(
    onednn.onednn_linear() is None, reason="needs oneDNN's linear layer"
)


@pytest.fixture
def onednn_gram(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Takes the oneDNN Gramian for blocks of any size; records the shape of each use."""
    used: list[tuple[int, ...]] = []
    gram = conv_module.onednn_blocks_gram

    def spy(J: Tensor) -> Tensor:
        used.append(tuple(J.shape))
        return gram(J)

    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(onednn, "TRIANGLE_ROWS", 4)
    monkeypatch.setattr(onednn, "WHOLE_MAX_ROWS", 0)
    monkeypatch.setattr(conv_module, "onednn_blocks_gram", spy)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    return used


CONVS = {
    "grouped": lambda dtype: nn.Conv2d(8, 6, 3, stride=(1, 2), padding=1, dtype=dtype),
    "unfolded": lambda dtype: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect", dtype=dtype),
    "looped": lambda dtype: nn.Conv2d(4, 6, (3, 2), groups=2, padding=(1, 0), dtype=dtype),
    "conv1d_no_bias": lambda dtype: nn.Conv1d(2, 3, 3, stride=2, bias=False, dtype=dtype),
}


@pytest.mark.parametrize("R", [0, 2])
@pytest.mark.parametrize("name", list(CONVS))
def test_rule_with_onednn_gram(name, R, onednn_gram, monkeypatch):
    """In float32, the rule's Gramian by oneDNN (6 or 12 rows: two blocks of rows or three) agrees
    with float64 brute force (float32 precision); in float64, the rule never takes it. (The fused
    step's gradients do not come from the Gramian.)"""
    force_loop(monkeypatch, name == "looped")
    conv = CONVS[name](torch.float32)
    x = torch.randn(6, conv.in_channels, *[7] * len(conv.kernel_size), dtype=torch.float32)
    forward = lambda model, x: objectives(model, x, R)  # noqa: E731
    reference = CONVS[name](torch.float64)
    reference.load_state_dict(conv.state_dict())
    G_ref = assert_gramian_exact([reference], lambda: forward(reference, x.double()), 0)
    assert not onednn_gram
    with Engine(conv, batch_dim=0) as engine:
        G = engine.compute_gramian(forward(conv, x))
    assert onednn_gram
    assert all(shape[1] == 6 * max(R, 1) for shape in onednn_gram)
    assert any(shape[0] > 1 for shape in onednn_gram) == (name == "looped")
    torch.testing.assert_close(G.double(), G_ref, rtol=1e-4, atol=1e-4 * G_ref.abs().max())

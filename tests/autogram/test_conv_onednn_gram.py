"""The Gramian of a convolution's per-objective gradients by oneDNN's matrix product (float32, on
the CPU): equal to float64 brute force within float32 precision, exactly symmetric, for one block
or several, one block of rows or several; taken by the rule (grouped, unfolded or looped paths) and
agreeing with brute force there; never taken in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchjd.autogram._rules._conv as conv_module
from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_conv_per_sample import force_loop, objectives
from torchjd.autogram import Engine

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or conv_module._onednn_linear() is None,
    reason="needs oneDNN's linear layer",
)


def assert_gram_close(G: Tensor, J: Tensor) -> None:
    """``G`` is exactly symmetric and equals the sum of the blocks' Gramians of ``J`` computed in
    float64, within float32 precision."""
    expected = sum(block.double() @ block.double().T for block in J)
    assert isinstance(expected, Tensor)
    assert G.shape == expected.shape
    assert G.dtype == J.dtype
    assert torch.equal(G, G.T)
    scale = expected.abs().max().clamp(min=1e-30)
    assert (G.double() - expected).abs().max() <= 1e-5 * scale


@settings(max_examples=15, deadline=None)
@given(
    K=st.integers(1, 3),
    n=st.integers(1, 150),
    columns=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_onednn_gram_against_float64(K, n, columns, seed):
    """Blocks ``[K, n, columns]`` (row counts below, at and above a block of rows, not multiples of
    it): the Gramian is the sum of the blocks' Gramians."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(K, n, columns, generator=generator, dtype=torch.float32)
    assert_gram_close(conv_module._onednn_gram(J), J)


@pytest.mark.parametrize("shape", [(1, 1, 5), (1, 32, 7), (2, 33, 3), (1, 129, 40), (3, 200, 17)])
def test_onednn_gram_rows_blocks(shape, monkeypatch):
    """Blocks of rows of 32 or of a quarter of the rows (33, 50), or of 7 (row counts at and
    around their multiples)."""
    J = torch.randn(shape, dtype=torch.float32)
    assert_gram_close(conv_module._onednn_gram(J), J)
    monkeypatch.setattr(conv_module, "ONEDNN_TRIANGLE_ROWS", 7)
    assert_gram_close(conv_module._onednn_gram(J), J)


def test_onednn_gram_chosen_by_dtype_and_size(monkeypatch):
    """Taken for float32 blocks from ``ONEDNN_MIN_ELEMENTS`` elements each on; never in float64
    (the products of the BLAS then), nor below the bound."""
    J = torch.randn(2, 8, 16, dtype=torch.float32)
    monkeypatch.setattr(conv_module, "ONEDNN_MIN_ELEMENTS", 8 * 16)
    assert conv_module._onednn_gram_is_faster(J)
    assert not conv_module._onednn_gram_is_faster(J.double())
    assert not conv_module._onednn_gram_is_faster(J[:, :7])
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not conv_module._onednn_gram_is_faster(J)


@pytest.fixture
def onednn_gram(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Takes the oneDNN Gramian for blocks of any size; records the shape of each use."""
    used: list[tuple[int, ...]] = []
    gram = conv_module._onednn_gram

    def spy(J: Tensor) -> Tensor:
        used.append(tuple(J.shape))
        return gram(J)

    monkeypatch.setattr(conv_module, "ONEDNN_MIN_ELEMENTS", 0)
    monkeypatch.setattr(conv_module, "ONEDNN_TRIANGLE_ROWS", 4)
    monkeypatch.setattr(conv_module, "_onednn_gram", spy)
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


def test_onednn_linear_probe(monkeypatch):
    """oneDNN's linear layer is used only where it is there and gives the product: None without
    oneDNN, or when it raises or answers wrongly."""
    probe = conv_module._onednn_linear.__wrapped__
    x = torch.randn(5, 7, dtype=torch.float32)
    w = torch.randn(3, 7, dtype=torch.float32)
    linear = probe()
    assert linear is not None
    torch.testing.assert_close(linear(x, w), x @ w.T)

    def raises(*args: object) -> Tensor:
        raise RuntimeError("unsupported")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", raises)
    assert probe() is None
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, *args: x @ w.T + 1)
    assert probe() is None
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert probe() is None

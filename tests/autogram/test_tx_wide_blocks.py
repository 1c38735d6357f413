"""Blocks of per-objective gradients of ``ONEDNN_BLOCK_BYTES`` where their Gramians come from
oneDNN, vs float64 brute force."""

import pytest
import torch
from torch import Tensor

import torchjd.autogram._onednn as onednn_module
import torchjd.autogram._rules._linear as linear_module
from tests.autogram.test_linear_kernel import reference
from torchjd.autogram._rules._linear import weight_gramian


def block_widths(monkeypatch: pytest.MonkeyPatch, wide_bytes: int) -> list[int]:
    """Blocks of ``BLOCK_BYTES`` of 2 features (``ONEDNN_BLOCK_BYTES``: ``wide_bytes``), always
    per-objective gradients; returns the list that records each block's number of features."""
    monkeypatch.setattr(linear_module, "BLOCK_BYTES", 1)
    monkeypatch.setattr(linear_module, "ONEDNN_BLOCK_BYTES", wide_bytes)
    monkeypatch.setattr(linear_module, "MIN_BLOCK_FEATURES", 2)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    widths: list[int] = []
    bmm = torch.bmm

    def spy(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
        widths.append(a.shape[1])
        return bmm(a, b, out=out)

    monkeypatch.setattr(torch, "bmm", spy)
    return widths


@pytest.mark.skipif(onednn_module.onednn_linear() is None, reason="this torch has no oneDNN")
@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("R", [1, 2])
def test_wide_blocks(monkeypatch, onednn, R):
    """Blocks of ``ONEDNN_BLOCK_BYTES`` (4 features) where oneDNN takes their Gramians (float32,
    any size here), else of ``BLOCK_BYTES`` (2 features); the float64 Gramian to float32
    precision either way."""
    monkeypatch.setattr(onednn_module, "MIN_ELEMENTS", 0 if onednn else 1 << 40)
    widths = block_widths(monkeypatch, 4 * 6 * 5 * 4)  # 4 features of 6 samples, 5 inputs
    X = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    Gamma = torch.randn(1, 6, R, 4, 7, dtype=torch.float64)
    G = weight_gramian(X.float(), Gamma.float())
    expected = reference(X, Gamma)
    assert (G.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    blocks = [4, 3] if onednn else [2, 2, 2, 1]
    assert widths == [w for w in blocks for _ in range(R)]


def test_float64_keeps_blocks(monkeypatch):
    """In float64 (never oneDNN), blocks of ``BLOCK_BYTES``, exact."""
    widths = block_widths(monkeypatch, 1 << 30)
    X = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    Gamma = torch.randn(1, 6, 1, 4, 7, dtype=torch.float64)
    G = weight_gramian(X, Gamma)
    torch.testing.assert_close(G, reference(X, Gamma), rtol=1e-10, atol=0)
    assert widths == [2, 2, 2, 1]

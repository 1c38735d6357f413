"""Convolutions through their per-sample weight gradients (the samples as groups of one
convolution, no patches): exact against brute force (float64, 1e-10) for every option, whole or
by blocks of output channels, and in the fused step."""

import pytest
import torch
from torch import Tensor, nn

import torchjd.autogram._rules._conv as conv_module
from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_fused import assert_fused_exact, leaves_of


@pytest.fixture
def per_sample_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the uses of the per-sample path, and forbids the patches."""
    used: list[int] = []
    per_sample_gramian = conv_module._per_sample_gramian

    def spy(*args: object) -> Tensor:
        used.append(1)
        return per_sample_gramian(*args)  # type: ignore[arg-type]

    def fail(*args: object) -> None:
        raise AssertionError("patches formed")

    monkeypatch.setattr(conv_module, "_per_sample_gramian", spy)
    monkeypatch.setattr(conv_module, "_patches", fail)
    return used


CONVS = {
    "conv1d_stride_dilation": lambda: nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=1),
    "conv2d_groups": lambda: nn.Conv2d(4, 6, (2, 3), groups=2, padding=(1, 0)),
    "conv2d_same_reflect": lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
    "conv2d_circular_no_bias": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular",
                                                 bias=False),
    "conv3d_replicate": lambda: nn.Conv3d(2, 3, 2, padding=1, padding_mode="replicate"),
}  # fmt: skip


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", list(CONVS))
def test_gramian(name, batch_dim, blocks, per_sample_path, monkeypatch):
    """Patches over the bound: the per-sample path, whole or one output channel at a time."""
    if blocks:
        monkeypatch.setattr(conv_module, "CHUNK_BYTES", 1)
    else:
        monkeypatch.setattr(conv_module, "_patches_bytes", lambda *args: 1 << 62)
    conv = CONVS[name]()
    n = len(conv.kernel_size)
    x = torch.randn(3, conv.in_channels, *[7] * n)

    def forward() -> Tensor:
        y = conv(x).sin()
        return (y + conv(x.flip(-1)).cos()).flatten(1).sum(1)  # two calls

    if batch_dim is None:
        forward_none = lambda: forward().sum()  # noqa: E731  one objective
        assert_gramian_exact([conv], forward_none, None)
    else:
        assert_gramian_exact([conv], forward, 0)
        assert_fused_exact([conv], forward, 0, leaves_of([conv]))
    assert per_sample_path

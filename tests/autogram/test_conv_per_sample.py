"""Convolutions through their per-sample weight gradients (from the patches of blocks of samples,
or the samples as the groups of one convolution without patches): exact against brute force
(float64, 1e-10) for every option, whole or by blocks, and in the fused step."""

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
    monkeypatch.setattr(conv_module, "_padded_patches", fail)
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
    """Per-sample gradients over the bound: the samples as groups of a convolution, whole or
    one output channel at a time."""
    monkeypatch.setattr(conv_module, "_jacobian_fits", lambda *args: False)
    if blocks:
        monkeypatch.setattr(conv_module, "CHUNK_BYTES", 1)
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


@pytest.fixture
def per_objective_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the uses of the per-objective path (patches of blocks of samples), and forbids the
    other two (the samples as groups of a convolution; the closed form)."""
    used: list[int] = []
    per_objective_jacobian = conv_module._per_objective_jacobian

    def spy(*args: object) -> Tensor:
        used.append(1)
        return per_objective_jacobian(*args)  # type: ignore[arg-type]

    def fail(*args: object) -> None:
        raise AssertionError("another path taken")

    monkeypatch.setattr(conv_module, "_per_objective_jacobian", spy)
    monkeypatch.setattr(conv_module, "_per_sample_gramian", fail)
    monkeypatch.setattr(conv_module, "weight_gramian", fail)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    return used


@pytest.mark.parametrize("objectives", [1, 2])
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", list(CONVS))
def test_per_objective_gramian(
    name, batch_dim, blocks, objectives, per_objective_path, monkeypatch
):
    """The per-objective gradients formed whole, from the patches of all the samples at once or
    of one sample at a time; two calls; one or two objectives per sample."""
    if blocks:
        monkeypatch.setattr(conv_module, "PATCH_BYTES", 1)
    conv = CONVS[name]()
    n = len(conv.kernel_size)
    x = torch.randn(3, conv.in_channels, *[6] * n)

    def forward() -> Tensor:
        y = (conv(x).sin() + conv(x.flip(-1)).cos()).flatten(1)  # two calls
        return torch.stack([y.sum(1), y.pow(2).sum(1)], dim=1)[:, :objectives]

    if batch_dim is None:
        assert_gramian_exact([conv], lambda: forward().sum(0), None)
    else:
        assert_gramian_exact([conv], forward, 0)
        assert_fused_exact([conv], forward, 0, leaves_of([conv]))
    assert per_objective_path


@pytest.mark.parametrize("keep", [False, True])
def test_fused_step_weights_the_kept_per_objective_gradients(keep, per_objective_path, monkeypatch):
    """The fused step forms the weighted gradient from the kept per-objective gradients (when
    kept), else from the output gradients with the convolution's own kernel."""
    used: list[int] = []
    weighted_jacobian = conv_module.weighted_jacobian

    def spy(*args: object) -> tuple[Tensor, Tensor | None]:
        used.append(1)
        return weighted_jacobian(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_module, "weighted_jacobian", spy)
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: keep)
    conv = nn.Conv2d(3, 4, 3, groups=1, padding=1)
    x = torch.randn(5, 3, 6, 6)
    assert_fused_exact([conv], lambda: conv(x).pow(2).flatten(1).sum(1), 0, leaves_of([conv]))
    assert bool(used) == keep


def test_unbatched_input_per_objective():
    """An unbatched input (no batch dimension of its own) with batch_dim=None."""
    conv = nn.Conv1d(2, 3, 3)
    x = torch.randn(2, 9)
    assert_gramian_exact([conv], lambda: conv(x).pow(2).sum(), None)

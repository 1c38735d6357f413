"""Convolutions through their per-objective weight gradients (batched products on the patches of
blocks of samples; the first kernel dimension unfolded or looped over; whole or by blocks of
output channels): exact against brute force (float64, 1e-10) for every option, and in the fused
step."""

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchjd.autogram._rules._conv as conv_module
from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_activation_fold import _peak_allocated
from tests.autogram.test_fused import assert_fused_exact, leaves_of
from torchjd.autogram import Engine
from torchjd.autogram._workspace import fusing


@pytest.fixture
def per_objective_path(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, slice]]:
    """Records whether each use of the per-objective path looped over the first kernel
    dimension, and its output channels; forbids the closed form."""
    used: list[tuple[bool, slice]] = []
    per_objective_jacobian = conv_module._per_objective_jacobian

    def spy(*args: object) -> Tensor:
        used.append((args[3], args[4]))  # type: ignore[arg-type]
        return per_objective_jacobian(*args)  # type: ignore[arg-type]

    def fail(*args: object) -> None:
        raise AssertionError("closed form taken")

    monkeypatch.setattr(conv_module, "_per_objective_jacobian", spy)
    monkeypatch.setattr(conv_module, "weight_gramian", fail)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    return used


def force_loop(monkeypatch: pytest.MonkeyPatch, looped: bool) -> None:
    """Makes the rule loop over the first kernel dimension's offsets (where it can), or never."""
    monkeypatch.setattr(conv_module, "LOOP_MIN_WIDTH", 0 if looped else 1 << 30)


CONVS = {
    "conv1d_stride_dilation": lambda: nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=1),
    "conv2d_groups": lambda: nn.Conv2d(4, 6, (2, 3), groups=2, padding=(1, 0)),
    "conv2d_strides": lambda: nn.Conv2d(2, 3, (3, 2), stride=(3, 1), dilation=(2, 1), padding=2),
    "conv2d_same_reflect": lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
    "conv2d_same_even": lambda: nn.Conv2d(3, 2, (4, 2), padding="same", dilation=(1, 2)),
    "conv2d_circular_no_bias": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular",
                                                 bias=False),
    "conv3d_replicate": lambda: nn.Conv3d(2, 3, 2, stride=(2, 1, 1), padding=1,
                                          padding_mode="replicate"),
}  # fmt: skip


def objectives(conv: nn.Module, x: Tensor, R: int) -> Tensor:
    """``[B, R]`` objectives (or ``[B]`` when ``R = 0``) of two calls of ``conv``."""
    y = (conv(x).sin() + conv(x.flip(-1)).cos()).flatten(1)
    stacked = torch.stack([y.sum(1), y.pow(2).sum(1), y[:, ::2].exp().sum(1)], dim=1)
    return stacked[:, 0] if R == 0 else stacked[:, :R]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("R", [0, 2])
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", list(CONVS))
def test_per_objective_gramian(name, batch_dim, blocks, R, looped, per_objective_path, monkeypatch):
    """The per-objective gradients formed whole, from the patches of all the samples at once or
    of one sample at a time, the first kernel dimension unfolded or looped over; two calls; one
    or two objectives per sample."""
    force_loop(monkeypatch, looped)
    if blocks:
        monkeypatch.setattr(conv_module, "PATCH_BYTES", 1)
    conv = CONVS[name]().double()
    x = torch.randn(3, conv.in_channels, *[7] * len(conv.kernel_size), dtype=torch.float64)
    if batch_dim is None:  # several images for one sample: never looped
        assert_gramian_exact([conv], lambda: objectives(conv, x, max(R, 1)).sum(0), None)
    else:
        assert_gramian_exact([conv], lambda: objectives(conv, x, R), 0)
        assert_fused_exact([conv], lambda: objectives(conv, x, R), 0, leaves_of([conv]))
    assert per_objective_path
    assert all(taken == (looped and batch_dim == 0) for taken, _ in per_objective_path)


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("R", [0, 3])
@pytest.mark.parametrize("blocks", [2, "channels"])
@pytest.mark.parametrize("name", ["conv2d_groups", "conv2d_strides", "conv3d_replicate"])
def test_blocks_of_output_channels(name, blocks, R, looped, per_objective_path, monkeypatch):
    """Per-objective gradients over the bound: formed by blocks of output channels (of each
    group) of equal sizes (two blocks, or one channel each), their Gramians summed; the fused
    step then uses the convolution's own kernel."""
    force_loop(monkeypatch, looped)
    monkeypatch.setattr(conv_module, "_jacobian_fits", lambda *args: False)
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: False)
    conv = CONVS[name]().double()
    B, out_channels = 4, conv.out_channels // conv.groups
    jacobian_bytes = B * max(R, 1) * conv.weight.numel() * 8
    monkeypatch.setattr(
        conv_module, "CHUNK_BYTES", 1 if blocks == "channels" else jacobian_bytes // 2
    )
    x = torch.randn(B, conv.in_channels, *[6] * len(conv.kernel_size), dtype=torch.float64)
    assert_gramian_exact([conv], lambda: objectives(conv, x, R), 0)
    assert_fused_exact([conv], lambda: objectives(conv, x, R), 0, leaves_of([conv]))
    size = 1 if blocks == "channels" else -(-out_channels // 2)
    starts = {channels.start for _, channels in per_objective_path}
    assert starts == set(range(0, out_channels, size))
    assert all(channels.stop - channels.start == size for _, channels in per_objective_path)
    assert all(taken == looped for taken, _ in per_objective_path)


@settings(max_examples=12, deadline=None)
@given(
    dim=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    R=st.integers(0, 2),
    batch=st.integers(1, 3),
)
def test_looped_random_shapes(dim, groups, kernel, stride, padding, dilation, R, batch):
    """The first kernel dimension looped over (with the phases of its stride) on random
    configurations, one or several objectives per sample."""
    conv_type = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1]
    conv = conv_type(2, 4, kernel, stride, padding, dilation, groups).double()
    size = (kernel - 1) * dilation + 1 + 2 * stride
    x = torch.randn(batch, 2, *[size] * dim, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as monkeypatch:
        force_loop(monkeypatch, True)
        monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
        forward = lambda: objectives(conv, x, R)  # noqa: E731
        assert_gramian_exact([conv], forward, 0)
        assert_fused_exact([conv], forward, 0, leaves_of([conv]))


@pytest.mark.parametrize("keep", [False, True])
def test_fused_step_weights_the_kept_per_objective_gradients(keep, per_objective_path, monkeypatch):
    """The fused step forms the weighted gradient from the kept per-objective gradients (when
    kept), else from the output gradients with the convolution's own kernel."""
    used: list[int] = []
    backward = torch.ops.aten.convolution_backward

    class Spy:
        def __getattr__(self, name: str) -> object:
            if name == "convolution_backward":
                used.append(1)
                return backward
            return getattr(torch.ops.aten, name)

    monkeypatch.setattr(conv_module.torch.ops, "aten", Spy())
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: keep)
    conv = nn.Conv2d(3, 4, 3, groups=1, padding=1).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    assert_fused_exact([conv], lambda: conv(x).pow(2).flatten(1).sum(1), 0, leaves_of([conv]))
    assert bool(used) != keep


@pytest.mark.parametrize("looped", [False, True])
def test_unbatched_input_per_objective(looped, monkeypatch):
    """An unbatched input (no batch dimension of its own) with batch_dim=None."""
    force_loop(monkeypatch, looped)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    conv = nn.Conv1d(2, 3, 3).double()
    x = torch.randn(2, 9, dtype=torch.float64)
    assert_gramian_exact([conv], lambda: conv(x).pow(2).sum(), None)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])
def test_kept_jacobian_larger_than_output_gradients(chunk_bytes, per_objective_path, monkeypatch):
    """Per-objective gradients 1.5 times the size of the output gradients (kept for the fused
    step): formed whole when within the output gradients plus ``CHUNK_BYTES``, else by blocks."""
    monkeypatch.setattr(conv_module, "CHUNK_BYTES", chunk_bytes)
    conv = nn.Conv2d(2, 3, 3).double()  # 3 x 4 output positions: J / Γ = 2 * 9 / 12
    x = torch.randn(4, 2, 5, 6, dtype=torch.float64)
    forward = lambda: conv(x).pow(2).flatten(1).sum(1)  # noqa: E731
    assert_gramian_exact([conv], forward, 0)
    assert_fused_exact([conv], forward, 0, leaves_of([conv]))
    whole = chunk_bytes > 1
    assert all((channels == slice(None)) == whole for _, channels in per_objective_path)


@pytest.mark.parametrize("looped", [False, True])
def test_channels_last(looped, per_objective_path, monkeypatch):
    """Inputs and output gradients laid out channels last (strided positions)."""
    force_loop(monkeypatch, looped)
    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 6, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    forward = lambda: objectives(conv, x, 2)  # noqa: E731
    assert_gramian_exact([conv], forward, 0)
    assert_fused_exact([conv], forward, 0, leaves_of([conv]))
    assert all(taken == looped for taken, _ in per_objective_path)


@pytest.mark.parametrize("frozen", ["none", "weight", "bias"])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("channel_blocks", [False, True])
@pytest.mark.parametrize("R", [0, 2])
@pytest.mark.parametrize("name", ["conv1d_stride_dilation", "conv2d_groups", "conv3d_replicate"])
def test_bias_in_the_patches(name, R, channel_blocks, keep, frozen, monkeypatch):
    """Without the loop over the first kernel dimension, the bias's per-objective gradients are
    one more row of the per-objective gradients (the patches get a row of ones): exact for the
    Gramian and the fused step, with groups, by blocks of output channels, kept or not, and with
    the weight or the bias frozen."""
    force_loop(monkeypatch, False)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: keep)
    if channel_blocks:
        monkeypatch.setattr(conv_module, "_jacobian_fits", lambda *args: False)
        monkeypatch.setattr(conv_module, "CHUNK_BYTES", 1)
    ones: list[bool] = []
    per_objective_jacobian = conv_module._per_objective_jacobian

    def spy(*args: object) -> Tensor:
        ones.append(bool(args[5]))
        return per_objective_jacobian(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_module, "_per_objective_jacobian", spy)
    conv = CONVS[name]().double()
    if frozen != "none":
        getattr(conv, frozen).requires_grad_(False)
    x = torch.randn(3, conv.in_channels, *[6] * len(conv.kernel_size), dtype=torch.float64)
    for forward in (
        lambda: objectives(conv, x, R),  # two calls
        lambda: conv(x).pow(2).flatten(1).sum(1),  # one call, one objective per sample
    ):
        assert_gramian_exact([conv], forward, 0)
        assert_fused_exact([conv], forward, 0, leaves_of([conv]))
    assert ones == ([] if frozen == "weight" else [frozen == "none"] * len(ones))
    assert frozen == "weight" or ones


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 5, 4), (3, 7, 2), (2, 8, 5), (3, 2, 1)])
def test_blocks_gram_by_triangle(shape, monkeypatch):
    """The Gramian of blocks of per-objective gradients from its lower triangle by blocks of rows
    (one row each: row counts not multiples of 8; one block or several, one row) equals the sum
    of the blocks' Gramians, and is symmetric."""
    monkeypatch.setattr(conv_module, "TRIANGLE_MIN_ROWS", 1)
    monkeypatch.setattr(conv_module, "TRIANGLE_MIN_COLUMNS", 0)
    J = torch.randn(shape, dtype=torch.float64)
    expected = sum(block @ block.T for block in J)
    G = conv_module._blocks_gram(J)
    torch.testing.assert_close(G, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("R", [0, 2])
@pytest.mark.parametrize("triangle", [False, True])
def test_gramian_by_triangle(triangle, R, looped, per_objective_path, monkeypatch):
    """The per-objective path with the Gramian by its lower triangle (5 or 10 rows: blocks of one
    row) or whole, looped or not: exact, in the fused step too."""
    force_loop(monkeypatch, looped)
    monkeypatch.setattr(conv_module, "TRIANGLE_MIN_ROWS", 2 if triangle else 1 << 30)
    monkeypatch.setattr(conv_module, "TRIANGLE_MIN_COLUMNS", 0)
    blocks_gram = conv_module._blocks_gram
    rows: list[int] = []

    def spy(J: Tensor) -> Tensor:
        rows.append(J.shape[1])
        return blocks_gram(J)

    monkeypatch.setattr(conv_module, "_blocks_gram", spy)
    conv = CONVS["conv2d_groups"]().double()
    x = torch.randn(5, conv.in_channels, 6, 6, dtype=torch.float64)
    assert_gramian_exact([conv], lambda: objectives(conv, x, R), 0)
    assert_fused_exact([conv], lambda: objectives(conv, x, R), 0, leaves_of([conv]))
    assert rows
    assert all(n == 5 * max(R, 1) for n in rows)


@pytest.fixture
def grouped_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Forces the per-objective gradients from grouped convolutions (in float64 too: the native
    kernel) where they are formed whole, and records the number of rows of each; forbids the
    products on the patches unless by blocks of output channels."""
    used: list[int] = []
    grouped_jacobian = conv_module._grouped_jacobian
    per_objective_jacobian = conv_module._per_objective_jacobian

    def spy(*args: object) -> tuple[Tensor, Tensor | None]:
        J, sums = grouped_jacobian(*args)  # type: ignore[arg-type]
        used.append(J.shape[1])
        return J, sums

    def blocks_only(*args: object) -> Tensor:
        assert args[4] != slice(None), "products on the whole patches taken"
        return per_objective_jacobian(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_module, "_grouped_is_faster", lambda *args: True)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    monkeypatch.setattr(conv_module, "_grouped_jacobian", spy)
    monkeypatch.setattr(conv_module, "_per_objective_jacobian", blocks_only)
    return used


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("R", [0, 2])
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", list(CONVS))
def test_grouped_per_objective_gradients(
    name, batch_dim, R, keep, blocks, grouped_path, monkeypatch
):
    """The per-objective gradients from one grouped convolution per objective of a sample (strides,
    dilations, groups, padding modes, 1 to 3 dimensions; several images per sample without batch
    dimension; two calls; one or two objectives per sample; all the samples at once or one at a
    time): exact, and in the fused step, from the kept gradients or from the output gradients."""
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: keep)
    if blocks:
        monkeypatch.setattr(conv_module, "GROUPED_BYTES", 1)
    conv = CONVS[name]().double()
    x = torch.randn(3, conv.in_channels, *[6] * len(conv.kernel_size), dtype=torch.float64)
    if batch_dim is None:  # the three images make one sample
        forward = lambda: objectives(conv, x, max(R, 1)).sum(0)  # noqa: E731
    else:
        forward = lambda: objectives(conv, x, R)  # noqa: E731
    assert_gramian_exact([conv], forward, batch_dim)
    assert_fused_exact([conv], forward, batch_dim, leaves_of([conv]))
    m = max(R, 1) * (1 if batch_dim is None else 3)
    assert grouped_path
    assert all(rows == m for rows in grouped_path)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", list(CONVS))
def test_grouped_one_call_one_objective(name, batch_dim, whole, grouped_path, monkeypatch):
    """One call and one objective per sample: the per-objective gradients (and the bias's, from
    the same kernel) from one grouped convolution for all the samples, its weight gradient taken
    as they are (no buffer), or by blocks of one sample into the engine's buffer: exact, and in
    the fused step."""
    buffers: list[str] = []
    empty = conv_module.empty

    def spy(owner: object, role: str, *args: object) -> Tensor:
        if fusing():  # (the engine's buffers: the Gramian's step gets fresh memory)
            buffers.append(role)
        return empty(owner, role, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_module, "empty", spy)
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: True)
    if not whole:
        monkeypatch.setattr(conv_module, "GROUPED_WHOLE_BYTES", 0)
        monkeypatch.setattr(conv_module, "GROUPED_BYTES", 1)
    conv = CONVS[name]().double()
    x = torch.randn(3, conv.in_channels, *[6] * len(conv.kernel_size), dtype=torch.float64)
    if batch_dim is None:  # the three images make one sample
        forward = lambda: conv(x).sin().sum()  # noqa: E731
    else:
        forward = lambda: conv(x).sin().flatten(1).sum(1)  # noqa: E731
    assert_gramian_exact([conv], forward, batch_dim)
    assert_fused_exact([conv], forward, batch_dim, leaves_of([conv]))
    assert grouped_path
    assert all(rows == (1 if batch_dim is None else 3) for rows in grouped_path)
    assert bool(buffers) != whole


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("R", [0, 2])
def test_grouped_weight_never_read(R, whole, dtype, grouped_path, monkeypatch):
    """The weight that the grouped convolutions receive is contiguous (the kernel copies one that
    is not) and its values are never read: filled with NaN, the Gramian and the fused step's
    gradients are still exact (float64; float32, the oneDNN kernel where available, against
    float64). By blocks of samples (always in the Gramian's step), the weight is the block's rows
    of the per-objective gradients' buffer, filled with NaN here before any is written."""
    shapes: list[tuple[int, ...]] = []
    buffers: list[tuple[int, ...]] = []
    unread_weight = conv_module._unread_weight
    buffer = conv_module.empty

    def nan_weight(like: Tensor, shape: tuple[int, ...]) -> Tensor:
        weight = unread_weight(like, shape)
        assert weight.is_contiguous()
        assert weight.shape == shape
        assert weight.dtype == like.dtype
        shapes.append(shape)
        return weight.fill_(torch.nan)

    def nan_buffer(module: nn.Module, role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if role == "grouped_jacobian":
            buffers.append(shape)
            return buffer(module, role, shape, like).fill_(torch.nan)  # type: ignore[arg-type]
        return buffer(module, role, shape, like)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_module, "_unread_weight", nan_weight)
    monkeypatch.setattr(conv_module, "empty", nan_buffer)
    monkeypatch.setattr(conv_module, "keeps_jacobian", lambda *args: True)
    if not whole:
        monkeypatch.setattr(conv_module, "GROUPED_WHOLE_BYTES", 0)
        monkeypatch.setattr(conv_module, "GROUPED_BYTES", 1)
    conv = nn.Conv2d(4, 6, (2, 3), groups=2, padding=(1, 0), dtype=dtype)
    reference = nn.Conv2d(4, 6, (2, 3), groups=2, padding=(1, 0), dtype=torch.float64)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(3, 4, 5, 6, dtype=dtype)
    forward = lambda model, x: objectives(model, x, R)  # noqa: E731
    G_ref = assert_gramian_exact([reference], lambda: forward(reference, x.double()), 0)
    with Engine(conv, batch_dim=0) as engine:
        G = engine.compute_gramian(forward(conv, x))
    assert grouped_path
    assert buffers  # by blocks (two calls), J's rows as the weight
    assert not shapes
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(
        G.double(), G_ref, rtol=tolerance, atol=tolerance * G_ref.abs().max()
    )
    weights = torch.rand(G.shape[0], dtype=torch.float64)
    with Engine(conv, batch_dim=0) as engine:
        engine.backward(forward(conv, x), lambda _: weights.to(dtype))
    forward(reference, x.double()).reshape(-1).backward(weights)
    assert all(shape[1:] == conv.weight.shape[1:] for shape in shapes)
    for p, p_ref in zip(conv.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None
        assert p_ref.grad is not None
        scale = tolerance * p_ref.grad.abs().max()
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=tolerance, atol=scale)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_grouped_gramian_step_by_blocks_into_fresh_memory(monkeypatch):
    """In the Gramian's step, the grouped path (float32, oneDNN) runs by blocks of samples even
    with one call and one objective per sample, into fresh memory: exact against float64 brute
    force, no buffer kept by the engine, and the pass's peak within the output gradients and the
    per-objective gradients plus half the output gradients (a convolution over all the samples
    took twice the output gradients more: its weight and oneDNN's copies). The fused step still
    forms them whole (its weight from ``_unread_weight``)."""
    unread: list[tuple[int, ...]] = []
    unread_weight = conv_module._unread_weight

    def spy(like: Tensor, shape: tuple[int, ...]) -> Tensor:
        unread.append(shape)
        return unread_weight(like, shape).fill_(torch.nan)  # never read

    monkeypatch.setattr(conv_module, "_unread_weight", spy)
    monkeypatch.setattr(conv_module, "GROUPED_BYTES", 1 << 17)  # blocks of 2 samples
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, dtype=torch.float32)
    reference = nn.Conv2d(16, 32, 3, padding=1, dtype=torch.float64)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(32, 16, 16, 16, dtype=torch.float32)
    scale = torch.randn(32, 16, 16, dtype=torch.float32)
    forward = lambda model, x: (model(x) * scale.to(x.dtype)).flatten(1).sum(1)  # noqa: E731
    G_ref = assert_gramian_exact([reference], lambda: forward(reference, x.double()), 0)
    gamma_bytes, jacobian_bytes = 32 * 32 * 16 * 16 * 4, 32 * conv.weight.numel() * 4
    with Engine(conv, batch_dim=0) as engine:
        for _ in range(2):  # the second step: the oneDNN kernels' one-time allocations made
            losses = forward(conv, x)
            G = _peak_and_result(lambda: engine.compute_gramian(losses))  # noqa: B023
            assert not engine._workspaces._buffers
        torch.testing.assert_close(G[1].double(), G_ref, rtol=1e-4, atol=1e-4 * G_ref.abs().max())
        assert G[0] <= gamma_bytes + jacobian_bytes + gamma_bytes // 2
        assert not unread
        weights = torch.rand(32, dtype=torch.float32)
        engine.backward(forward(conv, x), lambda _: weights)
    assert unread == [(32 * 32, 16, 3, 3)]
    forward(reference, x.double()).backward(weights.double())
    for p, p_ref in zip(conv.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None
        assert p_ref.grad is not None
        tolerance = 1e-4 * p_ref.grad.abs().max()
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-4, atol=tolerance)


def _peak_and_result(run: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """The peak of the CPU allocator's bytes during ``run()`` above its level at the start (see
    ``test_activation_fold._peak_allocated``), and ``run()``'s result."""
    results: list[Tensor] = []
    peak = _peak_allocated(lambda: results.append(run()))
    return peak, results[0]


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_grouped_frozen_parameter_and_unbatched_input(frozen, grouped_path):
    """An unbatched input (without batch dimension), and a frozen weight or bias."""
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    getattr(conv, frozen).requires_grad_(False)
    x = torch.randn(2, 9, dtype=torch.float64)
    assert_gramian_exact([conv], lambda: conv(x).pow(2).sum(), None)
    X = torch.randn(4, 2, 9, dtype=torch.float64)
    forward = lambda: conv(X).pow(2).sum(dim=(1, 2))  # noqa: E731
    assert_gramian_exact([conv], forward, 0)
    assert_fused_exact([conv], forward, 0, leaves_of([conv]))
    assert bool(grouped_path) == (frozen == "bias")


def test_grouped_not_by_blocks_of_output_channels(grouped_path, monkeypatch):
    """Per-objective gradients over the bound: formed by blocks of output channels on the
    patches, not from grouped convolutions."""
    monkeypatch.setattr(conv_module, "_jacobian_fits", lambda *args: False)
    monkeypatch.setattr(conv_module, "CHUNK_BYTES", 1)
    conv = CONVS["conv2d_groups"]().double()
    x = torch.randn(3, conv.in_channels, 6, 6, dtype=torch.float64)
    assert_gramian_exact([conv], lambda: objectives(conv, x, 2), 0)
    assert not grouped_path


FLOAT32_CONVS = {
    "conv1d": lambda dtype: nn.Conv1d(8, 6, 9, stride=2, padding=2, dtype=dtype),
    "conv2d": lambda dtype: nn.Conv2d(8, 6, 3, stride=(1, 2), padding=1, dtype=dtype),
    "conv2d_groups_reflect": lambda dtype: nn.Conv2d(
        16, 6, 3, groups=2, padding=1, padding_mode="reflect", dtype=dtype
    ),
    "conv3d": lambda dtype: nn.Conv3d(4, 3, (2, 3, 3), padding=(0, 1, 1), dtype=dtype),
}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("R", [0, 3])
@pytest.mark.parametrize("name", list(FLOAT32_CONVS))
def test_grouped_float32_against_float64(name, R, channels_last, monkeypatch):
    """In float32 on the CPU (the oneDNN kernel), the grouped path is taken for wide patches (1 to
    3 dimensions, groups, inputs channels last); its Gramian and fused gradients agree with
    float64 brute force (float32 precision)."""
    taken: list[bool] = []
    grouped_jacobian = conv_module._grouped_jacobian

    def spy(*args: object) -> tuple[Tensor, Tensor | None]:
        taken.append(True)
        return grouped_jacobian(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_module, "_grouped_jacobian", spy)
    monkeypatch.setattr(conv_module, "per_objective_is_cheaper", lambda *args: True)
    conv = FLOAT32_CONVS[name](torch.float32)
    assert conv.weight[0].numel() >= conv_module.GROUPED_MIN_WIDTH
    x = torch.randn(5, conv.in_channels, *[7] * len(conv.kernel_size), dtype=torch.float32)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    forward = lambda model, x: objectives(model, x, R)  # noqa: E731
    reference = FLOAT32_CONVS[name](torch.float64)
    reference.load_state_dict(conv.state_dict())
    G_ref = assert_gramian_exact([reference], lambda: forward(reference, x.double()), 0)
    with Engine(conv, batch_dim=0) as engine:
        G = engine.compute_gramian(forward(conv, x))
    assert taken
    torch.testing.assert_close(G.double(), G_ref, rtol=1e-4, atol=1e-4 * G_ref.abs().max())
    weights = torch.rand(G.shape[0], dtype=torch.float32)
    with Engine(conv, batch_dim=0) as engine:
        engine.backward(forward(conv, x), lambda _: weights)
    fused = [p.grad for p in conv.parameters()]
    conv.zero_grad()
    forward(conv, x).reshape(-1).backward(weights)
    for g, g_ref in zip(fused, [p.grad for p in conv.parameters()], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max())

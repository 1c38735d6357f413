"""``_onednn.transposed_product`` (``aᵀ b``, by oneDNN in float32 on the CPU from a size on):
equal to the float64 product within float32 precision, on row-major and strided matrices, below
and above the bounds; the choice rule (float32 CPU, both bounds, oneDNN on and its linear layer
right on transposed views); torch's product, bitwise, wherever oneDNN is not taken (float64, small
products, oneDNN off, a probe that fails or gives a wrong product); and the fused step's Linear
gradients through it, in float32, against the float64 two-pass step."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchjd.autogram._onednn as onednn
import torchjd.autogram._rules._linear as linear_module
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

needs_onednn = pytest.mark.skipif(
    onednn.onednn_transposed_linear() is None, reason="needs oneDNN's linear on transposed views"
)
CPU = torch.device("cpu")
F32 = torch.float32


def assert_product_close(P: Tensor, a: Tensor, b: Tensor) -> None:
    """``P`` equals ``aᵀ b`` computed in float64, within float32 precision."""
    expected = a.double().T @ b.double()
    assert P.shape == expected.shape
    assert P.dtype == a.dtype
    scale = expected.abs().max().clamp(min=1e-30)
    assert (P.double() - expected).abs().max() <= 1e-5 * scale


@needs_onednn
@settings(max_examples=12, deadline=None)
@given(
    sizes=st.tuples(st.integers(1, 200), st.integers(1, 300), st.integers(1, 300)),
    seed=st.integers(0, 2**31 - 1),
)
def test_onednn_product_against_float64(sizes, seed):
    """oneDNN's ``aᵀ b`` on row-major matrices ``[K, M]``, ``[K, N]`` of any sizes (bounds
    aside)."""
    K, M, N = sizes
    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(K, n, generator=generator, dtype=F32) for n in (M, N))
    linear = onednn.onednn_transposed_linear()
    assert linear is not None
    assert_product_close(linear(a, b), a, b)


@needs_onednn
@pytest.mark.parametrize(("K", "M", "N"), [(64, 512, 784), (64, 512, 10), (1, 3, 2), (300, 40, 70)])
@pytest.mark.parametrize("layout", ["rows", "transposed", "sliced"])
def test_transposed_product_against_float64(K, M, N, layout, monkeypatch):
    """Above (bounds at 0) and below the bounds, with inputs row-major, transposed views or
    column slices."""
    a, b = torch.randn(K, M, dtype=F32), torch.randn(K, N, dtype=F32)
    if layout == "transposed":
        a, b = torch.randn(M, K, dtype=F32).T, torch.randn(N, K, dtype=F32).T
    elif layout == "sliced":
        a = torch.randn(K, M + 3, dtype=F32)[:, 1 : M + 1]
        b = torch.randn(K, N + 2, dtype=F32)[:, :N]
    assert_product_close(onednn.transposed_product(a, b), a, b)
    monkeypatch.setattr(onednn, "PRODUCT_MIN_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(onednn, "PRODUCT_MIN_OUTPUT", 0)
    monkeypatch.setattr(onednn, "PRODUCT_MIN_LEFT", 0)
    assert onednn.product_takes(a.dtype, a.device, K, M, N)
    assert_product_close(onednn.transposed_product(a, b), a, b)


@needs_onednn
def test_choice_rule(monkeypatch):
    """float32 on the CPU from all bounds on; never in float64, below any bound, or with
    oneDNN off."""
    big = (64, 512, 784)
    assert onednn.product_takes(torch.float32, CPU, *big)
    assert not onednn.product_takes(torch.float64, CPU, *big)
    assert not onednn.product_takes(torch.float16, CPU, *big)
    assert not onednn.product_takes(torch.float32, torch.device("meta"), *big)
    assert not onednn.product_takes(torch.float32, CPU, 64, 10, 512)  # few multiply-adds
    assert not onednn.product_takes(torch.float32, CPU, 1 << 12, 64, 64)  # few outputs
    assert not onednn.product_takes(torch.float32, CPU, 64, 10, 4096)  # a small left factor
    assert onednn.product_takes(torch.float32, CPU, 256, 10, 4096)
    assert onednn.product_takes(torch.float32, CPU, 64, 32, 4096)
    bound = onednn.PRODUCT_MIN_MULTIPLY_ADDS
    assert onednn.product_takes(torch.float32, CPU, bound // (128 * 128), 128, 128)
    assert not onednn.product_takes(torch.float32, CPU, bound // (128 * 128) - 1, 128, 128)
    with monkeypatch.context() as patch:
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        assert not onednn.product_takes(torch.float32, CPU, *big)


def test_torch_product_where_onednn_is_not_taken(monkeypatch):
    """float64, small products, oneDNN off, no oneDNN: torch's ``aᵀ b``, bitwise."""
    a64, b64 = torch.randn(64, 512, dtype=torch.float64), torch.randn(64, 784, dtype=torch.float64)
    assert torch.equal(onednn.transposed_product(a64, b64), a64.T @ b64)
    a, b = torch.randn(64, 10, dtype=F32), torch.randn(64, 512, dtype=F32)
    assert torch.equal(onednn.transposed_product(a, b), a.T @ b)
    a, b = a64.float(), b64.float()
    with monkeypatch.context() as patch:
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        assert torch.equal(onednn.transposed_product(a, b), a.T @ b)
    monkeypatch.setattr(onednn, "onednn_transposed_linear", lambda: None)
    assert not onednn.product_takes(a.dtype, a.device, 64, 512, 784)
    assert torch.equal(onednn.transposed_product(a, b), a.T @ b)


@pytest.mark.parametrize(
    "linear",
    [
        None,  # no oneDNN linear layer at all
        lambda x, w: (_ for _ in ()).throw(RuntimeError("unsupported layout")),
        lambda x, w: x.contiguous() @ w.contiguous().T + 1,  # a wrong product
        # right on row-major matrices only: reads transposed views as if they were
        lambda x, w: (
            x.as_strided(x.shape, (x.shape[1], 1)) @ w.as_strided(w.shape, (w.shape[1], 1)).T
        ),
        lambda x, w: "not a tensor",
    ],
)
def test_probe_refuses_a_failing_or_wrong_linear(linear, monkeypatch):
    """The probe answers None when oneDNN's linear layer is missing, raises or is wrong on
    transposed views; the choice rule then never takes it (checked on the undecorated probe, so
    that the cached answer stays)."""
    monkeypatch.setattr(onednn, "onednn_linear", lambda: linear)
    assert onednn.onednn_transposed_linear.__wrapped__() is None  # type: ignore[attr-defined]


@needs_onednn
def test_probe_accepts_the_right_product(monkeypatch):
    """The undecorated probe, with the real linear layer: a product ``aᵀ b``."""
    linear = onednn.onednn_transposed_linear.__wrapped__()  # type: ignore[attr-defined]
    assert linear is not None
    a, b = torch.randn(7, 5, dtype=F32), torch.randn(7, 3, dtype=F32)
    assert_product_close(linear(a, b), a, b)


def _mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3)
    ).to(dtype)


@needs_onednn
@pytest.mark.parametrize("objectives", [1, 2])
@pytest.mark.parametrize("probe", ["right", "failed"])
def test_fused_linear_gradients_by_onednn(objectives, probe, monkeypatch):
    """With the bounds at a size that the two first layers exceed and not the last: the fused
    step in float32 takes oneDNN's product for exactly those weights (one objective per sample,
    or two: the weighted output gradients by their sum), none when the probe failed, and its
    ``.grad`` agree with the float64 two-pass step within float32 precision."""
    monkeypatch.setattr(onednn, "PRODUCT_MIN_MULTIPLY_ADDS", 16 * 96 * 64)
    if probe == "failed":
        monkeypatch.setattr(onednn, "onednn_transposed_linear", lambda: None)
    taken: list[tuple[int, ...]] = []
    product = linear_module.transposed_product

    def spy(a: Tensor, b: Tensor) -> Tensor:
        K, M, N = a.shape[0], a.shape[1], b.shape[1]
        if onednn.product_takes(a.dtype, a.device, K, M, N):
            taken.append((M, N))
        return product(a, b)

    monkeypatch.setattr(linear_module, "transposed_product", spy)
    x = torch.randn(16, 96, dtype=torch.float64)
    weighting = UPGradWeighting()
    grads = {}
    for dtype in (torch.float64, torch.float32):
        model = _mlp(dtype)
        with Engine(model, batch_dim=0) as engine:
            out = model(x.to(dtype))
            losses = out[:, :objectives] ** 2 if objectives > 1 else out.sum(dim=1)
            if dtype == torch.float64:
                losses.backward(weighting(engine.compute_gramian(losses)).reshape(losses.shape))
            else:
                engine.backward(losses, weighting)
        grads[dtype] = [p.grad for p in model.parameters()]
    assert sorted(taken) == ([(128, 96), (128, 128)] if probe == "right" else [])
    for expected, got in zip(grads[torch.float64], grads[torch.float32], strict=True):
        assert got.dtype == torch.float32
        scale = expected.abs().max().clamp(min=1e-30)
        assert (got.double() - expected).abs().max() <= 1e-4 * scale


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 2, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(dim=1))


@needs_onednn
@pytest.mark.parametrize("keep", [True, False])
def test_fused_attention_projections_by_onednn(keep, monkeypatch):
    """The projections of an attention found in its graph (``_graph_linear.py``), their output
    gradients kept (not their per-objective gradients): with the bounds lowered, the fused step in
    float32 forms their weighted gradients by oneDNN's product (none when the per-objective
    gradients are kept), and its ``.grad`` agree with the float64 two-pass step."""
    import torchjd.autogram._rules._graph_linear as graph_linear_module

    monkeypatch.setattr(onednn, "PRODUCT_MIN_MULTIPLY_ADDS", 1)
    monkeypatch.setattr(onednn, "PRODUCT_MIN_OUTPUT", 1)
    if not keep:
        monkeypatch.setattr(linear_module, "linear_keeps_jacobian", lambda *sizes: False)
    taken: list[tuple[int, ...]] = []
    product = graph_linear_module.transposed_product

    def spy(a: Tensor, b: Tensor) -> Tensor:
        if onednn.product_takes(a.dtype, a.device, a.shape[0], a.shape[1], b.shape[1]):
            taken.append((a.shape[1], b.shape[1]))
        return product(a, b)

    monkeypatch.setattr(graph_linear_module, "transposed_product", spy)
    torch.manual_seed(0)
    x = torch.randn(6, 8, 32, dtype=torch.float64)
    weighting = UPGradWeighting()
    grads = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(1)
        model = _Attention().to(dtype)
        with Engine(model, batch_dim=0) as engine:
            losses = model(x.to(dtype))[:, :2] ** 2  # two objectives per sample
            if dtype == torch.float64:
                losses.backward(weighting(engine.compute_gramian(losses)).reshape(losses.shape))
            else:
                engine.backward(losses, weighting)
        grads[dtype] = [p.grad for p in model.parameters()]
    assert (len(taken) > 0) == (not keep)
    assert all(shape[1] == 32 for shape in taken)
    for expected, got in zip(grads[torch.float64], grads[torch.float32], strict=True):
        scale = expected.abs().max().clamp(min=1e-30)
        assert (got.double() - expected).abs().max() <= 1e-4 * scale

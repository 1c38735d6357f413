"""Gramians by oneDNN's matrix product (float32, on the CPU): equal to float64 brute force within
float32 precision, exactly symmetric (one block or several, one block of rows or several); the
accumulating form with ``_linear``'s blocks of rows; chosen only for float32 CPU tensors from
``MIN_ELEMENTS`` elements per block, never in float64, nor when oneDNN is off or its linear layer
missing or wrong (torch's products then); and taken by the Linear rules (one position, positions
by blocks of features, kept per-objective gradients, blocks of a convolution's groups), by
``_module_call.gram`` and by an attention's per-sample Gramian, which agree with float64 brute
force."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchjd.autogram._onednn as onednn
import torchjd.autogram._rules._attention as attention_module
import torchjd.autogram._rules._linear as linear_module
from tests.autogram._helpers import assert_gramian_exact
from torchjd.aggregation import MeanWeighting
from torchjd.autogram import Engine
from torchjd.autogram._module_call import gram

pytestmark = pytest.mark.skipif(onednn.onednn_linear() is None, reason="needs oneDNN's linear")


def assert_gram_close(G: Tensor, J: Tensor, symmetric: bool = True) -> None:
    """``G`` equals the sum of the Gramians of the blocks ``J`` ``[K, n, *]`` computed in float64,
    within float32 precision (and is exactly symmetric when ``symmetric``)."""
    expected = sum(block.double() @ block.double().T for block in J.flatten(2))
    assert isinstance(expected, Tensor)
    assert G.shape == expected.shape
    assert G.dtype == J.dtype
    if symmetric:
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
def test_blocks_gram_against_float64(K, n, columns, seed):
    """Blocks ``[K, n, columns]`` (row counts below, at and above a block of rows, not multiples of
    it): the sum of the blocks' Gramians; one block as a matrix too."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(K, n, columns, generator=generator, dtype=torch.float32)
    assert_gram_close(onednn.onednn_blocks_gram(J), J)
    assert_gram_close(onednn.onednn_gram(J[0]), J[:1])


@pytest.mark.parametrize("whole_max_rows", [0, 64])
@pytest.mark.parametrize(
    "shape", [(1, 1, 5), (1, 32, 7), (2, 33, 3), (2, 64, 9), (1, 65, 6), (1, 129, 40), (3, 200, 17)]
)
def test_blocks_gram_rows_blocks(shape, whole_max_rows, monkeypatch):
    """Up to ``WHOLE_MAX_ROWS`` rows (64, or none), one product per block; else blocks of rows of
    32 or of a quarter of the rows (33, 50), or of 7 (row counts at and around their multiples);
    blocks of several dimensions are flattened."""
    monkeypatch.setattr(onednn, "WHOLE_MAX_ROWS", whole_max_rows)
    J = torch.randn(shape, dtype=torch.float32)
    assert_gram_close(onednn.onednn_blocks_gram(J), J)
    assert_gram_close(onednn.onednn_blocks_gram(J.reshape(*shape[:2], 1, shape[2])), J)
    monkeypatch.setattr(onednn, "TRIANGLE_ROWS", 7)
    assert_gram_close(onednn.onednn_blocks_gram(J), J)


def test_gram_of_strided_matrix():
    """A matrix that is not contiguous (every other column; a transposed one)."""
    A = torch.randn(40, 70, dtype=torch.float32)[:, ::2]
    assert_gram_close(onednn.onednn_gram(A), A.unsqueeze(0))
    A = torch.randn(70, 40, dtype=torch.float32).T
    assert_gram_close(onednn.onednn_gram(A), A.unsqueeze(0))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 150),
    columns=st.integers(1, 200),
    blocks=st.integers(1, 3),
    whole=st.sampled_from([0, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_add_self_gram_against_float64(n, columns, blocks, whole, seed):
    """``onednn_add_self_gram`` accumulates (``blocks`` matrices) with ``_linear``'s blocks of rows
    (one product of all rows up to ``WHOLE_MAX_ROWS``, 0 or 64, else by blocks of rows), and
    ``complete_self_gram`` makes the sum exactly symmetric, as with ``add_self_gram``."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(blocks, n, columns, generator=generator, dtype=torch.float32)
    parts = [(start, min(start + 16, n)) for start in range(0, n, 16)]
    G = torch.zeros(n, n, dtype=torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onednn, "WHOLE_MAX_ROWS", whole)
        for A in J:
            onednn.onednn_add_self_gram(G, A, parts)
    assert_gram_close(linear_module.complete_self_gram(G, parts), J)


def test_chosen_by_dtype_device_and_size(monkeypatch):
    """Taken for float32 CPU tensors from ``MIN_ELEMENTS`` elements per block (a matrix: all of
    it) on; never in float64, below the bound, with oneDNN off, or without its linear layer."""
    J = torch.randn(2, 8, 16, dtype=torch.float32)
    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 8 * 16)
    assert onednn.onednn_gram_is_faster(J)
    assert onednn.onednn_gram_is_faster(J[0])
    assert not onednn.onednn_gram_is_faster(J[0, :, :15])
    assert not onednn.onednn_gram_is_faster(J.double())
    assert not onednn.onednn_gram_is_faster(J[:, :7])
    assert not onednn.onednn_gram_is_faster(torch.empty(2, 8, 16, device="meta"))
    with monkeypatch.context() as patch:
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        assert not onednn.onednn_gram_is_faster(J)
    monkeypatch.setattr(onednn, "onednn_linear", lambda: None)
    assert not onednn.onednn_gram_is_faster(J)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("available", [True, False])
def test_entry_points_fall_back(dtype, available, monkeypatch):
    """``gram`` and ``blocks_gram`` by oneDNN only in float32 with its linear layer (counted
    through a spy), else torch's products; the same Gramians either way."""
    calls: list[int] = []
    linear = onednn.onednn_linear()
    assert linear is not None

    def spy(x: Tensor, w: Tensor) -> Tensor:
        calls.append(1)
        return linear(x, w)

    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(onednn, "onednn_linear", (lambda: spy) if available else (lambda: None))
    J = torch.randn(3, 40, 30, dtype=dtype)
    assert_gram_close(onednn.blocks_gram(J), J, symmetric=bool(calls))
    assert_gram_close(onednn.gram(J[1]), J[1:2], symmetric=bool(calls))
    assert bool(calls) == (available and dtype == torch.float32)
    if not available:
        with pytest.raises(RuntimeError, match="oneDNN"):
            onednn.onednn_gram(J[0])


def test_onednn_linear_probe(monkeypatch):
    """oneDNN's linear layer is used only where it is there and gives the product: None without
    oneDNN, or when it raises or answers wrongly."""
    probe = onednn.onednn_linear.__wrapped__
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


@pytest.fixture
def onednn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """oneDNN's product for any size; records the shape of the left factor of each call."""
    used: list[tuple[int, ...]] = []
    linear = onednn.onednn_linear()
    assert linear is not None

    def spy(x: Tensor, w: Tensor) -> Tensor:
        used.append(tuple(x.shape))
        return linear(x, w)

    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(onednn, "TRIANGLE_ROWS", 4)
    monkeypatch.setattr(onednn, "onednn_linear", lambda: spy)
    return used


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3)).to(dtype)


def objectives(model: nn.Module, x: Tensor) -> Tensor:
    """``[B, 3]`` objectives: the outputs, summed over the positions when ``x`` has them."""
    y = model(x)
    return y if y.dim() == 2 else y.sum(dim=1)


@pytest.mark.parametrize("path", ["one_position", "positions", "blocks"])
def test_linear_rule_with_onednn(path, onednn_calls, monkeypatch):
    """The Linear rule's Gramian in float32 by oneDNN (one position: the closed form's factors;
    several positions: per-objective gradients by blocks of output features, whole or one feature
    at a time) agrees with float64 brute force; in float64, oneDNN is never called."""
    monkeypatch.setattr(linear_module, "BLOCK_BYTES", 1 if path == "blocks" else 1 << 20)
    if path != "one_position":
        monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    shape = (10, 6) if path == "one_position" else (10, 4, 6)
    x = torch.randn(shape, dtype=torch.float64)
    reference = _model(torch.float64)
    G_ref = assert_gramian_exact(list(reference), lambda: objectives(reference, x), 0)
    assert not onednn_calls
    model = _model(torch.float32)
    with Engine(*model, batch_dim=0) as engine:
        G = engine.compute_gramian(objectives(model, x.float()))
    assert onednn_calls
    torch.testing.assert_close(G.double(), G_ref, rtol=1e-4, atol=1e-4 * G_ref.abs().max())


def test_fused_step_with_onednn(onednn_calls, monkeypatch):
    """The fused step (per-objective gradients kept whole, their Gramian by oneDNN) in float32
    gives the float64 gradients and Gramian, within float32 precision."""
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    x = torch.randn(10, 4, 6, dtype=torch.float64)
    grams = {}
    grads = {}
    for dtype in (torch.float64, torch.float32):
        model = _model(dtype)
        seen: list[Tensor] = []

        def weighting(G: Tensor, seen: list[Tensor] = seen) -> Tensor:
            seen.append(G)
            return MeanWeighting()(G)

        onednn_calls.clear()
        with Engine(*model, batch_dim=0) as engine:
            engine.backward(model(x.to(dtype)).sum(dim=(1, 2)), weighting)
        assert bool(onednn_calls) == (dtype == torch.float32)
        grams[dtype] = seen[0].double()
        grads[dtype] = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    scale = grams[torch.float64].abs().max()
    torch.testing.assert_close(
        grams[torch.float32], grams[torch.float64], rtol=1e-4, atol=1e-4 * scale
    )
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 1 << 24])
@pytest.mark.parametrize("P", [1, 3])
@settings(max_examples=5, deadline=None)
@given(
    B=st.integers(1, 6),
    R=st.integers(1, 3),
    T=st.integers(1, 3),
    d_out=st.integers(2, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_weight_gramian_with_onednn(P, B, R, T, d_out, chunk, seed):
    """``weight_gramian`` of ``P`` blocks of inputs (a convolution's groups: the batched path; one:
    the accumulating path), whole or one feature at a time (``chunk`` of 1 byte), with oneDNN for
    any size, equals the float64 Gramian of the per-objective gradients
    :math:`\\sum_p \\Gamma_{pir}^\\top X_{pi}` (rows by sample then objective)."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(P, B, T, 5, generator=generator, dtype=torch.float64)
    Gamma = torch.randn(P, B, R, T, d_out, generator=generator, dtype=torch.float64)
    J = torch.einsum("pirtd,pite->pirde", Gamma, X).reshape(P, B * R, -1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onednn, "MIN_ELEMENTS", 0)
        patch.setattr(onednn, "WHOLE_MAX_ROWS", 4)
        patch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
        G = linear_module.weight_gramian(X.float(), Gamma.float(), chunk)
    expected = (J @ J.mT).sum(dim=0)
    scale = expected.abs().max()
    assert (G.double() - expected).abs().max() <= 1e-5 * scale


def test_module_call_gram_with_onednn(onednn_calls):
    """``_module_call.gram`` of per-objective gradients ``[B, R, *param]`` in float32 by oneDNN
    (all ``B R`` rows at once) equals float64's; in float64, torch's product."""
    per_objective = torch.randn(5, 2, 3, 4, dtype=torch.float64)
    expected = gram(per_objective)
    assert not onednn_calls
    G = gram(per_objective.float())
    assert onednn_calls
    assert onednn_calls[0][1] == 12
    assert_gram_close(G, per_objective.float().reshape(1, 10, 12))
    torch.testing.assert_close(G.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_attention_per_sample_gramian_with_onednn(onednn_calls, monkeypatch):
    """An attention with learnt key and value biases (the Gramian of its per-sample Jacobians) in
    float32 by oneDNN agrees with float64 brute force."""
    used: list[int] = []
    per_sample = attention_module._per_sample_gramian

    def spy(*args: object) -> Tensor:
        used.append(1)
        return per_sample(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(attention_module, "_per_sample_gramian", spy)
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(6, 2, add_bias_kv=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    forward = lambda m, x: m(x, x, x)[0].sum(dim=(1, 2))  # noqa: E731
    G_ref = assert_gramian_exact([reference], lambda: forward(reference, x), 0)
    assert used
    assert not onednn_calls
    module = nn.MultiheadAttention(6, 2, add_bias_kv=True, batch_first=True, dtype=torch.float32)
    module.load_state_dict(reference.state_dict())
    with Engine(module, batch_dim=0) as engine:
        G = engine.compute_gramian(forward(module, x.float()))
    assert len(used) == 2
    assert onednn_calls
    torch.testing.assert_close(G.double(), G_ref, rtol=1e-4, atol=1e-4 * G_ref.abs().max())


def test_probe_on_the_cpu_under_another_default_device():
    """The probe answers for the CPU's products whatever the default device."""
    with torch.device("meta"):
        linear = onednn.onednn_linear.__wrapped__()
    assert linear is not None
    x = torch.randn(4, 6, dtype=torch.float32)
    torch.testing.assert_close(linear(x, x), x @ x.T)


def test_no_blocks_give_zeros(monkeypatch):
    """The Gramian of no blocks is zero (the empty sum), by oneDNN or not; the choice reads the
    blocks' size from their shape."""
    J = torch.empty(0, 4, 5, dtype=torch.float32)
    assert torch.equal(onednn.onednn_blocks_gram(J), torch.zeros(4, 4))
    monkeypatch.setattr(onednn, "MIN_ELEMENTS", 20)
    assert onednn.onednn_gram_is_faster(J)
    assert torch.equal(onednn.blocks_gram(J), torch.zeros(4, 4))
    assert not onednn.onednn_takes(torch.float32, torch.device("meta"), 1 << 30)
    assert onednn.onednn_takes(torch.float32, torch.device("cpu"), 20)
    assert not onednn.onednn_takes(torch.float32, torch.device("cpu"), 19)

"""The fused step ``Engine.backward`` fills the same ``.grad`` as the two-pass step
``losses.backward(weighting(engine.compute_gramian(losses)))``, on the architecture zoo."""

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from torchjd.aggregation import MeanWeighting, UPGradWeighting
from torchjd.autogram import Engine


def leaves_of(modules: Sequence[nn.Module], extra: Sequence[Tensor] = ()) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    for t in extra:
        seen.setdefault(id(t), t)
    return list(seen.values())


def two_pass(engine_modules, forward, batch_dim, weighting) -> Tensor:
    with Engine(*engine_modules, batch_dim=batch_dim) as engine:
        losses = forward()
        weights = weighting(engine.compute_gramian(losses))
        losses.backward(weights.reshape(losses.shape))
    return weights


def fused(engine_modules, forward, batch_dim, weighting, **kwargs) -> Tensor:
    with Engine(*engine_modules, batch_dim=batch_dim) as engine:
        return engine.backward(forward(), weighting, **kwargs)


def assert_fused_exact(
    engine_modules: Sequence[nn.Module],
    forward: Callable[[], Tensor],
    batch_dim: int | None,
    leaves: Sequence[Tensor],
    initial_grads: bool = False,
    weighting: Callable[[Tensor], Tensor] | None = None,
    **kwargs,
) -> None:
    weighting = UPGradWeighting() if weighting is None else weighting
    start = [torch.randn_like(t) if initial_grads and t.requires_grad else None for t in leaves]
    results = []
    for step in (two_pass, fused):
        for t, g in zip(leaves, start, strict=True):
            t.grad = None if g is None else g.clone()
        kw = kwargs if step is fused else {}
        weights = step(engine_modules, forward, batch_dim, weighting, **kw)
        results.append((weights, [None if t.grad is None else t.grad.clone() for t in leaves]))
    (w_ref, grads_ref), (w, grads) = results
    # Not bit for bit: where the fused step keeps a layer's per-objective gradients, it forms that
    # layer's Gramian as J Jᵀ, the two-pass step from the inputs and output gradients, which round
    # differently (the attention of test_kept_jacobians: 1e-16 apart under MKL_CBWR=COMPATIBLE);
    # float64 weights of a wrong Gramian or of a wrong weighting are far beyond 1e-10.
    assert w.shape == w_ref.shape
    assert w.dtype == w_ref.dtype
    assert (w - w_ref).abs().max() <= 1e-10 * w_ref.abs().max().clamp(min=1e-30), (w, w_ref)
    assert any(g is not None for g in grads_ref)
    for k, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert (g is None) == (g_ref is None), f"leaf {k}: {g is None=} {g_ref is None=}"
        if g is not None:
            scale = g_ref.abs().max().clamp(min=1e-30)
            assert g.shape == g_ref.shape
            assert (g - g_ref).abs().max() <= 1e-10 * scale, (k, (g - g_ref).abs().max() / scale)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


@pytest.mark.parametrize("max_kept_bytes", [None, 0, 200])
def test_mlp(max_kept_bytes):
    model, x = mlp(), torch.randn(6, 5)
    forward = lambda: model(x).pow(2).sum(dim=1)  # noqa: E731
    assert_fused_exact([model], forward, 0, leaves_of([model]), max_kept_bytes=max_kept_bytes)


@pytest.mark.parametrize("batch_dim", [0, -2, None])
def test_batch_by_tasks_losses(batch_dim):
    model, x = mlp(), torch.randn(6, 5)
    assert_fused_exact([model], lambda: model(x).pow(2), batch_dim, leaves_of([model]))


def test_tasks_by_batch_losses_and_positions():
    model, x = mlp(), torch.randn(6, 3, 5)  # [batch, positions, features]
    forward = lambda: model(x).sin().sum(dim=1).T  # noqa: E731  ([tasks, batch])
    assert_fused_exact([model], forward, 1, leaves_of([model]))


def test_cnn():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2, padding_mode="reflect", padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 3, (2, 3), padding="same", dilation=(1, 2), bias=False),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 2),
    )
    x = torch.randn(5, 2, 6, 6)
    assert_fused_exact([model], lambda: model(x).pow(2), 0, leaves_of([model]))


def test_conv1d_unbatched_without_batch_dim():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2))
    x = torch.randn(2, 9)  # one sample: [channels, length]
    assert_fused_exact([model], lambda: model(x).flatten(), None, leaves_of([model]))


@pytest.mark.parametrize("max_kept_bytes", [None, 0, 3000])
def test_transformer_encoder_layer(max_kept_bytes):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    head = nn.Linear(8, 1)
    x = torch.randn(4, 5, 8)
    forward = lambda: head(layer(x).mean(dim=1)).squeeze(dim=1) ** 2  # noqa: E731
    leaves = leaves_of([layer, head])
    assert_fused_exact([layer, head], forward, 0, leaves, max_kept_bytes=max_kept_bytes)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.GRU(3, 4, batch_first=True),
        lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
        lambda: nn.RNN(3, 4, num_layers=2, dropout=0.5),  # the generic rule, and autograd
    ],
    ids=["gru", "lstm", "rnn-dropout"],
)
def test_rnn(make):
    rnn = make()
    batch = 0 if rnn.batch_first else 1
    x = torch.randn(5, 6, 3) if rnn.batch_first else torch.randn(6, 5, 3)
    head = nn.Linear(rnn.proj_size or rnn.hidden_size, 2) if not rnn.bidirectional else None
    head = nn.Linear(2 * (rnn.proj_size or rnn.hidden_size), 2) if head is None else head

    def forward() -> Tensor:
        torch.manual_seed(0)
        output = rnn(x)[0]
        return head(output.select(1 - batch, -1)).pow(2)

    assert_fused_exact([rnn, head], forward, 0, leaves_of([rnn, head]))


def test_partial_jacobian_descent_and_input_requiring_grad():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(6, 5, requires_grad=True)
    forward = lambda: model(x).squeeze(dim=1) ** 2  # noqa: E731
    assert_fused_exact([model[2:]], forward, 0, leaves_of([model], [x]))


def test_module_called_twice():
    linear, head = nn.Linear(4, 4), nn.Linear(4, 1)
    x = torch.randn(6, 4)
    forward = lambda: head(linear(torch.tanh(linear(x)))).squeeze(dim=1) ** 2  # noqa: E731
    assert_fused_exact([linear, head], forward, 0, leaves_of([linear, head]))


def test_frozen_parameters():
    model = mlp()
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    model[4].bias.requires_grad_(False)
    x = torch.randn(6, 5)
    forward = lambda: model(x).pow(2).sum(dim=1)  # noqa: E731
    assert_fused_exact([model], forward, 0, leaves_of([model]))


def test_accumulates_into_existing_grads():
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    x = torch.randn(6, 5)
    forward = lambda: model(x).pow(2)  # noqa: E731
    assert_fused_exact([model], forward, 0, leaves_of([model]), initial_grads=True)
    assert_fused_exact([model], forward, 0, leaves_of([model]), True, MeanWeighting())


def test_covered_parameters_skip_the_second_backward():
    """Autograd computes no gradient for the covered layers' parameters, unless not kept."""
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Conv1d(1, 1, 2), nn.Flatten())
    x = torch.randn(6, 1, 5)
    for max_kept_bytes, expected in [(None, 0), (0, 6)]:
        reached: list[Tensor] = []
        handles = [p.register_hook(reached.append) for p in model.parameters()]
        with Engine(model, batch_dim=0) as engine:
            engine.backward(
                model(x).pow(2).sum(dim=1), UPGradWeighting(), max_kept_bytes=max_kept_bytes
            )
        for handle in handles:
            handle.remove()
        assert len(reached) == expected
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)


def test_state_cleaned_after_an_error():
    model, x = mlp(), torch.randn(6, 5)
    with Engine(model, batch_dim=0) as engine:
        with pytest.raises(ValueError, match=r"vector of 6 weights.*got \(5,\)"):
            engine.backward(model(x).pow(2).sum(dim=1), lambda G: torch.ones(5))
        with pytest.raises(RuntimeError, match="boom"):
            engine.backward(model(x).pow(2).sum(dim=1), _raise)
        assert all(p.grad is None for p in model.parameters())
    assert_fused_exact([model], lambda: model(x).pow(2).sum(dim=1), 0, leaves_of([model]))


def _raise(G: Tensor) -> Tensor:
    raise RuntimeError("boom")


def test_refusals():
    model, x = mlp(), torch.randn(6, 5)
    with Engine(model, batch_dim=0) as engine:
        losses = model(x).sum(dim=1)
        with pytest.raises(TypeError, match="`weighting` to be callable, got int"):
            engine.backward(losses, 3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="`max_kept_bytes` to be a non-negative int"):
            engine.backward(losses, UPGradWeighting(), max_kept_bytes=-1)
        with pytest.raises(TypeError, match="`output` to be a Tensor"):
            engine.backward([losses], UPGradWeighting())  # type: ignore[arg-type]


def test_normalisation_layers():
    batch_norm = nn.BatchNorm2d(4).eval()
    batch_norm.running_mean.uniform_(-1, 1)
    batch_norm.running_var.uniform_(0.5, 2)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),  # a bias before a normalisation has zero gradient
        nn.GroupNorm(2, 4),
        nn.Tanh(),  # so that the next normalisation does not cancel the affine map
        nn.InstanceNorm2d(4, affine=True),
        nn.Tanh(),
        batch_norm,
        nn.Tanh(),
        nn.Flatten(start_dim=2),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.RMSNorm([4, 16]),
    )
    x = torch.randn(5, 2, 6, 6)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    forward = lambda: model(x).pow(2).sum(dim=2)  # noqa: E731  ([batch, 4 tasks])
    assert_fused_exact([model], forward, 0, leaves_of([model]))


def test_batch_norm_with_batch_statistics_falls_back():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(6, 3)
    forward = lambda: model(x).squeeze(dim=1) ** 2  # noqa: E731
    assert_fused_exact([model], forward, None, leaves_of([model]))


def test_parameter_also_used_outside_the_engine_goes_through_autograd():
    linear, head = nn.Linear(4, 4), nn.Linear(4, 1)
    x = torch.randn(6, 4)
    forward = lambda: head(linear(torch.tanh(x @ linear.weight.T))).squeeze(dim=1) ** 2  # noqa: E731
    assert_fused_exact([linear, head], forward, 0, leaves_of([linear, head]))


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_called_twice(sparse):
    table = nn.Embedding(7, 3, padding_idx=2, scale_grad_by_freq=not sparse, sparse=sparse)
    head = nn.Linear(3, 2)
    x, z = torch.randint(0, 7, (5, 4)), torch.randint(0, 7, (5, 2))
    forward = lambda: head(table(x).sum(dim=1) * table(z).mean(dim=1)).pow(2)  # noqa: E731
    if sparse:  # autograd gives a sparse gradient, compared densely
        for step in (two_pass, fused):
            table.weight.grad = None
            step([table, head], forward, 0, UPGradWeighting())
            if step is two_pass:
                expected = table.weight.grad.to_dense()
        assert table.weight.grad.is_sparse
        torch.testing.assert_close(table.weight.grad.to_dense(), expected, rtol=1e-10, atol=0)
    else:
        assert_fused_exact([table, head], forward, 0, leaves_of([table, head]))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_with_masks_and_separate_projections(batch_first):
    attention = nn.MultiheadAttention(6, 2, batch_first=batch_first, kdim=4, vdim=5)
    x, k, v = torch.randn(3, 4, 6), torch.randn(3, 2, 4), torch.randn(3, 2, 5)
    if not batch_first:
        x, k, v = x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    mask = torch.tensor([[False, True]] * 3)
    batch = 0 if batch_first else 1

    def forward() -> Tensor:
        y = attention(x, k, v, key_padding_mask=mask, need_weights=False)[0]
        z = attention(x, k, v)[0]
        return (y * z).sum(dim=(1 - batch, 2))

    assert_fused_exact([attention], forward, 0, leaves_of([attention]))


def test_attention_weights_reaching_the_losses_fall_back():
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(3, 5, 4)

    def forward() -> Tensor:
        y, weights = attention(x, x, x)
        return y.pow(2).sum(dim=(1, 2)) + weights.pow(2).sum(dim=(1, 2))

    assert_fused_exact([attention], forward, 0, leaves_of([attention]))


def test_scalar_loss_without_batch_dim():
    model, x = mlp(), torch.randn(6, 5)
    assert_fused_exact([model], lambda: model(x).pow(2).mean(), None, leaves_of([model]))


@pytest.mark.parametrize("objectives", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("max_kept_bytes", [None, 300])
def test_linear_on_long_sequences_keeps_the_per_objective_gradients(
    objectives, bias, max_kept_bytes, monkeypatch
):
    """More positions than input features: the fused step weights the kept per-objective
    gradients (when they fit the budget), and equals the two-pass step."""
    import torchjd.autogram._rules._linear as linear_module

    used: list[int] = []
    weighted_rows = linear_module._weighted_rows

    def spy(*args):
        used.append(1)
        return weighted_rows(*args)

    monkeypatch.setattr(linear_module, "_weighted_rows", spy)
    first, second = nn.Linear(3, 5, bias=bias), nn.Linear(5, 2)
    x = torch.randn(4, 9, 3)

    def forward() -> Tensor:
        h = torch.tanh(first(x))
        y = second(h + first(torch.sin(x)))  # first called twice
        return y.pow(2).mean(dim=1)[:, :objectives]

    leaves = leaves_of([first, second])
    assert_fused_exact([first, second], forward, 0, leaves, max_kept_bytes=max_kept_bytes)
    assert bool(used) == (max_kept_bytes is None)

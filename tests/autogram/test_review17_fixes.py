"""Fixes of the session-17 review: hooked calls that share an output tensor (a module returning
its hooked child's output unchanged), tie groups (sparse embedding in the fused step, ``max_norm``,
autocast), and modules whose ``forward`` is replaced. Gramians against brute force (one gradient
per objective, float64) and fused steps against ``losses.backward(weights)``."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_fused import leaves_of
from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autogram._registry import find_rule
from torchjd.autogram._rules import _tied
from torchjd.autogram._rules._generic import generic_rule
from torchjd.autogram._rules._norm import channel_norm_rule

B, D = 4, 5


def gramian_weighting(G: Tensor) -> Tensor:
    """Weights that change with every entry of the Gramian (UPGrad's stay at the mean where the
    gradients do not conflict): a wrong Gramian gives wrong weights."""
    return G.sum(dim=1) / G.diagonal().sum()


def assert_fused_against_brute_force(
    modules: list[nn.Module], forward: Callable[[], Tensor], **kwargs: int | None
) -> None:
    """The fused step's weights are those of the brute-force Gramian, and it leaves in every
    leaf's ``.grad`` what ``losses.backward(weights)`` leaves (both step and reference from
    ``.grad`` None)."""
    leaves = leaves_of(modules)
    for t in leaves:
        t.grad = None
    with Engine(*modules, batch_dim=0) as engine:
        w = engine.backward(forward(), gramian_weighting, **kwargs)
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    losses = forward()
    expected = gramian_weighting(brute_force_gramian(losses, leaves))
    assert (w - expected).abs().max() <= 1e-10 * expected.abs().max(), (w, expected)
    losses.backward(w.reshape(losses.shape))
    for k, (g, t) in enumerate(zip(grads, leaves, strict=True)):
        assert (g is None) == (t.grad is None), k
        if g is not None:
            ref = t.grad.to_dense()
            scale = ref.abs().max().clamp(min=1e-30)
            assert (g.to_dense() - ref).abs().max() <= 1e-10 * scale, (k, (g - ref).abs().max())


class _Outer(nn.Module):
    """A direct parameter, and the hooked child's output returned unchanged (a ViT's shape:
    ``pos_embed`` at the top level, ``return self.head(x)``)."""

    def __init__(self, child: nn.Module | None = None) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(D, D) / 3)
        self.child = nn.Linear(D, D) if child is None else child

    def forward(self, x: Tensor) -> Tensor:
        return self.child(torch.tanh(F.linear(x, self.p)))


class _TwoLevels(nn.Module):
    """Three nested hooked calls sharing one output tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(D) / 3)
        self.inner = _Outer()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.q)


class _TupleOut(nn.Module):
    """The child's output as one leaf of a tuple, next to an output of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(D, D) / 3)
        self.child = nn.Linear(D, D)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(F.linear(x, self.p))
        return self.child(h), h.sin()


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _TupleOut()
        self.s = nn.Parameter(torch.randn(D) / 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        a, b = self.inner(x * self.s)
        return {"a": a, "b": b}


def _shared_output_case(name: str, R: int) -> tuple[nn.Module, Callable[[], Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(B, D, dtype=torch.float64)
    factories: dict[str, Callable[[], nn.Module]] = {
        "outer": _Outer,
        "layer_norm": lambda: _Outer(nn.LayerNorm(D)),  # a streamed rule with inner edges
        "two_levels": _TwoLevels,
        "tuple": _TupleOut,
        "dict": _DictOut,
    }
    model = factories[name]().double()

    def forward() -> Tensor:
        out = model(x)
        if isinstance(out, tuple):
            out = out[0] + out[1].cos()
        elif isinstance(out, dict):
            out = out["a"] * out["b"]
        return out[:, :R].pow(2) if R > 1 else out.pow(2).sum(dim=1)

    return model, forward


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("name", ["outer", "layer_norm", "two_levels", "tuple", "dict"])
def test_gramian_of_calls_sharing_an_output(name: str, R: int) -> None:
    model, forward = _shared_output_case(name, R)
    assert_gramian_exact([model], forward, 0)


@pytest.mark.parametrize("max_kept_bytes", [None, 0])
@pytest.mark.parametrize("name", ["outer", "layer_norm", "two_levels", "dict"])
def test_fused_step_of_calls_sharing_an_output(name: str, max_kept_bytes: int | None) -> None:
    model, forward = _shared_output_case(name, 1)
    assert_fused_against_brute_force([model], forward, max_kept_bytes=max_kept_bytes)


V, T = 11, 3


def _tied_lm(sparse: bool = False, max_norm: float | None = None) -> tuple[list[nn.Module], Tensor]:
    torch.manual_seed(0)
    emb = nn.Embedding(V, D, sparse=sparse, max_norm=max_norm).double()
    head = nn.Linear(D, V).double()
    head.weight = emb.weight
    return [emb, head], torch.randint(0, V, (B, T))


def _lm_losses(emb: nn.Module, head: nn.Module, idx: Tensor) -> Tensor:
    logits = head(torch.tanh(emb(idx)))
    targets = idx.roll(1, dims=1)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(B, T).mean(dim=1)


@pytest.mark.parametrize("max_kept_bytes", [None, 0])
def test_fused_step_of_a_tie_with_a_sparse_embedding(max_kept_bytes: int | None) -> None:
    # The head's rule fuses, the sparse embedding's does not: the table's gradient (both shares)
    # must come from the second backward pass.
    (emb, head), idx = _tied_lm(sparse=True)
    forward = lambda: _lm_losses(emb, head, idx)  # noqa: E731
    assert_fused_against_brute_force([emb, head], forward, max_kept_bytes=max_kept_bytes)


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_tied_embedding_with_max_norm(scale_grad_by_freq: bool) -> None:
    # The group's rule re-ran the embedding, whose renormalisation bumped the table's version:
    # the step's backward pass raised.
    (emb, head), idx = _tied_lm(max_norm=0.5)
    emb.scale_grad_by_freq = scale_grad_by_freq
    with torch.no_grad():
        emb.weight.mul_(3.0)  # rows above the maximal norm
    forward = lambda: _lm_losses(emb, head, idx)  # noqa: E731
    assert_gramian_exact([emb, head], forward, 0)
    with Engine(emb, head, batch_dim=0) as engine:
        losses = forward()
        weights = UPGradWeighting()(engine.compute_gramian(losses))
    losses.backward(weights)
    assert emb.weight.grad is not None
    assert_fused_against_brute_force([emb, head], forward)


class _TwoLookups(nn.Module):
    """Two embeddings sharing one table (the group's rows path), with a head of their own."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.a = nn.Embedding(V, D, **kwargs)  # type: ignore[arg-type]
        self.b = nn.Embedding(V, D, **kwargs)  # type: ignore[arg-type]
        self.b.weight = self.a.weight
        self.head = nn.Linear(D, 1)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(idx) * self.b(idx.roll(1, dims=1)))).sum(dim=(1, 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_norm": 0.5},
        {"scale_grad_by_freq": True, "padding_idx": 0},
        {"max_norm": 0.5, "scale_grad_by_freq": True},
    ],
)
def test_rows_of_tied_embeddings_in_closed_form(
    kwargs: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = _TwoLookups(**kwargs).double()
    with torch.no_grad():
        model.a.weight.mul_(3.0)
    idx = torch.randint(0, V, (B, T))
    idx[0, 0] = 0
    forward = lambda: model(idx)  # noqa: E731

    def no_recomputation(*args: object) -> Tensor:
        raise AssertionError("re-ran an embedding")

    monkeypatch.setattr(_tied, "rows_by_recomputation", no_recomputation)
    assert_gramian_exact([model], forward, 0)
    with Engine(model, batch_dim=0) as engine:
        losses = forward()
        weights = UPGradWeighting()(engine.compute_gramian(losses))
    losses.backward(weights)


@pytest.mark.parametrize("tied", [False, True])
def test_tie_under_autocast_as_the_untied_model(tied: bool) -> None:
    # Under autocast the head's input and output gradients are bfloat16, the table float32: the
    # group's rule raised on the mixed dtypes. Tolerance of test_amp.py (bfloat16 rounding).
    torch.manual_seed(0)
    emb, mid, head = nn.Embedding(V, D).float(), nn.Linear(D, D).float(), nn.Linear(D, V).float()
    if tied:
        head.weight = emb.weight
    idx = torch.randint(0, V, (B, T))
    modules = [emb, mid, head]
    leaves = leaves_of(modules)

    def forward() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(torch.tanh(mid(emb(idx))))
        assert logits.dtype == torch.bfloat16  # autocast is on
        targets = idx.roll(1, dims=1).flatten()
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets, reduction="none")
        return losses.view(B, T).mean(dim=1)

    with Engine(*modules, batch_dim=0) as engine:
        losses = forward()
        G = engine.compute_gramian(losses)
    expected = brute_force_gramian(losses, leaves)
    assert G.dtype == torch.float32
    assert (G - expected).abs().max() <= 3e-2 * expected.abs().max()
    with Engine(*modules, batch_dim=0) as engine:
        w = engine.backward(forward(), UPGradWeighting())
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    forward().backward(w)
    for g, t in zip(grads, leaves, strict=True):
        assert g is not None
        assert t.grad is not None
        assert (g - t.grad).abs().max() <= 3e-2 * t.grad.abs().max()


def test_instance_with_its_own_forward_gets_the_generic_rule() -> None:
    torch.manual_seed(0)
    linear, emb = nn.Linear(D, D), nn.Embedding(V, D)
    linear.forward = lambda x: 2.0 * F.linear(x, linear.weight, linear.bias)  # type: ignore[method-assign]
    emb.forward = lambda idx: F.embedding(idx, emb.weight).pow(2)  # type: ignore[method-assign]
    assert find_rule(linear).rule is generic_rule  # type: ignore[union-attr]
    assert find_rule(emb).rule is generic_rule  # type: ignore[union-attr]
    idx = torch.randint(0, V, (B, T))
    forward = lambda: linear(torch.tanh(emb(idx))).pow(2).sum(dim=(1, 2))  # noqa: E731
    assert_gramian_exact([linear, emb], forward, 0)


def test_sync_batch_norm_in_eval_mode_has_the_closed_form() -> None:
    torch.manual_seed(0)
    norm = nn.SyncBatchNorm(3)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(B, 2, 6, 6)
    forward = lambda: norm(conv(x)).tanh().pow(2).sum(dim=(1, 2, 3))  # noqa: E731
    assert find_rule(norm).rule is channel_norm_rule  # type: ignore[union-attr]
    norm.eval()
    assert_gramian_exact([conv, norm], forward, 0)
    assert_fused_against_brute_force([conv, norm], forward)
    norm.train()  # batch statistics: refused with a batch dimension, exact without
    with Engine(conv, norm, batch_dim=0) as engine, pytest.raises(ValueError, match="batch_dim"):
        engine.compute_gramian(forward())
    assert_gramian_exact([conv, norm], lambda: forward().sum(), None)


@pytest.mark.parametrize("replaced", ["emb", "head"])
def test_tie_with_an_instance_forward(replaced: str) -> None:
    (emb, head), idx = _tied_lm()
    if replaced == "head":
        head.forward = lambda x: 2.0 * F.linear(x, head.weight, head.bias)  # type: ignore[method-assign]
    else:
        emb.forward = lambda i: F.embedding(i, emb.weight).pow(2)  # type: ignore[method-assign]
    forward = lambda: _lm_losses(emb, head, idx)  # noqa: E731
    assert_gramian_exact([emb, head], forward, 0)
    assert_fused_against_brute_force([emb, head], forward)


@pytest.mark.parametrize("length", [2, 6])  # B T U = 16 <= V d = 55: cross terms; 144: rows
def test_paths_of_the_lm_group_agree(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    emb, head = nn.Embedding(V, D, padding_idx=0).double(), nn.Linear(D, V).double()
    head.weight = emb.weight
    idx = torch.randint(0, V, (B, length))

    def forward() -> Tensor:
        logits = head(torch.tanh(emb(idx)))
        targets = idx.roll(1, dims=1).flatten()
        losses = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        return losses.view(B, length)

    cross_terms: list[int] = []
    original = _tied._embedding_head_gramian  # None when it declines the path of the cross terms

    def spy(*args: object) -> Tensor | None:
        G = original(*args)  # type: ignore[arg-type]
        if G is not None:
            cross_terms.append(1)
        return G

    monkeypatch.setattr(_tied, "_embedding_head_gramian", spy)
    G = assert_gramian_exact([emb, head], forward, 0)
    assert bool(cross_terms) == (B * length * length <= V * D)
    monkeypatch.setattr(_tied, "_embedding_head_gramian", lambda *args: None)
    G_rows = assert_gramian_exact([emb, head], forward, 0)
    assert (G - G_rows).abs().max() <= 1e-12 * G_rows.abs().max()

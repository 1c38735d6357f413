"""Parameters tied across hooked modules (a language model's head tied to its embedding, two
layers sharing a weight): the engine groups the modules and gives the group's Gramian from all of
their calls, with the cross terms of the shared parameters. Gramians against brute force (one
gradient per objective, float64) and fused steps against ``losses.backward(weights)``."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tests.autogram._helpers import assert_gramian_exact, trainable
from tests.autogram.test_fused import assert_fused_exact, leaves_of
from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autogram._rules import _tied

B, T, V, D = 4, 3, 11, 4

Case = tuple[list[nn.Module], Callable[[], Tensor], int | None]


class TinyLM(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.mid = nn.Linear(D, D)
        self.head = nn.Linear(D, V)
        self.head.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def _lm_losses(model: nn.Module, idx: Tensor) -> Tensor:
    """Next-token cross-entropy ``[B, T]``."""
    logits = model(idx)
    targets = idx.roll(1, dims=1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(B, T)


def _lm() -> Case:
    model = TinyLM()
    idx = torch.randint(0, V, (B, T))
    return [model], lambda: _lm_losses(model, idx).mean(dim=1), 0


def _lm_per_position() -> Case:
    """Several objectives per sample: one per position."""
    model = TinyLM()
    idx = torch.randint(0, V, (B, T))
    return [model], lambda: _lm_losses(model, idx), 0


def _lm_padding() -> Case:
    """Positions at the padding index give the table no gradient (through the embedding)."""
    model = TinyLM(padding_idx=0)
    idx = torch.randint(0, V, (B, T))
    idx[:, 0] = 0
    return [model], lambda: _lm_losses(model, idx).mean(dim=1), 0


def _lm_batch_dim_1() -> Case:
    """Samples along dimension 1 of the tokens and of the losses."""
    model = TinyLM()
    idx = torch.randint(0, V, (T, B))

    def forward() -> Tensor:
        logits = model(idx)
        targets = idx.roll(1, dims=0).flatten()
        losses = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        return losses.view(T, B)

    return [model], forward, 1


def _lm_subclass() -> Case:
    """A head whose class overrides forward: its rows come from re-running it."""

    class Head(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2.0

    model = TinyLM()
    model.head = Head(D, V)
    model.head.weight = model.emb.weight
    idx = torch.randint(0, V, (B, T))
    return [model], lambda: _lm_losses(model, idx).mean(dim=1), 0


def _lm_two_calls() -> Case:
    """The embedding and the head each called twice (cross terms between all four calls)."""
    model = TinyLM()
    idx, other = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, 2))

    def forward() -> Tensor:
        h = torch.tanh(model.mid(model.emb(idx)))
        g = torch.tanh(model.emb(other)).mean(dim=1, keepdim=True)
        return (model.head(h) * torch.sigmoid(model.head(g))).pow(2).mean(dim=(1, 2))

    return [model], forward, 0


def _lm_no_batch_dim() -> Case:
    model = TinyLM()
    idx = torch.randint(0, V, (B, T))
    return [model], lambda: _lm_losses(model, idx).mean(dim=1), None


def _two_linears() -> Case:
    a, b, head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    b.weight = a.weight
    x = torch.randn(B, 4)
    return [a, b, head], lambda: head(torch.tanh(b(torch.tanh(a(x))) + a(x))).pow(2).sum(1), 0


def _three_modules() -> Case:
    """One tensor used by three modules: an embedding and two Linear layers."""
    emb, proj, tail = (
        nn.Embedding(V, D, padding_idx=0),
        nn.Linear(D, V, bias=False),
        nn.Linear(D, V),
    )
    proj.weight = emb.weight
    tail.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "proj": proj, "tail": tail})
    idx = torch.randint(0, V, (B, T))
    idx[:, 1] = 0

    def forward() -> Tensor:
        h = torch.tanh(emb(idx))  # [B, T, D]
        return (tail(h) * torch.sigmoid(proj(h))).pow(2).mean(dim=(1, 2))

    return [model], forward, 0


def _transformer() -> Case:
    """A Linear outside a TransformerEncoderLayer tied to its feed-forward's first layer, and a
    second one tied to its attention's output projection (a child covered by the attention's
    rule)."""
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=D, dropout=0.0, batch_first=True)
    inp, out = nn.Linear(D, D), nn.Linear(D, D)
    inp.weight = layer.linear1.weight
    out.weight = layer.self_attn.out_proj.weight
    model = nn.ModuleDict({"inp": inp, "layer": layer, "out": out})
    x = torch.randn(B, T, D)
    return [model], lambda: out(layer(inp(x))).pow(2).mean(dim=(1, 2)), 0


def _conv() -> Case:
    a, b = nn.Conv1d(3, 3, 3, padding=1), nn.Conv1d(3, 3, 3, padding=1)
    b.weight = a.weight
    x = torch.randn(B, 3, 5)
    model = nn.Sequential(a, nn.Tanh(), b, nn.Flatten(), nn.Linear(15, 1))
    return [model], lambda: model(x).squeeze(1) ** 2, 0


CASES = {
    "lm": _lm,
    "lm_per_position": _lm_per_position,
    "lm_no_batch_dim": _lm_no_batch_dim,
    "lm_padding": _lm_padding,
    "lm_two_calls": _lm_two_calls,
    "lm_batch_dim_1": _lm_batch_dim_1,
    "lm_subclass": _lm_subclass,
    "two_linears": _two_linears,
    "three_modules": _three_modules,
    "transformer": _transformer,
    "conv": _conv,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gramian_against_brute_force(name: str) -> None:
    torch.manual_seed(0)
    modules, forward, batch_dim = CASES[name]()
    assert_gramian_exact(modules, forward, batch_dim)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_step(name: str) -> None:
    torch.manual_seed(0)
    modules, forward, batch_dim = CASES[name]()
    assert_fused_exact(modules, forward, batch_dim, leaves_of(modules))


def test_group_rule_is_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM's embedding and head go through one group rule, once per Gramian."""
    torch.manual_seed(0)
    (model,), forward, _ = _lm()
    runs = []
    original = _tied.tied_group_gramian

    def spy(members, shared):  # type: ignore[no-untyped-def]
        runs.append({type(m).__name__ for m, _, _ in members})
        return original(members, shared)

    monkeypatch.setattr("torchjd.autogram._engine.tied_group_gramian", spy)
    with Engine(model, batch_dim=0) as engine:
        engine.compute_gramian(forward())
    assert runs == [{"Embedding", "Linear"}]


def test_partial_jacobian_descent_over_one_of_the_tied_modules() -> None:
    """An engine over the embedding alone, the head (tied to it) outside: as documented, the
    columns of the tied weight hold the contributions of the hooked calls only (the head's use is
    not seen), so the Gramian is the brute-force one of a forward in which the head uses a
    detached copy; the fused step's gradients are still the full ones (second backward)."""
    torch.manual_seed(0)
    model = TinyLM()
    idx = torch.randint(0, V, (B, T))
    with Engine(model.emb, batch_dim=0) as engine:
        G = engine.compute_gramian(_lm_losses(model, idx).mean(dim=1))
    h = torch.tanh(model.mid(model.emb(idx)))
    logits = F.linear(h, model.emb.weight.detach(), model.head.bias)
    losses = F.cross_entropy(logits.flatten(0, 1), idx.roll(1, 1).flatten(), reduction="none")
    expected = brute_force_gramian(losses.view(B, T).mean(dim=1), [model.emb.weight])
    assert (G - expected).abs().max() <= 1e-10 * expected.abs().max()
    full = brute_force_gramian(_lm_losses(model, idx).mean(dim=1), [model.emb.weight])
    assert (full - expected).abs().max() > 1e-3 * full.abs().max()
    assert_fused_exact(
        [model.emb], lambda: _lm_losses(model, idx).mean(dim=1), 0, leaves_of([model])
    )


def test_partial_jacobian_descent_over_both_tied_modules() -> None:
    """An engine over the embedding and the head (the middle Linear left out): exact."""
    torch.manual_seed(0)
    model = TinyLM()
    idx = torch.randint(0, V, (B, T))
    forward = lambda: _lm_losses(model, idx).mean(dim=1)  # noqa: E731
    assert_gramian_exact([model.emb, model.head], forward, 0)
    assert_fused_exact([model.emb, model.head], forward, 0, leaves_of([model]))


def test_frozen_tied_weight_uses_the_modules_own_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tied tensor that does not require grad ties nothing: no group rule, every module fused."""
    torch.manual_seed(0)
    model = TinyLM()
    model.emb.weight.requires_grad_(False)
    idx = torch.randint(0, V, (B, T))
    forward = lambda: _lm_losses(model, idx).mean(dim=1)  # noqa: E731

    def fail(members, shared):  # type: ignore[no-untyped-def]
        raise AssertionError("the group rule ran")

    monkeypatch.setattr("torchjd.autogram._engine.tied_group_gramian", fail)
    assert_gramian_exact([model], forward, 0)
    assert_fused_exact([model], forward, 0, leaves_of([model]))
    model.emb.weight.requires_grad_(True)  # trainable again: the group's rule again
    with pytest.raises(AssertionError, match="the group rule ran"):
        assert_gramian_exact([model], forward, 0)


def test_tie_with_a_tie_inside_a_module() -> None:
    """A LayerNorm holding one tensor as weight and bias, also tied to another LayerNorm's
    weight."""
    torch.manual_seed(0)
    a, b = nn.LayerNorm(4), nn.LayerNorm(4)
    a.bias = a.weight
    b.weight = a.weight
    with torch.no_grad():
        a.weight.copy_(torch.randn(4))
    model = nn.Sequential(a, nn.Linear(4, 4), b, nn.Linear(4, 1))
    x = torch.randn(B, 3, 4)
    forward = lambda: model(x).sum(dim=(1, 2))  # noqa: E731
    assert_gramian_exact([model], forward, 0)
    assert_fused_exact([model], forward, 0, leaves_of([model]))


def test_untied_after_the_engine_was_created() -> None:
    """Untying after the engine was created leaves a group whose rule is still exact."""
    torch.manual_seed(0)
    (model,), forward, _ = _lm()
    with Engine(model, batch_dim=0) as engine:
        model.head.weight = nn.Parameter(model.emb.weight.detach().clone())
        losses = forward()
        G = engine.compute_gramian(losses)
    expected = brute_force_gramian(losses, trainable(model))
    assert (G - expected).abs().max() <= 1e-10 * expected.abs().max()


@pytest.mark.parametrize(
    ("modules_of", "backward_passes"),
    [
        (lambda model: [model], 0),  # every leaf from the rules: the group fused
        (lambda model: [model.emb, model.head], 1),  # `mid` left to the second backward pass
        (lambda model: [model.emb, model.mid], 1),  # the head's use of the table is outside
    ],
)
def test_fused_step_of_the_lm_group(
    monkeypatch: pytest.MonkeyPatch, modules_of: Callable, backward_passes: int
) -> None:
    """An Embedding and a Linear sharing the table are fused as the untied modules would be: the
    table's gradient is the sum of the two rules' (no second backward pass when nothing else
    needs one), unless the table is also used outside the hooked calls."""
    torch.manual_seed(0)
    model = TinyLM()
    idx = torch.randint(0, V, (B, T))
    modules = modules_of(model)
    forward = lambda: _lm_losses(model, idx).mean(dim=1)  # noqa: E731
    assert_fused_exact(modules, forward, 0, leaves_of([model]))
    passes = []
    original = torch.autograd.backward
    monkeypatch.setattr(
        torch.autograd, "backward", lambda *a, **k: passes.append(1) or original(*a, **k)
    )
    with Engine(*modules, batch_dim=0) as engine:
        engine.backward(forward(), UPGradWeighting())
    assert len(passes) == backward_passes


@pytest.mark.parametrize("max_kept_bytes", [0, 2000, None])
def test_fused_step_of_the_lm_group_within_a_budget(max_kept_bytes: int | None) -> None:
    """The group's calls are kept for the fused step together or not at all."""
    torch.manual_seed(0)
    (model,), forward, _ = _lm_per_position()
    assert_fused_exact([model], forward, 0, leaves_of([model]), max_kept_bytes=max_kept_bytes)

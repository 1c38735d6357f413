"""What the engine reads afresh from step to step: the cotangent of a Gramian pass (made at each
step, so that a hook's write to it reaches no later step), the trainable modules for a rule that
covers a module's descendants, and the weights of the fused step per sample."""

import copy

import pytest
import torch
from torch import Tensor, nn

from tests.reference.jacobians import brute_force_gramian
from torchjd.aggregation import MeanWeighting
from torchjd.autogram import Engine
from torchjd.autogram._fused import per_sample_weights


def _assert_close(G: Tensor, expected: Tensor) -> None:
    tolerance = 1e-10 if G.dtype == torch.float64 else 1e-5
    assert (G - expected).abs().max() <= tolerance * expected.abs().max()


def test_a_write_to_the_cotangent_does_not_reach_later_steps():
    """A hook that writes to the cotangent that it receives, without autograd seeing it (through
    NumPy), changes that step only: the cotangent is made afresh at each step (a kept one, renewed
    on a version bump, had every later Gramian 4 times too large)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    reference = copy.deepcopy(model)  # not hooked
    expected = brute_force_gramian(reference(x).squeeze(1), list(reference.parameters()))
    with Engine(model, batch_dim=0) as engine:
        _assert_close(engine.compute_gramian(model(x).squeeze(1)), expected)
        losses = model(x).squeeze(1)

        def double_in_place(grad: Tensor) -> None:
            array = grad.numpy()
            array *= 2.0

        losses.register_hook(double_in_place)
        engine.compute_gramian(losses)
        for _ in range(2):
            _assert_close(engine.compute_gramian(model(x).squeeze(1)), expected)


def test_a_covering_rule_reads_the_descendants_flags_at_every_step():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    head = nn.Linear(4, 1, dtype=torch.float64)
    x = torch.randn(3, 5, 4, dtype=torch.float64)

    def losses() -> Tensor:
        return head(attention(x, x, x, need_weights=False)[0].mean(dim=1)).squeeze(1)

    with Engine(attention, head, batch_dim=0) as engine:
        assert engine._rules[attention][1]  # its rule covers its child, out_proj
        # only the child trainable, then nothing of the attention, then all of it
        for trainable in ([attention.out_proj.weight], [], list(attention.parameters())):
            for param in attention.parameters():
                param.requires_grad_(any(param is p for p in trainable))
            output = losses()
            G = engine.compute_gramian(output)
            params = [*trainable, *head.parameters()]
            _assert_close(G, brute_force_gramian(output, params))
        head.requires_grad_(False)
        attention.requires_grad_(False)
        with pytest.raises(ValueError, match="trainable parameters"):
            engine.compute_gramian(losses())
        attention.out_proj.bias.requires_grad_(True)  # one parameter of the child: traced again
        output = losses()
        G = engine.compute_gramian(output)
        _assert_close(G, brute_force_gramian(output, [attention.out_proj.bias]))


@pytest.mark.parametrize("shape", [(0,), (1,), (6,)])
def test_per_sample_weights_of_one_objective_per_sample(shape: tuple[int, ...]):
    weights = torch.arange(float(shape[0]))
    W = per_sample_weights(weights, torch.zeros(shape), 0)
    general = weights.reshape(shape).movedim(0, 0).reshape(shape[0], 1)
    assert W.shape == general.shape == (shape[0], 1)
    assert W.stride() == general.stride()
    assert torch.equal(W, general)
    assert W.data_ptr() == weights.data_ptr()  # a view, as before


def test_fused_step_with_one_objective_per_sample_matches_the_two_pass_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    reference = copy.deepcopy(model)  # not hooked
    with Engine(model, batch_dim=0) as engine:
        for step in range(3):  # the kept one, reused
            model.zero_grad()
            reference.zero_grad()
            weights = engine.backward(model(x[step:]).squeeze(1), MeanWeighting())
            reference(x[step:]).squeeze(1).backward(weights)
            for got, expected in zip(model.parameters(), reference.parameters(), strict=True):
                assert torch.allclose(got.grad, expected.grad, rtol=1e-12, atol=1e-14)


def test_a_step_under_a_memory_budget_keeps_no_buffer():
    """The per-sample gradients of a Linear map over positions are formed in a buffer kept from
    step to step; a fused step with ``max_kept_bytes`` frees it and keeps none (it held them
    whatever the budget), with the same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)
    x = torch.randn(4, 8, 4, dtype=torch.float64)  # 8 positions per sample
    with Engine(model, batch_dim=0) as engine:
        engine.backward(model(x).sum(dim=(1, 2)), MeanWeighting())
        assert len(engine._workspaces) > 0
        unbounded = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        for budget in (0, 1 << 20):
            engine.backward(model(x).sum(dim=(1, 2)), MeanWeighting(), max_kept_bytes=budget)
            assert len(engine._workspaces) == 0
            for grad, p in zip(unbounded, model.parameters(), strict=True):
                torch.testing.assert_close(p.grad, grad, rtol=1e-12, atol=1e-14)
            model.zero_grad()

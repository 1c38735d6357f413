"""What the engine records cheaply: the statistics of a LayerNorm's forward pass (the rule's
normalised input, see ``_norm.layer_norm_statistics``), the leaves of a call's arguments and
outputs (``_module_call.flat_leaves``), and no random state for calls that draw none."""

from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from tests.autogram._helpers import assert_gramian_exact
from torchjd.autogram import Engine
from torchjd.autogram._module_call import flat_leaves
from torchjd.autogram._rules import _norm


class _SubclassedNorm(nn.LayerNorm):
    """A LayerNorm whose forward is its own (the statistics are then not read)."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * 1.0


def _recorded_statistics(model: nn.Module, norm: nn.Module, x: Tensor) -> list[Any]:
    with Engine(model, batch_dim=0) as engine:
        model(x)
        return [call.saved.get("statistics") for call in engine._calls[norm]]


@pytest.mark.parametrize("normalized_shape", [(6,), (3, 6)])
def test_statistics_are_recorded_and_the_gramian_is_exact(normalized_shape: tuple[int, ...]):
    torch.manual_seed(0)
    norm = nn.LayerNorm(normalized_shape, dtype=torch.float64)
    with torch.no_grad():  # affine parameters away from their initial values
        norm.weight.normal_()
        norm.bias.normal_()
    model = nn.Sequential(
        nn.Linear(4, 18, dtype=torch.float64),
        nn.Unflatten(1, (3, 6)),
        norm,
        nn.Flatten(),
        nn.Linear(18, 2, dtype=torch.float64),
    )
    x = torch.randn(5, 4, dtype=torch.float64)

    statistics = _recorded_statistics(model, norm, x)
    assert len(statistics) == 1
    assert statistics[0] is not None
    recorded_input, mean, rstd = statistics[0]
    dims = tuple(range(-len(normalized_shape), 0))
    torch.testing.assert_close(mean, recorded_input.mean(dim=dims, keepdim=True))
    reference = nn.functional.layer_norm(recorded_input, normalized_shape, eps=norm.eps)
    torch.testing.assert_close((recorded_input - mean) * rstd, reference)

    assert_gramian_exact([model], lambda: model(x).square().sum(dim=1), batch_dim=0)


def test_no_statistics_from_a_norm_whose_output_is_not_torchs():
    norm = _SubclassedNorm(3, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(2, 3, dtype=torch.float64), norm)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert _recorded_statistics(model, norm, x) == [None]
    assert_gramian_exact([model], lambda: model(x).sum(dim=1), batch_dim=0)


def test_no_statistics_under_saved_tensor_hooks():
    norm = nn.LayerNorm(3, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(2, 3, dtype=torch.float64), norm)
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert _recorded_statistics(model, norm, x) == [None]
        assert_gramian_exact([model], lambda: model(x).sum(dim=1), batch_dim=0)


def test_a_replaced_input_is_normalised_afresh():
    """The statistics belong to the recorded input: when a call's input is replaced before the
    rule runs (as torchjd.distributed does), the rule normalises the new one itself."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(3, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 3, dtype=torch.float64)
    replacement = torch.randn(4, 3, dtype=torch.float64)
    rule = _norm.layer_norm_rule
    seen: list[Tensor] = []

    def replacing_rule(module: nn.Module, calls: Any) -> Tensor:
        for call in calls:
            assert call.saved["statistics"][0] is call.args[0]
            call.args = (replacement,)
            seen.append(_norm._layer_normalised(module, replacement, None))
        return rule(module, calls)

    with Engine(norm, batch_dim=0) as engine:
        engine._rules[norm] = (replacing_rule, engine._rules[norm][1])
        replacing_rule.pure = rule.pure  # type: ignore[attr-defined]
        replacing_rule.inner_edges = rule.inner_edges  # type: ignore[attr-defined]
        G = engine.compute_gramian(norm(x).sum(dim=1))
    # the Gramian of the affine parameters for the replacement's normalised values: the output
    # gradients are ones, so J_w[i] = x_hat[i] and J_b[i] = 1
    x_hat = seen[0]
    expected = x_hat @ x_hat.T + 3.0
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=1e-12)


_Pair = namedtuple("_Pair", "first second")


def _structures() -> list[Any]:
    t = torch.randn(2)
    p = nn.Parameter(torch.randn(2))
    return [
        t,
        (t, None),
        [t, 1, 2.5, "s", True, None],
        {"attn_mask": None, "key_padding_mask": t, "need_weights": False},
        {},
        (),
        [],
        (t, (t, None)),
        {"a": [t]},
        _Pair(t, None),
        OrderedDict(a=t),
        (p, t),
        None,
        3,
        torch.Size([2, 3]),
        (torch.Size([1]), t),
        {"z": t, "a": 1},
    ]


@pytest.mark.parametrize("tree", _structures())
def test_flat_leaves_are_pytrees_leaves(tree: Any):
    leaves = flat_leaves(tree)
    expected = tree_leaves(tree)
    assert len(leaves) == len(expected)
    assert all(a is b for a, b in zip(leaves, expected, strict=True))


@pytest.mark.parametrize(
    ("dropout", "training", "recorded"),
    [(0.0, True, False), (0.5, False, False), (0.5, True, True)],
)
def test_attention_records_a_random_state_only_with_dropout(
    dropout: float, training: bool, recorded: bool
):
    attention = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)
    attention.train(training)
    x = torch.randn(3, 5, 4)
    with Engine(attention, batch_dim=0) as engine:
        attention(x, x, x, need_weights=False)
        (call,) = engine._calls[attention]
        assert (call.rng_state is not None) == recorded
        assert not engine._rng_states[attention]  # popped by the call's recording


def test_attention_with_dropout_replays_the_recorded_random_state():
    """Under saved-tensor hooks, the rule re-runs the attention: with dropout, the re-run must
    draw the masks of the forward pass."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 5, 4, dtype=torch.float64)

    def forward() -> Tensor:
        return attention(x, x, x, need_weights=False)[0].sum(dim=(1, 2))

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert_gramian_exact([attention], forward, batch_dim=0)

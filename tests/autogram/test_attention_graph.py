"""``MultiheadAttention`` through its projections found in the graph (no re-run): the Gramian
equals brute force and the fused step equals the two-pass step (float64, 1e-10), for every
option of the module; the cases the search does not cover take the re-running path."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import torchjd.autogram._rules._attention as attention_module
from tests.autogram._helpers import assert_gramian_exact
from tests.autogram.test_fused import assert_fused_exact, leaves_of

B, T, S, E = 3, 4, 5, 6


@pytest.fixture
def no_rerun(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the re-running paths fail: the Gramian must come from the recorded graph."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the attention was re-run")

    for name in ("_rerun", "_per_sample_gramian", "gramian_by_recomputation"):
        monkeypatch.setattr(attention_module, name, fail)


def _mha(**kwargs: object) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(E, 2, **kwargs)  # type: ignore[arg-type]


Lay = Callable[[Tensor], Tensor]  # a batch-first [B, L, d] tensor in the module's layout
Call = Callable[[nn.MultiheadAttention, Tensor, Lay], tuple[Tensor, Tensor | None]]


def _self(**kwargs: object) -> Call:
    return lambda m, x, lay: m(lay(x), lay(x), lay(x), **kwargs)


def _masks(causal: bool) -> dict[str, object]:
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, -1] = True
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1) if causal else None
    return {"key_padding_mask": padding, "attn_mask": mask, "is_causal": causal}


def _cases() -> dict[str, tuple[Callable[[], nn.MultiheadAttention], Call]]:
    """name -> (module factory, call of the module on the input ``x`` ``[B, T, E]``)."""
    torch.manual_seed(1)
    memory = torch.randn(B, S, E)
    keys, values = torch.randn(B, S, 4), torch.randn(B, S, 5)

    def cross(m: nn.MultiheadAttention, x: Tensor, lay: Lay) -> tuple[Tensor, Tensor | None]:
        return m(lay(x), lay(memory * x.mean(dim=1, keepdim=True)), lay(memory))

    def constant_memory(
        m: nn.MultiheadAttention, x: Tensor, lay: Lay
    ) -> tuple[Tensor, Tensor | None]:
        return m(lay(x), lay(memory), lay(memory))  # keys and values that do not require grad

    def key_is_value(m: nn.MultiheadAttention, x: Tensor, lay: Lay) -> tuple[Tensor, Tensor | None]:
        kv = lay(x[:, :2] * 2)
        return m(lay(x), kv, kv)

    def kdim_vdim(m: nn.MultiheadAttention, x: Tensor, lay: Lay) -> tuple[Tensor, Tensor | None]:
        return m(lay(x), lay(keys * x[:, :1, :4]), lay(values))

    def two_calls(m: nn.MultiheadAttention, x: Tensor, lay: Lay) -> tuple[Tensor, Tensor | None]:
        h = lay(x)
        h = torch.tanh(m(h, h, h)[0])
        return m(h, h, h)

    return {
        "self": (lambda: _mha(), _self()),
        "no_bias": (lambda: _mha(bias=False), _self()),
        "add_zero_attn": (lambda: _mha(add_zero_attn=True), _self()),
        "masks_weights": (
            lambda: _mha(),
            _self(need_weights=True, average_attn_weights=False, **_masks(False)),
        ),
        "causal": (lambda: _mha(), _self(**_masks(True))),
        "float_mask": (lambda: _mha(), _self(attn_mask=torch.randn(T, T), need_weights=False)),
        "per_head_mask": (lambda: _mha(), _self(attn_mask=torch.randn(B * 2, T, T))),
        "cross": (lambda: _mha(), cross),
        "constant_memory": (lambda: _mha(), constant_memory),
        "key_is_value": (lambda: _mha(), key_is_value),
        "kdim_vdim": (lambda: _mha(kdim=4, vdim=5), kdim_vdim),
        "dropout": (lambda: _mha(dropout=0.5), _self()),
        "two_calls": (lambda: _mha(), two_calls),
    }


NAMES = [
    "self", "no_bias", "add_zero_attn", "masks_weights", "causal", "float_mask", "per_head_mask",
    "cross", "constant_memory", "key_is_value", "kdim_vdim", "dropout", "two_calls",
]  # fmt: skip


def _head(y: tuple[Tensor, Tensor | None]) -> Tensor:
    """Objectives ``[B, 2]`` from the batch-first output and, when returned, the attention
    weights."""
    out = y[0].pow(2).flatten(1)
    weights = 0 if y[1] is None else y[1].pow(2).flatten(1).sum(dim=1, keepdim=True)
    return torch.stack([out.mean(dim=1), out[:, 0]], dim=1) + weights


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_gramian_and_fused_step(name: str, batch_first: bool, no_rerun: None) -> None:
    cases = _cases()  # float64 tensors (made after the fixture sets the default dtype)
    assert list(cases) == NAMES
    factory, call = cases[name]
    torch.manual_seed(0)
    module = factory()
    module.batch_first = batch_first
    x = torch.randn(B, T, E)

    def lay(t: Tensor) -> Tensor:
        return t if batch_first else t.transpose(0, 1)

    def forward() -> Tensor:
        torch.manual_seed(2)  # the same dropout masks in every forward pass
        y, weights = call(module, torch.tanh(x), lay)
        return _head((lay(y), weights))

    assert_gramian_exact([module], forward, 0)
    assert_fused_exact([module], forward, 0, leaves_of([module]))


def test_unbatched_inputs(no_rerun: None) -> None:
    module = _mha()
    x = torch.randn(T, E)
    forward = lambda: module(x, x, x)[0].pow(2).sum(dim=1)  # noqa: E731
    assert_gramian_exact([module], forward, None)
    assert_fused_exact([module], forward, None, leaves_of([module]))


def test_batch_dim_none_objectives(no_rerun: None) -> None:
    module = _mha(batch_first=True)
    x = torch.randn(B, T, E)
    forward = lambda: module(x, x, x)[0].pow(2).sum(dim=(0, 2))  # noqa: E731
    assert_gramian_exact([module], forward, None)
    assert_fused_exact([module], forward, None, leaves_of([module]))


class _Subclass(nn.MultiheadAttention):
    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        return super().forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal,
        )  # fmt: skip


def test_fallbacks_stay_exact() -> None:
    """bias_k/bias_v, frozen projections, calls of different structure, a subclass with its own
    forward: re-run, still exact."""
    x = torch.randn(B, T, E)
    with_bias_kv = _mha(batch_first=True, add_bias_kv=True)
    frozen = _mha(batch_first=True)
    frozen.in_proj_weight.requires_grad_(False)
    mixed = _mha(batch_first=True)
    subclass = _Subclass(E, 2, batch_first=True)
    forwards = [
        (with_bias_kv, lambda: _head(with_bias_kv(x, x, x))),
        (frozen, lambda: _head(frozen(x, x, x))),
        (mixed, lambda: _head(mixed(x, x, x)) + _head(mixed(x, x * 2, x))),
        (subclass, lambda: _head(subclass(x, x, x))),
    ]
    for module, forward in forwards:
        assert_gramian_exact([module], forward, 0)
        assert_fused_exact([module], forward, 0, leaves_of([module]))


@pytest.mark.parametrize("wrapper", ["checkpoint", "save_on_cpu"])
def test_saved_tensor_hooks(wrapper: str) -> None:
    """Under saved-tensor hooks the rule re-runs instead of reading the saved inputs: exact."""
    module = _mha(batch_first=True)
    x = torch.randn(B, T, E)

    def attend(h: Tensor) -> Tensor:
        return module(h, h, h)[0]

    def forward() -> Tensor:
        h = torch.tanh(x)
        if wrapper == "checkpoint":
            y = checkpoint(attend, h, use_reentrant=False)
        else:
            with torch.autograd.graph.save_on_cpu():
                y = attend(h)
        return y.pow(2).sum(dim=(1, 2))

    assert_gramian_exact([module], forward, 0)


@pytest.mark.parametrize("objectives", [1, 2])
def test_long_sequences_keep_the_per_objective_gradients(
    objectives: int, no_rerun: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More positions than features: the fused step weights the kept per-objective gradients of
    the projections, and equals the two-pass step."""
    import torchjd.autogram._rules._graph_linear as graph_linear_module

    used: list[int] = []
    weighted_jacobian = graph_linear_module.weighted_jacobian

    def spy(*args: Tensor) -> tuple[Tensor, Tensor | None]:
        used.append(1)
        return weighted_jacobian(*args)

    monkeypatch.setattr(graph_linear_module, "weighted_jacobian", spy)
    module = _mha(batch_first=True)
    x = torch.randn(B, 2 * E, E)

    def forward() -> Tensor:
        h = torch.tanh(x)
        return _head(module(h, h, h))[:, :objectives]

    assert_gramian_exact([module], forward, 0)
    assert_fused_exact([module], forward, 0, leaves_of([module]))
    assert len(used) == 2  # the in-projection and the out-projection


@pytest.mark.parametrize("objectives", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_of_rows_in_a_transformer_layer(
    objectives: int, dtype: torch.dtype, no_rerun: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Transformer encoder layer with 64 objectives (64 samples, or 16 samples with 4 each):
    the per-objective gradients of its projections and linear layers formed by blocks of a few
    features, the Gramian of each block by blocks of rows; the Gramian equals brute force, and
    the fused step the two-pass step."""
    import torchjd.autogram._rules._linear as linear_module

    monkeypatch.setattr(linear_module, "BLOCK_BYTES", 1)
    monkeypatch.setattr(linear_module, "MIN_BLOCK_FEATURES", 3)
    monkeypatch.setattr(linear_module, "PARTS_MIN_PRODUCT", 0)
    monkeypatch.setattr(linear_module, "per_objective_is_cheaper", lambda *args: True)
    parts_used: list[int] = []
    gram_parts = linear_module.gram_parts

    def spy(rows: int, columns: int) -> list[tuple[int, int]]:
        parts = gram_parts(rows, columns)
        parts_used.append(len(parts))
        return parts

    monkeypatch.setattr(linear_module, "gram_parts", spy)
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    x = torch.randn(64 // objectives, 3, 8)

    def forward() -> Tensor:
        y = layer(torch.tanh(x))
        return torch.stack(
            [y[:, k].pow(2).mean(dim=1) for k in range(3)] + [y.mean(dim=(1, 2))], 1
        )[:, :objectives]

    assert_gramian_exact([layer], forward, 0, rtol=1e-10 if dtype == torch.float64 else 1e-5)
    assert max(parts_used) == 4  # 64 rows: 4 blocks of 16
    if dtype == torch.float64:
        assert_fused_exact([layer], forward, 0, leaves_of([layer]))


@pytest.mark.parametrize("tie", ["k_proj_weight", "out_proj"])
def test_tied_projection_weights(tie: str) -> None:
    """One tensor as two projections' weights (separate projections: ``vdim`` differs): its
    per-sample gradient sums both uses, so the Gramian holds their cross terms (the
    per-projection Gramians missed them: 6e-4 relative error)."""
    torch.manual_seed(0)
    mha = _mha(batch_first=True, vdim=3)
    if tie == "k_proj_weight":
        mha.k_proj_weight = mha.q_proj_weight
    else:
        mha.out_proj.weight = mha.q_proj_weight
    x, v = torch.randn(B, T, E), torch.randn(B, T, 3)

    def forward() -> Tensor:
        return _head(mha(x, x, v))

    assert_gramian_exact([mha], forward, 0)
    assert_fused_exact([mha], forward, 0, leaves_of([mha]))

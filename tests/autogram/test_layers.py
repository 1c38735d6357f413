"""Every supported layer type: the engine's Gramian equals the brute-force one (float64)."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests.autogram._helpers import assert_gramian_exact
from torchjd.autogram import Engine

B = 4
FLOAT32_CASES = {
    "linear_nd", "conv2d_groups_stride", "embedding", "layer_norm", "group_norm",
    "attention_masks", "transformer_encoder_layer", "lstm_proj_state", "gru",
}  # fmt: skip


class Case:
    """A model, its input, and how its output becomes per-sample objectives."""

    def __init__(
        self,
        name: str,
        model: Callable[[], nn.Module],
        x: Callable[[], Tensor],
        head: Callable[[Tensor], Tensor] = lambda y: y.flatten(1).pow(2).mean(1),
        batch_dims: tuple[int | None, ...] = (0, None),
    ) -> None:
        self.name, self.model, self.x, self.head, self.batch_dims = name, model, x, head, batch_dims

    def __repr__(self) -> str:
        return self.name


def first(y: object) -> Tensor:
    return y[0] if isinstance(y, tuple) else y  # type: ignore[return-value]


def seq_first(y: object) -> Tensor:
    return first(y).transpose(0, 1).flatten(1).pow(2).mean(1)


def conv(dim: int, **kwargs: object) -> Callable[[], nn.Module]:
    conv_type = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1]
    return lambda: nn.Sequential(conv_type(4, 6, **kwargs), nn.Tanh(), conv_type(6, 2, 1))


CASES = [
    Case("linear_nd", lambda: nn.Linear(5, 3), lambda: torch.randn(B, 2, 3, 5)),
    Case("linear_no_bias", lambda: nn.Linear(5, 3, bias=False), lambda: torch.randn(B, 5)),
    Case("conv1d", conv(1, kernel_size=3), lambda: torch.randn(B, 4, 9)),
    Case(
        "conv1d_stride_pad_dil",
        conv(1, kernel_size=3, stride=2, padding=2, dilation=2),
        lambda: torch.randn(B, 4, 11),
    ),
    Case(
        "conv1d_same_reflect",
        conv(1, kernel_size=4, padding="same", padding_mode="reflect"),
        lambda: torch.randn(B, 4, 9),
    ),
    Case("conv2d", conv(2, kernel_size=3, padding=1), lambda: torch.randn(B, 4, 5, 6)),
    Case(
        "conv2d_groups_stride",
        conv(2, kernel_size=(2, 3), stride=(2, 1), groups=2, bias=False),
        lambda: torch.randn(B, 4, 6, 5),
    ),
    Case(
        "conv2d_circular",
        conv(2, kernel_size=3, padding=1, padding_mode="circular"),
        lambda: torch.randn(B, 4, 5, 5),
    ),
    Case(
        "conv3d",
        conv(3, kernel_size=2, padding=(1, 0, 1), dilation=(1, 2, 1)),
        lambda: torch.randn(B, 4, 3, 5, 3),
    ),
    Case(
        "embedding",
        lambda: nn.Sequential(nn.Embedding(7, 3, padding_idx=1), nn.Linear(3, 2)),
        lambda: torch.tensor([[0, 1, 2], [2, 2, 6], [1, 1, 1], [5, 0, 2]]),
    ),
    Case(
        "layer_norm",
        lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
        lambda: torch.randn(B, 3, 5),
    ),
    Case(
        "layer_norm_2d_no_bias",
        lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm((3, 6), bias=False)),
        lambda: torch.randn(B, 3, 5),
    ),
    Case(
        "group_norm",
        lambda: nn.Sequential(nn.Conv2d(2, 6, 1), nn.GroupNorm(3, 6), nn.Conv2d(6, 2, 1)),
        lambda: torch.randn(B, 2, 3, 3),
    ),
    Case(
        "instance_norm",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 1), nn.InstanceNorm1d(3, affine=True), nn.Tanh()),
        lambda: torch.randn(B, 2, 5),
    ),
    Case(
        "instance_norm_2d_running_stats",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 1), nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
        ),
        lambda: torch.randn(B, 2, 3, 3),
    ),
    Case("batch_norm_eval", lambda: _eval_batch_norm(), lambda: torch.randn(B, 2, 3, 3)),
    Case(
        "rms_norm",
        lambda: nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Linear(6, 2)),
        lambda: torch.randn(B, 3, 5),
    ),
    Case(
        "multihead_attention",
        lambda: _Attend(nn.MultiheadAttention(8, 2, batch_first=True)),
        lambda: torch.randn(B, 3, 8),
        head=lambda y: y[0].pow(2).mean((1, 2)) + y[1].pow(2).sum((1, 2)),
    ),
    Case(
        "multihead_attention_seq_first_kdim",
        lambda: _SelfAttention(nn.MultiheadAttention(8, 2, kdim=5, vdim=3, add_bias_kv=True)),
        lambda: torch.randn(3, B, 8),
        head=seq_first,
    ),
    Case(
        "transformer_encoder_layer",
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=6, dropout=0.0, batch_first=True),
        lambda: torch.randn(B, 3, 8),
    ),
    Case(
        "transformer_decoder_layer",
        lambda: _Decoder(
            nn.TransformerDecoderLayer(8, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        ),
        lambda: torch.randn(B, 3, 8),
    ),
    Case("rnn", lambda: nn.RNN(3, 4, num_layers=2), lambda: torch.randn(5, B, 3), head=seq_first),
    Case(
        "lstm_batch_first",
        lambda: nn.LSTM(3, 4, batch_first=True, bidirectional=True),
        lambda: torch.randn(B, 5, 3),
        head=lambda y: y[0].pow(2).mean((1, 2)) + y[1][1].pow(2).sum((0, 2)),
    ),
    Case(
        "gru",
        lambda: nn.GRU(3, 4, batch_first=True),
        lambda: torch.randn(B, 5, 3),
        head=lambda y: y[1].pow(2).sum((0, 2)),
    ),
]


def _eval_batch_norm() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Tanh(), nn.BatchNorm2d(3))
    with torch.no_grad():
        model(torch.randn(8, 2, 3, 3))  # non-trivial running statistics
    return model.eval()


class _Attend(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.attention(x, x, x)


class _SelfAttention(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention
        self.keys = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, self.keys(x), x[..., :3], need_weights=False)[0]


class _Decoder(nn.Module):
    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__()
        self.layer = layer
        self.memory = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, self.memory(x.flip(1)))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_layer(case: Case):
    model = case.model()
    x = case.x()
    for batch_dim in case.batch_dims:
        assert_gramian_exact([model], lambda: case.head(model(x)), batch_dim)


class _MaskedAttention(nn.Module):
    """Self-attention with every kind of mask, returning the per-head weights too."""

    def __init__(self, attention: nn.MultiheadAttention, per_head_mask: bool) -> None:
        super().__init__()
        self.attention, self.per_head_mask = attention, per_head_mask

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        padding = torch.zeros(x.shape[0], T, dtype=x.dtype)
        padding[1, -1] = -torch.inf
        mask = torch.randn(T, T, generator=torch.Generator().manual_seed(0)).to(x.dtype)
        if self.per_head_mask:
            mask = mask.expand(x.shape[0] * self.attention.num_heads, T, T)
        y, w = self.attention(
            x, x, x, key_padding_mask=padding, attn_mask=mask, average_attn_weights=False
        )
        return y.pow(2).mean((1, 2)) + w.pow(2).sum((1, 2, 3))


def _mha(**kwargs: object) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(8, 2, **kwargs)  # type: ignore[arg-type]


ATTENTION = [
    Case("attention_masks", lambda: _MaskedAttention(_mha(batch_first=True), False),
         lambda: torch.randn(B, 3, 8), head=lambda y: y),
    Case("attention_per_head_mask", lambda: _MaskedAttention(_mha(batch_first=True), True),
         lambda: torch.randn(B, 3, 8), head=lambda y: y, batch_dims=(0,)),
    Case("attention_bias_kv_zero_attn",
         lambda: _Attend(_mha(batch_first=True, add_bias_kv=True, add_zero_attn=True)),
         lambda: torch.randn(B, 3, 8), head=lambda y: y[0].pow(2).mean((1, 2))),
    Case("attention_dropout", lambda: _Attend(_mha(dropout=0.5, batch_first=True)),
         lambda: torch.randn(B, 3, 8), head=lambda y: y[0].pow(2).mean((1, 2))),
    Case("attention_plain_seq_first_cross", lambda: _Cross(_mha()),
         lambda: torch.randn(3, B, 8), head=seq_first),
    Case("attention_causal_unbatched", lambda: _Causal(_mha()),
         lambda: torch.randn(3, 8), head=lambda y: y.pow(2).sum(1), batch_dims=(None,)),
    Case("transformer_encoder_seq_first_causal",
         lambda: _Causal(nn.TransformerEncoderLayer(8, 2, 6, dropout=0.0, norm_first=True)),
         lambda: torch.randn(3, B, 8), head=seq_first, batch_dims=(None,)),
]  # fmt: skip


class _Cross(nn.Module):
    """Attention of the sequence on a shorter, transformed one, without weights nor masks."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention, self.memory = attention, nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        memory = self.memory(x[:2])
        return self.attention(x, memory, memory, need_weights=False)[0]


class _Causal(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0])
        if isinstance(self.layer, nn.MultiheadAttention):
            return self.layer(x, x, x, attn_mask=mask, is_causal=True)[0]
        return self.layer(x, src_mask=mask, is_causal=True)


@pytest.mark.parametrize("case", ATTENTION, ids=repr)
def test_attention(case: Case):
    test_layer(case)


class _WithState(nn.Module):
    """A recurrent layer given a learnt initial state."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        directions = 2 if rnn.bidirectional else 1
        size = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
        self.h0 = nn.Linear(3, rnn.num_layers * directions * size)
        self.c0 = nn.Parameter(torch.randn(rnn.num_layers * directions, 1, rnn.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        batch_first = self.rnn.batch_first
        first = x[:, 0] if batch_first else x[0]
        h0 = self.h0(first).reshape(
            first.shape[0], self.rnn.num_layers * (1 + self.rnn.bidirectional), -1
        )
        h0 = h0.transpose(0, 1).contiguous()
        if isinstance(self.rnn, nn.LSTM):
            c0 = self.c0.expand(-1, first.shape[0], -1).contiguous()
            out, (h, c) = self.rnn(x, (h0, c0))
            return out, h, c
        out, h = self.rnn(x, h0)
        return out, h


def _state_head(batch_first: bool) -> Callable[[object], Tensor]:
    def head(y: object) -> Tensor:
        out, h = y[0], y[1]  # type: ignore[index]
        out = out if batch_first else out.transpose(0, 1)
        total = out.pow(2).flatten(1).mean(1) + h.pow(2).sum((0, 2))
        if len(y) == 3:  # type: ignore[arg-type]
            total = total + y[2].pow(2).sum((0, 2))  # type: ignore[index]
        return total

    return head


RNNS = [
    Case("lstm_proj_state",
         lambda: _WithState(nn.LSTM(3, 5, num_layers=2, proj_size=2, batch_first=True)),
         lambda: torch.randn(B, 5, 3), head=_state_head(True)),
    Case("gru_bidirectional_seq_first_state",
         lambda: _WithState(nn.GRU(3, 5, num_layers=2, bidirectional=True)),
         lambda: torch.randn(5, B, 3), head=_state_head(False)),
    Case("rnn_relu_no_bias",
         lambda: nn.RNN(3, 4, nonlinearity="relu", bias=False, batch_first=True),
         lambda: torch.randn(B, 5, 3), head=lambda y: y[0].pow(2).mean((1, 2))),
    Case("lstm_dropout_between_layers",
         lambda: nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True),
         lambda: torch.randn(B, 5, 3), head=lambda y: y[0].pow(2).mean((1, 2))),
    Case("gru_unbatched", lambda: nn.GRU(3, 4, bidirectional=True),
         lambda: torch.randn(5, 3), head=lambda y: y[0].pow(2).sum(1), batch_dims=(None,)),
]  # fmt: skip


@pytest.mark.parametrize("case", RNNS, ids=repr)
def test_recurrent(case: Case):
    test_layer(case)


class _Twice(nn.Module):
    """Calls ``layer`` twice: on the input, and on a transformation of its first output."""

    def __init__(self, layer: nn.Module, between: nn.Module) -> None:
        super().__init__()
        self.layer, self.between = layer, between

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x)
        return self.layer(self.between(y)) + y


TWICE = [
    Case("conv_twice", lambda: _Twice(nn.Conv1d(3, 3, 3, padding=1), nn.Tanh()),
         lambda: torch.randn(B, 3, 6)),
    Case("embedding_twice_freq", lambda: _Twice(nn.Embedding(5, 5, scale_grad_by_freq=True),
                                                _ArgMax()),
         lambda: torch.tensor([[0, 1, 1], [2, 2, 2], [4, 1, 0], [3, 3, 1]])),
    Case("layer_norm_twice", lambda: _Twice(nn.LayerNorm(3), nn.Tanh()),
         lambda: torch.randn(B, 2, 3)),
    Case("group_norm_twice", lambda: _Twice(nn.GroupNorm(1, 3), nn.Tanh()),
         lambda: torch.randn(B, 3, 2)),
    Case("rms_norm_eps", lambda: _Twice(nn.RMSNorm((2, 3), eps=0.1), nn.Tanh()),
         lambda: torch.randn(B, 2, 3)),
]  # fmt: skip


class _ArgMax(nn.Module):
    def forward(self, y: Tensor) -> Tensor:
        return y.argmax(dim=-1)


@pytest.mark.parametrize("case", TWICE, ids=repr)
def test_layer_called_twice(case: Case):
    test_layer(case)


def test_unbatched_inputs_without_batch_dim():
    conv = nn.Conv2d(2, 3, 2)
    assert_gramian_exact([conv], lambda: conv(torch.randn(2, 4, 4)).pow(2).sum((1, 2)), None)
    norm = nn.InstanceNorm1d(3, affine=True)
    assert_gramian_exact([norm], lambda: norm(torch.randn(3, 5)).pow(3).sum(1), None)
    embedding = nn.Embedding(4, 2)
    assert_gramian_exact([embedding], lambda: embedding(torch.tensor(2)).exp(), None)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES + ATTENTION + RNNS if c.name in FLOAT32_CASES],
    ids=repr,
)
def test_float32(case: Case):
    model, x = case.model(), case.x()
    batch_dim = case.batch_dims[0]
    expected = assert_gramian_exact([model], lambda: case.head(model(x)), batch_dim)
    model.float()
    x32 = x.float() if x.is_floating_point() else x
    with Engine(model, batch_dim=batch_dim) as engine:
        G = engine.compute_gramian(case.head(model(x32)))
    assert G.dtype == torch.float32
    assert (G.double() - expected).abs().max() <= 1e-5 * expected.abs().max()

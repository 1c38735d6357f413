"""Fixes from the review of the thirteenth session: a random state recorded for subclasses of
``MultiheadAttention`` and the recurrent layers whose own forward draws random numbers (their
re-run must replay it), and no statistics from the forward of a ``LayerNorm`` in half precision
(their rounding would cost accuracy that torch's layer norm keeps)."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from torchjd.autogram import Engine


def _gramian_and_reference(module: nn.Module, losses, batch_dim: int | None):
    """The engine's Gramian of ``losses()`` and ``J Jᵀ`` from one ``autograd.grad`` per loss, both
    after the same seed (the same dropout masks)."""
    with Engine(module, batch_dim=batch_dim) as engine:
        torch.manual_seed(7)
        G = engine.compute_gramian(losses())
    torch.manual_seed(7)
    out = losses()
    params = [p for p in module.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(o, params, retain_graph=True) for o in out]
    J = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    return G, J @ J.T


class _NoisyGRU(nn.GRU):
    """A GRU that drops some of its packed outputs itself (``self.dropout`` is 0)."""

    def forward(self, input, hx=None):
        out, h = super().forward(input, hx)
        data = F.dropout(out.data, 0.5, self.training)
        return PackedSequence(data, out.batch_sizes, out.sorted_indices, out.unsorted_indices), h


class _NoisyAttention(nn.MultiheadAttention):
    """An attention that drops some of its outputs itself (``self.dropout`` is 0)."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        out, weights = super().forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal,
        )  # fmt: skip
        return F.dropout(out, 0.5, self.training), weights


def test_recurrent_subclass_with_its_own_dropout():
    torch.manual_seed(0)
    gru = _NoisyGRU(3, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 5, 4, 3, 2])

    def losses() -> Tensor:
        out, _ = gru(pack_padded_sequence(x, lengths, batch_first=True))
        return pad_packed_sequence(out, batch_first=True)[0].sum(dim=(1, 2))

    G, expected = _gramian_and_reference(gru, losses, None)
    assert torch.allclose(G, expected, rtol=1e-10, atol=1e-10 * expected.abs().max())


def test_attention_subclass_with_its_own_dropout():
    torch.manual_seed(0)
    attention = _NoisyAttention(8, 2, batch_first=True, add_bias_kv=True, dtype=torch.float64)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    mask = torch.randn(8, 5, 5, dtype=torch.float64)  # per head: the re-running path

    def losses() -> Tensor:
        return attention(x, x, x, attn_mask=mask, need_weights=False)[0].sum(dim=(1, 2))

    G, expected = _gramian_and_reference(attention, losses, 0)
    assert torch.allclose(G, expected, rtol=1e-10, atol=1e-10 * expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_norm_is_normalised_afresh(dtype: torch.dtype):
    """In half precision, the Gramian of a LayerNorm's weight is as accurate as from torch's layer
    norm (the forward's rounded statistics are not used): against float64 on the same rounded
    inputs, within the error of that path, far below the statistics' (about 10x larger here)."""
    torch.manual_seed(0)
    x = (20 + 0.3 * torch.randn(6, 5, 32)).to(dtype)
    weight, target = torch.rand(32) + 0.5, torch.randn(6, 5, 32).to(dtype)
    errors = []
    for work in (dtype, torch.float64):
        norm = nn.LayerNorm(32, dtype=work)
        with torch.no_grad():
            norm.weight.copy_(weight)
        norm.bias.requires_grad_(False)
        with Engine(norm, batch_dim=0) as engine:
            errors.append(engine.compute_gramian((norm(x.to(work)) * target.to(work)).sum((1, 2))))
    G, expected = errors[0].double(), errors[1]
    relative = ((G - expected).norm() / expected.norm()).item()
    # torch's layer norm in this dtype: ~3e-3 (bfloat16), ~3e-4 (float16); the statistics' path
    # gave 3.5e-2 and 7.6e-3
    assert relative < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_fused_step_on_an_empty_batch(batch_dim: int | None):
    """An empty batch: the fused step gives empty weights and zero gradients, as the two-pass step
    ``losses.backward(weights)`` does (it used to fail reshaping the weights)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with Engine(model, batch_dim=batch_dim) as engine:
        weights = engine.backward(model(torch.randn(0, 6)).sum(dim=1), lambda G: G.sum(dim=0))
    assert weights.shape == (0,)
    for param in model.parameters():
        assert param.grad is not None
        assert torch.equal(param.grad, torch.zeros_like(param))

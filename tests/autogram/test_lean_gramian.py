"""The lean path of a linear map's Gramian (``add_lean_gramian``: one objective per sample, the
blocks' Gramians by oneDNN, the bias folded in as a column of ones) vs brute force."""

import pytest
import torch
from torch import nn

import torchjd.autogram._rules._graph_linear as graph_linear_module
import torchjd.autogram._rules._linear as linear_module
from torchjd.autogram import Engine
from torchjd.autogram._onednn import onednn_linear
from torchjd.autogram._rules._linear import add_lean_gramian, lean_applies, symmetric
from torchjd.autogram._workspace import Workspaces

needs_onednn = pytest.mark.skipif(onednn_linear() is None, reason="oneDNN's product unavailable")


def reference(X: torch.Tensor, Gamma: torch.Tensor, bias: bool) -> torch.Tensor:
    """In float64, the Gramian of the rows of the samples: the weight's gradient, then the
    bias's."""
    X, Gamma = X.double(), Gamma.double()
    rows = []
    for i in range(X.shape[0]):
        weight = Gamma[i, 0].T @ X[i]
        rows.append(
            torch.cat([weight.flatten(), Gamma[i, 0].sum(dim=0)] if bias else [weight.flatten()])
        )
    J = torch.stack(rows)
    return J @ J.T


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize("features", [2, 4])
def test_lean_gramian_exact(monkeypatch, bias, adjacent, features):
    """Several blocks of ``features`` features (the last one narrower; 2: fewer than half the
    inputs' columns, formed as ``Γᵢᵀ [Xᵢ 1]``, 4: transposed), positions adjacent or ``B`` rows
    apart (an attention's projections), accumulated into a given Gramian; exactly symmetric."""
    B, T, d_in, d_out = 6, 7, 5, 11
    monkeypatch.setattr(linear_module, "MIN_BLOCK_FEATURES", 1)
    monkeypatch.setattr(linear_module, "ONEDNN_BLOCK_BYTES", features * B * d_in * 4)
    formed = []
    bmm = torch.bmm
    monkeypatch.setattr(
        torch, "bmm", lambda a, b, **kw: formed.append(b.shape[-1]) or bmm(a, b, **kw)
    )
    if adjacent:
        X = torch.randn(B, T, d_in, dtype=torch.float32)
        Gamma = torch.randn(B, 1, T, d_out, dtype=torch.float32)
    else:
        X = torch.randn(T, B, d_in, dtype=torch.float32).transpose(0, 1)
        Gamma = torch.randn(1, T, B, d_out, dtype=torch.float32).permute(2, 0, 1, 3)
    start = torch.randn(B * 1, B, dtype=torch.float32)
    start = start @ start.T
    G = symmetric(add_lean_gramian(start.clone(), X, Gamma, bias))
    torch.testing.assert_close(
        G.double(), start.double() + reference(X, Gamma, bias), rtol=1e-4, atol=1e-3
    )
    assert torch.equal(G, G.T)
    alone = add_lean_gramian(None, X, Gamma, bias)
    torch.testing.assert_close(
        symmetric(alone).double(), reference(X, Gamma, bias), rtol=1e-4, atol=1e-3
    )
    width = d_in + 1 if bias else d_in
    blocks = [features, features, 3] if features == 4 else [features] * 5 + [1]
    assert formed == 2 * (blocks if features == 4 else [width] * len(blocks))


@needs_onednn
def test_lean_applies():
    """Only for one objective per sample, several positions, up to 64 samples, a step that keeps
    nothing, float32 blocks large enough for oneDNN, where the per-objective gradients are the
    cheaper path."""
    B, T, d_in, d_out = 32, 32, 128, 128
    X = torch.randn(B, T, d_in, dtype=torch.float32)
    Gamma = torch.randn(B, 1, T, d_out, dtype=torch.float32)
    with Workspaces().active(fused=False):
        assert lean_applies(X, Gamma)
        assert not lean_applies(X, torch.randn(B, 2, T, d_out, dtype=torch.float32))  # R = 2
        assert not lean_applies(X[:, :1], Gamma[:, :, :1])  # one position
        assert not lean_applies(X.double(), Gamma.double())
        assert not lean_applies(X[:, :, :4], Gamma[..., :4])  # small blocks
        assert not lean_applies(
            torch.randn(65, T, d_in, dtype=torch.float32),
            torch.randn(65, 1, T, d_out, dtype=torch.float32),
        )
    with Workspaces().active(fused=True):  # the per-objective gradients kept
        assert not lean_applies(X, Gamma)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            64, 2, dim_feedforward=256, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


@needs_onednn
def test_encoder_gramian(monkeypatch):
    """A Transformer encoder layer in float32 (the lean path for its attention's input projection
    and its feed-forward layers, the former path for the output projection, whose blocks are too
    small for oneDNN) vs the Gramian of per-sample gradients by autograd, in float64."""
    lean = []
    for module in (linear_module, graph_linear_module):
        monkeypatch.setattr(
            module, "add_lean_gramian", lambda *args, f=add_lean_gramian: lean.append(1) or f(*args)
        )
    torch.manual_seed(0)
    B, T = 16, 16
    model = Encoder().float()
    x = torch.randn(B, T, 64, dtype=torch.float32)
    engine = Engine(model, batch_dim=0)
    G = engine.compute_gramian(model(x).pow(2).sum(dim=1))
    assert len(lean) == 3  # in_proj, linear1, linear2
    reference_model = Encoder().double()
    reference_model.load_state_dict(model.state_dict())
    params = list(reference_model.parameters())
    rows = []
    for i in range(B):
        loss = reference_model(x[i : i + 1].double()).pow(2).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    J = torch.stack(rows)
    expected = J @ J.T
    torch.testing.assert_close(
        G.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
    )


@pytest.mark.parametrize("fused", [False, True])
def test_layer_norm_lean_path(monkeypatch, fused):
    """A LayerNorm over the last dimension of ``[B, T, C]`` inputs (one objective per sample):
    the rule's lean path gives the Gramian of per-sample gradients by autograd, and in a fused
    step the gradients of the weighted objectives."""
    import torchjd.autogram._rules._norm as norm_module

    taken = []
    lean = norm_module._lean_layer_norm_gramian

    def spy(module, calls):
        result = lean(module, calls)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(norm_module, "_lean_layer_norm_gramian", spy)
    torch.manual_seed(0)
    B, T = 5, 3
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1.0, 1.0)
    x = torch.randn(B, T, 4)
    params = list(model.parameters())
    rows = []
    for i in range(B):
        loss = model(x[i : i + 1]).pow(2).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    J = torch.stack(rows)
    engine = Engine(model, batch_dim=0)
    losses = model(x).pow(2).sum(dim=(1, 2))
    if not fused:
        G = engine.compute_gramian(losses)
        torch.testing.assert_close(G, J @ J.T)
    else:
        weights = torch.linspace(0.5, 1.5, B)
        engine.backward(losses, lambda gramian: weights)
        grads = torch.cat([p.grad.flatten() for p in params])
        torch.testing.assert_close(grads, weights @ J)
    assert taken == [True]

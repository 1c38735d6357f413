"""The seed's claim: IWRM with the engine and UPGradWeighting gives the same parameters as
aggregating the per-sample Jacobian with UPGrad (here formed by brute force), step after step."""

import torch
from torch import nn

from tests.reference.jacobians import brute_force_jacobian
from torchjd.aggregation import UPGrad, UPGradWeighting
from torchjd.autogram import Engine


def train(use_engine: bool, X: torch.Tensor, Y: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))
    loss_fn = nn.MSELoss(reduction="none")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(model, batch_dim=0) if use_engine else None
    weighting, aggregator = UPGradWeighting(), UPGrad()
    params = list(model.parameters())
    for x, y in zip(X, Y, strict=True):
        losses = loss_fn(model(x).squeeze(dim=1), y)
        if engine is not None:
            losses.backward(weighting(engine.compute_gramian(losses)))
        else:
            update = aggregator(brute_force_jacobian(losses, params))
            offset = 0
            for p in params:
                p.grad = update[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in params]


def test_iwrm_engine_matches_jacobian_aggregation():
    X, Y = torch.randn(8, 16, 10), torch.randn(8, 16)
    with_engine, with_jacobian = train(True, X, Y), train(False, X, Y)
    for a, b in zip(with_engine, with_jacobian, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    initial = train(True, X[:0], Y[:0])
    assert any(not torch.allclose(a, b) for a, b in zip(with_engine, initial, strict=True))

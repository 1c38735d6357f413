"""The partial Jacobian descent seed example: the Gramian w.r.t. the last two Linear layers only.

The conflicts between the per-sample losses are resolved from a part of the Jacobian (the
parameters of ``model[2:]``), while ``losses.backward(weights)`` still trains the whole model.
Run: ``python examples/partial_jd.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

X = torch.randn(8, 16, 10)
Y = torch.randn(8, 16)

model = Sequential(Linear(10, 8), ReLU(), Linear(8, 5), ReLU(), Linear(5, 1))
loss_fn = MSELoss(reduction="none")

weighting = UPGradWeighting()

# Create the autogram engine that will compute the Gramian of the
# Jacobian with respect to the two last Linear layers' parameters.
engine = Engine(model[2:], batch_dim=0)

params = model.parameters()
optimizer = SGD(params, lr=0.1)

for x, y in zip(X, Y):
    y_hat = model(x).squeeze(dim=1)  # shape: [16]
    losses = loss_fn(y_hat, y)  # shape: [16]
    gramian = engine.compute_gramian(losses)
    weights = weighting(gramian)
    losses.backward(weights)
    optimizer.step()
    optimizer.zero_grad()

print(f"mean loss on the last batch: {losses.mean().item():.4f}")

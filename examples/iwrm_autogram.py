"""The IWRM seed example, tab "autogram": instance-wise risk minimisation with the autogram engine.

Each step weights the per-sample losses by ``UPGradWeighting`` applied to the Gramian of their
Jacobian, computed by the engine without forming the Jacobian. Run:
``python examples/iwrm_autogram.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

X = torch.randn(8, 16, 10)
Y = torch.randn(8, 16)

model = Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
loss_fn = MSELoss(reduction="none")

params = model.parameters()
optimizer = SGD(params, lr=0.1)
weighting = UPGradWeighting()
engine = Engine(model, batch_dim=0)

for x, y in zip(X, Y):
    y_hat = model(x).squeeze(dim=1)  # shape: [16]
    losses = loss_fn(y_hat, y)  # shape: [16]
    gramian = engine.compute_gramian(losses)  # shape: [16, 16]
    weights = weighting(gramian)  # shape: [16]
    losses.backward(weights)
    optimizer.step()
    optimizer.zero_grad()

print(f"mean loss on the last batch: {losses.mean().item():.4f}")

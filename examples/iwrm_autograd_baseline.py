"""The baseline of the IWRM seed example (tab "autograd"): empirical risk minimisation with SGD.

Each step minimises the *mean* loss of the batch, so it may increase the loss of some samples.
Run: ``python examples/iwrm_autograd_baseline.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

X = torch.randn(8, 16, 10)
Y = torch.randn(8, 16)

model = Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
loss_fn = MSELoss()

params = model.parameters()
optimizer = SGD(params, lr=0.1)

for x, y in zip(X, Y):
    y_hat = model(x).squeeze(dim=1)  # shape: [16]
    loss = loss_fn(y_hat, y)  # shape: [] (scalar)
    loss.backward()

    optimizer.step()
    optimizer.zero_grad()

print(f"final loss on the last batch: {loss.item():.4f}")

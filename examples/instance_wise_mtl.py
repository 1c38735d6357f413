"""Instance-wise multi-task learning: one objective per (sample, task) pair, through autogram.

The losses form a matrix ``[batch, tasks]``. The engine's Gramian is ``[m, m]`` with
``m = batch * tasks`` (its rows follow the losses in row-major order), so the weights given by
``UPGradWeighting`` have ``m`` entries: reshaped to ``[batch, tasks]``, they weight the losses in
``losses.backward(weights)``. Run: ``python examples/instance_wise_mtl.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

X = torch.randn(8, 8, 10)
Y = torch.stack([X[..., :3].sum(dim=-1), X[..., 3:6].sum(dim=-1) - X[..., 0]], dim=-1)  # 2 tasks

model = Sequential(Linear(10, 16), ReLU(), Linear(16, 2))  # one output per task
loss_fn = MSELoss(reduction="none")
optimizer = SGD(model.parameters(), lr=0.05)
weighting = UPGradWeighting()
engine = Engine(model, batch_dim=0)

history = []
for epoch in range(4):
    for x, y in zip(X, Y):
        losses = loss_fn(model(x), y)  # shape: [8, 2]
        gramian = engine.compute_gramian(losses)  # shape: [16, 16]
        weights = weighting(gramian).reshape(losses.shape)  # shape: [8, 2]
        losses.backward(weights)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        history.append(loss_fn(model(X), Y).mean(dim=(0, 1)))  # mean loss of each task
    print(f"epoch {epoch}: mean loss of each task {history[-1]}")

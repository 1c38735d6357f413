"""Multi-task learning with ``mtl_backward`` and UPGrad.

A shared trunk feeds two regression heads. ``mtl_backward`` gives each head the gradient of its
own loss, and the trunk the Jacobian of both losses (in ``.jac``); ``jac_to_grad`` aggregates it
with UPGrad into a step of the trunk that conflicts with neither task.
Run: ``python examples/mtl.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward

X = torch.randn(16, 10)
Y1 = X[:, :3].sum(dim=1, keepdim=True)  # two related targets
Y2 = X[:, 2:5].sum(dim=1, keepdim=True) - X[:, 0:1]

shared = Sequential(Linear(10, 16), ReLU(), Linear(16, 8), ReLU())
task1, task2 = Linear(8, 1), Linear(8, 1)
params = [*shared.parameters(), *task1.parameters(), *task2.parameters()]
optimizer = SGD(params, lr=0.05)
loss_fn = MSELoss()
aggregator = UPGrad()

history = []
for step in range(40):
    features = shared(X)
    loss1 = loss_fn(task1(features), Y1)
    loss2 = loss_fn(task2(features), Y2)
    mtl_backward([loss1, loss2], features=features)
    weights = jac_to_grad(shared.parameters(), aggregator)
    optimizer.step()
    optimizer.zero_grad()
    history.append((loss1.item(), loss2.item()))
    if step % 10 == 0:
        print(f"step {step:2d}: losses {loss1.item():.4f}, {loss2.item():.4f}, weights {weights}")

print(f"first losses: {history[0][0]:.4f}, {history[0][1]:.4f}")
print(f"last losses:  {history[-1][0]:.4f}, {history[-1][1]:.4f}")

"""The IWRM seed example (tab "autojac"): instance-wise risk minimisation with UPGrad.

Each sample's loss is one objective; ``backward`` fills the ``.jac`` fields with their Jacobian and
``jac_to_grad`` aggregates it with UPGrad into a step that (locally) increases no loss of the batch.
Run: ``python examples/iwrm_autojac.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad

X = torch.randn(8, 16, 10)
Y = torch.randn(8, 16)

model = Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
loss_fn = MSELoss(reduction="none")

params = model.parameters()
optimizer = SGD(params, lr=0.1)
aggregator = UPGrad()


for x, y in zip(X, Y):
    y_hat = model(x).squeeze(dim=1)  # shape: [16]
    losses = loss_fn(y_hat, y)  # shape: [16]
    backward(losses)
    jac_to_grad(model.parameters(), aggregator)

    optimizer.step()
    optimizer.zero_grad()

print(f"mean loss on the last batch: {losses.mean().item():.4f}")
with torch.no_grad():
    print(
        f"mean loss on all the data after training: {loss_fn(model(X).squeeze(-1), Y).mean():.4f}"
    )

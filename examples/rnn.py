"""Instance-wise risk minimisation of a recurrent network with autojac.

Each sequence's loss is one objective. The recurrent kernels of ``torch.nn.RNN`` do not go
through :func:`torch.vmap`, so ``backward`` computes the rows of the Jacobian one at a time with
``parallel_chunk_size=1``. Run: ``python examples/rnn.py``.
"""

import torch
from torch.nn import RNN, Linear, MSELoss
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad

X = torch.randn(6, 8, 5, 3)  # 6 batches of 8 sequences of length 5 with 3 features
Y = X.sum(dim=(2, 3)) / 4  # the target of each sequence: the scaled sum of its inputs

rnn = RNN(input_size=3, hidden_size=12, batch_first=True)
head = Linear(12, 1)
params = [*rnn.parameters(), *head.parameters()]
optimizer = SGD(params, lr=0.05)
loss_fn = MSELoss(reduction="none")
aggregator = UPGrad()


def predict(x):
    output, _ = rnn(x)  # [batch, length, hidden]
    return head(output[:, -1]).squeeze(dim=1)  # from the last hidden state


with torch.no_grad():
    initial_loss = loss_fn(predict(X.flatten(0, 1)), Y.flatten()).mean()
for _epoch in range(4):
    for x, y in zip(X, Y):
        losses = loss_fn(predict(x), y)  # shape: [8]
        backward(losses, parallel_chunk_size=1)
        weights = jac_to_grad(params, aggregator)  # shape: [8]
        optimizer.step()
        optimizer.zero_grad()
with torch.no_grad():
    final_loss = loss_fn(predict(X.flatten(0, 1)), Y.flatten()).mean()
print(f"mean loss: {initial_loss:.4f} before training, {final_loss:.4f} after")

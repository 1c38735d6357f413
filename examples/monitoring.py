"""Monitoring Jacobian descent: the cosine similarity between the update and each gradient.

Aggregators are ``torch.nn.Module``\\ s, so a forward hook sees each call's input (the Jacobian
``J``, one gradient per row) and output (the update ``A(J)``). A negative cosine would mean that
the update conflicts with that objective's gradient: UPGrad in its exact mode never does, whereas
the mean gradient (computed in the hook for comparison) often conflicts with some sample. (With
its published defaults, UPGrad regularises the Gramian, which can leave a small conflict with a
gradient of tiny norm; monitoring like this shows it.)
Run: ``python examples/monitoring.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.nn.functional import cosine_similarity
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad
from torchjd.linalg import TorchProjector

X = torch.randn(8, 16, 10)
Y = torch.randn(8, 16)

model = Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
loss_fn = MSELoss(reduction="none")
optimizer = SGD(model.parameters(), lr=0.1)
aggregator = UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))  # exact mode

cosines = []  # per step: the cosine between the update and each row of the Jacobian
mean_cosines = []  # the same for the mean of the rows


def record_cosines(_module, inputs, update):
    jacobian = inputs[0]  # [16, n]: one gradient per loss
    cosines.append(cosine_similarity(jacobian, update.unsqueeze(0), dim=1))
    mean_cosines.append(cosine_similarity(jacobian, jacobian.mean(dim=0, keepdim=True), dim=1))


handle = aggregator.register_forward_hook(record_cosines)
for x, y in zip(X, Y):
    losses = loss_fn(model(x).squeeze(dim=1), y)  # shape: [16]
    backward(losses)
    jac_to_grad(model.parameters(), aggregator)
    optimizer.step()
    optimizer.zero_grad()
    print(
        f"smallest cosine with a gradient: UPGrad {cosines[-1].min():+.4f}, "
        f"mean {mean_cosines[-1].min():+.4f}"
    )
handle.remove()

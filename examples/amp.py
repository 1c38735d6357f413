"""Automatic mixed precision with autojac: ``torch.autocast`` and a ``GradScaler``.

On CPU, autocast runs the linear layers in bfloat16 (on CUDA, use ``device_type="cuda"`` and
``dtype=torch.float16``, where the scaler is what keeps small gradients from underflowing). The
scaler multiplies the losses by its scale ``s`` before ``backward``, so the Jacobian in the
``.jac`` fields is ``s J``. UPGrad is positively homogeneous (``A(s J) = s A(J)``: its weights
depend on the Gramian normalised by its trace), so ``jac_to_grad`` leaves ``s A(J)`` in ``.grad``,
which ``scaler.step`` unscales (and skips, lowering ``s``, if it holds an inf or a NaN) exactly as
with ordinary gradients. With an aggregator that is not homogeneous, divide the ``.jac`` fields
by ``scaler.get_scale()`` before ``jac_to_grad`` instead. Run: ``python examples/amp.py``.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.bfloat16

X = torch.randn(8, 16, 10, device=device)
Y = X[..., :4].sum(dim=-1)

model = Sequential(Linear(10, 32), ReLU(), Linear(32, 1)).to(device)
loss_fn = MSELoss(reduction="none")
optimizer = SGD(model.parameters(), lr=0.03)
aggregator = UPGrad()
scaler = torch.amp.GradScaler(device, init_scale=2.0**10)

history = []
for epoch in range(4):
    for x, y in zip(X, Y):
        with torch.autocast(device_type=device, dtype=dtype):
            output = model(x).squeeze(dim=1)  # in bfloat16 (float16 on CUDA)
        losses = loss_fn(output.float(), y)  # the losses in float32, shape: [16]
        backward(scaler.scale(losses))  # .jac holds s J
        jac_to_grad(model.parameters(), aggregator)  # .grad holds s UPGrad(J)
        scaler.step(optimizer)  # unscales .grad, then steps (or skips on inf / NaN)
        scaler.update()
        optimizer.zero_grad()
    with torch.no_grad():
        history.append(loss_fn(model(X).squeeze(-1), Y).mean())
    print(f"epoch {epoch}: mean loss {history[-1]:.4f}, scale {scaler.get_scale():.0f}")
print(f"autocast output dtype: {output.dtype}")

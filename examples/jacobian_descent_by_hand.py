"""Jacobian descent with nothing but an aggregator: per-sample gradients from ``torch.func``,
aggregated into one update.

Run: ``python examples/jacobian_descent_by_hand.py``. At each step it prints the smallest cosine
between the candidate updates and the per-sample gradients:

- the mean gradient (ERM) conflicts with some samples at every step;
- ``UPGrad()`` (published defaults: Gramian normalised by its trace, plus 1e-4 on its diagonal)
  conflicts much less, but not never: the regularisation lets it conflict with samples whose
  gradient is small;
- ``UPGrad`` with the unregularised projector never conflicts (cosines ≥ 0 up to rounding).

The model is trained with the last one.
"""

import torch
from torch.func import functional_call, grad, vmap
from torch.nn import Linear, MSELoss, ReLU, Sequential

from torchjd.aggregation import Mean, UPGrad
from torchjd.linalg import TorchProjector

torch.manual_seed(0)
X = torch.randn(8, 16, 10)
Y = torch.randn(8, 16)

model = Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
loss_fn = MSELoss()
aggregators = {
    "Mean": Mean(),
    "UPGrad (defaults)": UPGrad(),
    "UPGrad (exact)": UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0)),
}
names = [name for name, _ in model.named_parameters()]


def per_sample_loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y_hat = functional_call(model, params, (x.unsqueeze(0),)).squeeze()
    return loss_fn(y_hat, y)


min_cosines: dict[str, list[float]] = {label: [] for label in aggregators}
for x, y in zip(X, Y):
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = vmap(grad(per_sample_loss), in_dims=(None, 0, 0))(params, x, y)
    J = torch.cat([grads[name].flatten(start_dim=1) for name in names], dim=1)  # [16, n]

    updates = {label: aggregator(J) for label, aggregator in aggregators.items()}
    for label, update in updates.items():
        cosines = (J @ update) / (J.norm(dim=1) * update.norm()).clamp_min(1e-12)
        min_cosines[label].append(cosines.min().item())

    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            step = updates["UPGrad (exact)"][offset : offset + p.numel()]
            p -= 0.1 * step.view_as(p)
            offset += p.numel()

print("smallest cosine(update, per-sample gradient), step by step:")
for label, values in min_cosines.items():
    print(f"{label:>18}: " + " ".join(f"{v:+.3f}" for v in values))

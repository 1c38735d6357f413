"""The training methods that the demo compares, each as a model and one step on a batch.

A step returns the objectives of the batch before the update (detached): the per-sample losses
for the instance-wise part, the per-task losses for the multi-task part. The runner evaluates
them again after the update to count the steps in which one of them increased.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from torchjd._demo._data import N_CLASSES, Split
from torchjd.aggregation import Aggregator, UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autojac import backward, jac_to_grad, mtl_backward

N_FEATURES = 64
HIDDEN = 64


class Method:
    """A model, its optimiser, and how one step on a batch ``(x, y)`` updates it."""

    name: str
    model: nn.Module

    def __init__(self, lr: float) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)

    def objectives(self, x: Tensor, y: Tensor) -> Tensor:
        """The objectives of the batch (per sample or per task), with the graph."""
        raise NotImplementedError

    def backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Fills the ``.grad`` fields; returns the objectives of the batch (detached)."""
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One update; returns the objectives of the batch before it."""
        objectives = self.backward(x, y)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return objectives

    def per_sample_losses(self, split: Split) -> Tensor:
        """``[n]``: each sample's loss (summed over the tasks in the multi-task part)."""
        raise NotImplementedError

    def accuracies(self, split: Split) -> list[Tensor]:
        """The accuracy of each task (one for the instance-wise part)."""
        raise NotImplementedError


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(N_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


class _InstanceWise(Method):
    def __init__(self, lr: float) -> None:
        self.model = _mlp()
        super().__init__(lr)

    def objectives(self, x: Tensor, y: Tensor) -> Tensor:
        return cross_entropy(self.model(x), y, reduction="none")

    def per_sample_losses(self, split: Split) -> Tensor:
        return cross_entropy(self.model(split.x), split.y, reduction="none")

    def accuracies(self, split: Split) -> list[Tensor]:
        return [(self.model(split.x).argmax(dim=1) == split.y).float().mean()]


class ERM(_InstanceWise):
    """Empirical risk minimisation: SGD on the mean loss of the batch."""

    name = "ERM + SGD"

    def backward(self, x: Tensor, y: Tensor) -> Tensor:
        losses = self.objectives(x, y)
        losses.mean().backward()
        return losses.detach()


class IWRMAutojac(_InstanceWise):
    """Instance-wise risk minimisation: the Jacobian of the per-sample losses, aggregated by
    UPGrad (``backward`` + ``jac_to_grad``)."""

    name = "IWRM, autojac + UPGrad"

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.aggregator = UPGrad()

    def backward(self, x: Tensor, y: Tensor) -> Tensor:
        losses = self.objectives(x, y)
        backward(losses)
        jac_to_grad(self.model.parameters(), self.aggregator)
        return losses.detach()


class IWRMAutogram(_InstanceWise):
    """The same step as :class:`IWRMAutojac`, from the Gramian computed by the autogram engine:
    the per-sample losses weighted by ``UPGradWeighting(G)``."""

    name = "IWRM, autogram + UPGradWeighting"

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.weighting = UPGradWeighting()
        self.engine = Engine(self.model, batch_dim=0)

    def backward(self, x: Tensor, y: Tensor) -> Tensor:
        losses = self.objectives(x, y)
        gramian = self.engine.compute_gramian(losses)
        losses.backward(self.weighting(gramian))
        return losses.detach()


class MultiTask(Method):
    """A shared trunk and one head per task, trained with ``mtl_backward`` + ``jac_to_grad``."""

    def __init__(self, name: str, aggregator: Aggregator, lr: float) -> None:
        self.name = name
        self.aggregator = aggregator
        self.trunk = nn.Sequential(
            nn.Linear(N_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, k) for k in N_CLASSES)
        self.model = nn.ModuleDict({"trunk": self.trunk, "heads": self.heads})
        super().__init__(lr)

    def _per_task_per_sample(self, x: Tensor, targets: tuple[Tensor, ...]) -> Tensor:
        features = self.trunk(x)
        return torch.stack(
            [
                cross_entropy(h(features), t, reduction="none")
                for h, t in zip(self.heads, targets, strict=True)
            ]
        )  # [tasks, n]

    def _losses(self, features: Tensor, y: Tensor) -> Tensor:
        """``[tasks]``: the mean loss of each task on the batch."""
        targets = Split(features, y).targets()
        return torch.stack(
            [cross_entropy(h(features), t) for h, t in zip(self.heads, targets, strict=True)]
        )

    def objectives(self, x: Tensor, y: Tensor) -> Tensor:
        return self._losses(self.trunk(x), y)

    def backward(self, x: Tensor, y: Tensor) -> Tensor:
        features = self.trunk(x)
        losses = self._losses(features, y)
        record_losses = getattr(self.aggregator, "record_losses", None)
        if callable(record_losses):  # aggregators that use the losses too, such as GradNorm
            record_losses(losses.detach())
        mtl_backward(list(losses.unbind()), features=features)
        jac_to_grad(self.trunk.parameters(), self.aggregator)
        return losses.detach()

    def per_sample_losses(self, split: Split) -> Tensor:
        return self._per_task_per_sample(split.x, split.targets()).sum(dim=0)

    def task_losses(self, split: Split) -> Tensor:
        """``[tasks]``: the mean loss of each task."""
        return self._per_task_per_sample(split.x, split.targets()).mean(dim=1)

    def accuracies(self, split: Split) -> list[Tensor]:
        features = self.trunk(split.x)
        return [
            (h(features).argmax(dim=1) == t).float().mean()
            for h, t in zip(self.heads, split.targets(), strict=True)
        ]


INSTANCE_WISE: tuple[Callable[[float], Method], ...] = (ERM, IWRMAutojac, IWRMAutogram)

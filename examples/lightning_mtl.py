"""Multi-task learning with ``mtl_backward`` and UPGrad in PyTorch Lightning.

A ``LightningModule`` with manual optimisation: a shared trunk feeds two regression heads.
``mtl_backward`` gives each head the gradient of its own loss and the trunk the Jacobian of both
losses (in ``.jac``); ``jac_to_grad`` aggregates it with UPGrad into the trunk's ``.grad``, then
the optimiser steps. ``mtl_backward`` replaces ``self.manual_backward``, so it does not go through
Lightning's precision plugin: under ``precision="16-mixed"``, whose gradient scaler divides the
gradients by its scale in ``optimizer.step()``, the step scales the losses with that scaler itself
(UPGrad's update scales with the Jacobian), as ``manual_backward`` would.
Run (after ``pip install lightning``): ``python examples/lightning_mtl.py``.
"""

import torch
from lightning import LightningModule, Trainer
from torch import Tensor
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset

from torchjd.aggregation import UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward


class MTLModule(LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.shared = Sequential(Linear(10, 16), ReLU(), Linear(16, 8), ReLU())
        self.task1, self.task2 = Linear(8, 1), Linear(8, 1)
        self.loss_fn = MSELoss()
        self.aggregator = UPGrad()
        self.history: list[tuple[float, float]] = []  # the task losses of every step

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y1, y2 = batch
        optimizer = self.optimizers()
        features = self.shared(x)
        loss1 = self.loss_fn(self.task1(features).squeeze(dim=1), y1)
        loss2 = self.loss_fn(self.task2(features).squeeze(dim=1), y2)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # "16-mixed" only
        losses = [loss1, loss2] if scaler is None else [scaler.scale(loss1), scaler.scale(loss2)]
        mtl_backward(losses, features=features)
        jac_to_grad(self.shared.parameters(), self.aggregator)
        optimizer.step()
        optimizer.zero_grad()
        self.history.append((loss1.item(), loss2.item()))

    def configure_optimizers(self) -> SGD:
        return SGD(self.parameters(), lr=self.hparams.lr)


def make_data(seed: int = 0) -> TensorDataset:
    """64 samples of two related targets."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 10, generator=generator)
    Y1 = X[:, :3].sum(dim=1)
    Y2 = X[:, 2:5].sum(dim=1) - X[:, 0]
    return TensorDataset(X, Y1, Y2)


if __name__ == "__main__":
    torch.manual_seed(0)
    dataset = make_data()
    module = MTLModule()
    trainer = Trainer(max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(dataset, batch_size=16))  # no shuffling: reproducible steps
    first, last = module.history[0], module.history[-1]
    print(f"first losses: {first[0]:.4f}, {first[1]:.4f}")
    print(f"last losses:  {last[0]:.4f}, {last[1]:.4f}")

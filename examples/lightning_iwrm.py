"""Instance-wise risk minimisation (IWRM) with the autogram engine in PyTorch Lightning.

A ``LightningModule`` with manual optimisation (``self.automatic_optimization = False``): each
training step weights the per-sample losses by ``UPGradWeighting`` applied to the Gramian that
the engine computes, then ``self.manual_backward(losses, weights)`` (Lightning's backward, so its
precision plugin applies) or, with ``fused=True``, the fused step ``engine.backward(losses,
weighting)``, which computes the Gramian, the weights and the gradients in one go (it bypasses
Lightning's ``manual_backward``, so under ``precision="16-mixed"`` the step scales the losses with
the precision plugin's gradient scaler itself, as ``manual_backward`` would). Under a mixed
precision, the model runs in half precision and the engine gives the Gramian of that computation,
in float32.

The engine is created in ``on_fit_start`` and closed in ``on_fit_end``, so that it lives only as
long as the training that uses it (a copy of a hooked module, by ``copy.deepcopy`` or
``torch.save``, is a plain module: its calls do not reach the engine). Outside ``fit`` the module
holds no hook and goes through Lightning's checkpoints (which hold the ``state_dict``) as any
other. Validation runs under ``torch.no_grad``, so the engine does not record it. Run (after
``pip install lightning``): ``python examples/lightning_iwrm.py``.
"""

import torch
from lightning import LightningModule, Trainer
from torch import Tensor
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine


class IWRMModule(LightningModule):
    def __init__(self, lr: float = 0.05, fused: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = Sequential(Linear(10, 16), ReLU(), Linear(16, 1))
        self.loss_fn = MSELoss(reduction="none")
        self.weighting = UPGradWeighting()
        self.engine: Engine | None = None
        self.step_weights: list[Tensor] = []  # the weights of every step, for inspection

    def on_fit_start(self) -> None:
        if self.engine is not None:  # left by a fit that raised
            self.engine.close()
        self.engine = Engine(self.model, batch_dim=0)

    def on_fit_end(self) -> None:
        self.engine.close()  # removes the hooks
        self.engine = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        losses = self.loss_fn(self.model(x).squeeze(dim=1), y)  # shape: [batch]
        if self.hparams.fused:
            # (Under precision="16-mixed", the gradient scaler's step expects scaled gradients: the
            # losses are scaled as manual_backward would; UPGradWeighting is scale-invariant.)
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            scaled = losses if scaler is None else scaler.scale(losses)
            weights = self.engine.backward(scaled, self.weighting)
        else:
            gramian = self.engine.compute_gramian(losses)  # shape: [batch, batch]
            weights = self.weighting(gramian)
            self.manual_backward(losses, weights)  # losses.backward(weights)
        optimizer.step()
        optimizer.zero_grad()
        self.step_weights.append(weights.detach())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self.model(x).squeeze(dim=1), y).mean())

    def configure_optimizers(self) -> SGD:
        return SGD(self.model.parameters(), lr=self.hparams.lr)


def make_data(seed: int = 0) -> TensorDataset:
    """128 samples of a noisy linear target."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(128, 10, generator=generator)
    Y = X[:, :4].sum(dim=1) + 0.1 * torch.randn(128, generator=generator)
    return TensorDataset(X, Y)


def make_trainer(max_epochs: int, **kwargs: object) -> Trainer:
    return Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def mean_loss(module: IWRMModule, dataset: TensorDataset) -> float:
    X, Y = dataset.tensors
    with torch.no_grad():
        return module.loss_fn(module.model(X).squeeze(dim=1), Y).mean().item()


if __name__ == "__main__":
    torch.manual_seed(0)
    dataset = make_data()
    train_loader = DataLoader(dataset, batch_size=16)  # no shuffling: reproducible steps
    module = IWRMModule()
    initial_loss = mean_loss(module, dataset)
    trainer = make_trainer(max_epochs=5)
    trainer.fit(module, train_loader, val_dataloaders=DataLoader(dataset, batch_size=64))
    final_loss = mean_loss(module, dataset)
    print(f"mean training loss: {initial_loss:.4f} -> {final_loss:.4f}")
    print(f"weights of the last step: {module.step_weights[-1]}")
    print(f"validation loss: {trainer.callback_metrics['val_loss'].item():.4f}")

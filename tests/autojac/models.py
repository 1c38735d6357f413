"""Small float64 models and per-sample losses on which autojac is compared with autograd."""

from collections.abc import Callable

import torch
from torch import Tensor, nn


class _RNNRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _TransformerRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(dim=1))


def mlp() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 1))
    return model.double(), torch.randn(6, 5, dtype=torch.float64)


def cnn() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 1),
    )
    return model.double(), torch.randn(5, 2, 8, 8, dtype=torch.float64)


def rnn() -> tuple[nn.Module, Tensor]:
    return _RNNRegressor().double(), torch.randn(4, 5, 3, dtype=torch.float64)


def transformer() -> tuple[nn.Module, Tensor]:
    model = _TransformerRegressor().double().eval()  # eval: the fast path is off with grads anyway
    return model, torch.randn(4, 3, 8, dtype=torch.float64)


MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "mlp": mlp,
    "cnn": cnn,
    "rnn": rnn,
    "transformer": transformer,
}


def per_sample_losses(model: nn.Module, x: Tensor) -> Tensor:
    """One loss per sample, of shape ``[batch]``."""
    y = torch.linspace(-1, 1, x.shape[0], dtype=x.dtype)
    return (model(x).squeeze(-1) - y) ** 2

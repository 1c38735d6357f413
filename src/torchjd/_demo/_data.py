"""The data of the demo: scikit-learn's bundled 8x8 handwritten digits (no download).

Each image is a sample of 64 pixel intensities; the multi-task part derives three tasks from the
label: the digit itself (10 classes), its parity and whether it is at least 5.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

TASKS = ("digit", "parity", "digit >= 5")
N_CLASSES = (10, 2, 2)


@dataclass(frozen=True)
class Split:
    x: Tensor  # [n, 64], standardised with the training split's statistics
    y: Tensor  # [n], the digit

    def targets(self) -> tuple[Tensor, Tensor, Tensor]:
        """The label of each task of the multi-task part."""
        return self.y, self.y % 2, (self.y >= 5).long()

    def __len__(self) -> int:
        return len(self.y)


def load(seed: int, device: torch.device, max_train: int | None) -> tuple[Split, Split]:
    """Train and test splits (80 % / 20 %, shuffled by ``seed``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    if max_train is not None:
        train = train[:max_train]
    # Pixels range over [0, 16]; a floor on the scale keeps the pixels that are (almost) constant
    # in the training split from blowing up on the test split.
    mean, std = x[train].mean(dim=0), x[train].std(dim=0).clamp_min(1.0)
    x = (x - mean) / std
    return Split(x[train].to(device), y[train].to(device)), Split(
        x[test].to(device), y[test].to(device)
    )


def batch_schedule(n: int, batch_size: int, epochs: int, seed: int) -> list[list[Tensor]]:
    """The indices of every batch of every epoch: the same for every method of the demo."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [list(torch.randperm(n, generator=generator).split(batch_size)) for _ in range(epochs)]

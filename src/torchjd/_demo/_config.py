"""The settings of one demo run, as parsed from the command line."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    device: str
    out: Path
    quick: bool
    aggregators: tuple[str, ...]

    @property
    def max_train_samples(self) -> int | None:
        """``--quick`` trains on a small subset, so that the whole demo takes a few seconds."""
        return 256 if self.quick else None

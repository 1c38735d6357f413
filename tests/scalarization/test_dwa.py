import math

import pytest
import torch

from torchjd.scalarization import DWA


class _ReferenceDWA:
    """Liu et al. (2019), written from the paper: epoch averages, then K·softmax(ratio / T)."""

    def __init__(self, T: float) -> None:
        self.T = T
        self.epochs: list[list[float]] = []
        self.current: list[list[float]] = []

    def __call__(self, L: list[float]) -> float:
        self.current.append(L)
        K = len(L)
        if len(self.epochs) < 2:
            w = [1.0] * K
        else:
            r = [a / b for a, b in zip(self.epochs[-1], self.epochs[-2], strict=True)]
            e = [math.exp(ri / self.T) for ri in r]
            w = [K * ei / sum(e) for ei in e]
        return sum(wi * Li for wi, Li in zip(w, L, strict=True))

    def step(self) -> None:
        if self.current:
            n = len(self.current)
            self.epochs.append([sum(col) / n for col in zip(*self.current, strict=True)])
            self.current = []


@pytest.mark.parametrize("T", [0.5, 2.0, 10.0])
def test_against_the_paper_over_several_epochs_and_after_reset(T: float):
    scalarizer = DWA(temperature=T)
    for _ in range(2):  # the second round runs after reset(): it must replay identically
        reference = _ReferenceDWA(T)
        generator = torch.Generator().manual_seed(3)
        for _epoch in range(5):
            for _batch in range(3):
                L = (torch.rand(4, generator=generator, dtype=torch.float64) + 0.1).tolist()
                result = scalarizer(torch.tensor(L, dtype=torch.float64))
                torch.testing.assert_close(result, torch.tensor(reference(L), dtype=torch.float64))
            scalarizer.step()
            reference.step()
        scalarizer.reset()


def test_slower_loss_gets_more_weight_and_weights_are_constants():
    scalarizer = DWA()
    for L in [[4.0, 4.0], [1.0, 4.0]]:
        scalarizer(torch.tensor(L))
        scalarizer.step()
    values = torch.tensor([1.0, 1.0], requires_grad=True)
    (weights,) = torch.autograd.grad(scalarizer(values), values)
    assert weights[1] > weights[0]
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0))


def test_matrix_of_values_and_empty_epochs():
    scalarizer = DWA(1.0)
    scalarizer(torch.full((2, 2), 2.0))
    scalarizer.step()
    scalarizer.step()  # an epoch with no call is ignored
    scalarizer(torch.tensor([[1.0, 2.0], [2.0, 2.0]]))
    scalarizer.step()
    values = torch.ones(2, 2, requires_grad=True)
    (weights,) = torch.autograd.grad(scalarizer(values), values)
    r = torch.tensor([0.5, 1.0, 1.0, 1.0])
    torch.testing.assert_close(weights.flatten(), 4 * torch.softmax(r, dim=0))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"`temperature` must be positive. Found temperature=-1.0"):
        DWA(-1.0)
    with pytest.raises(ValueError, match=r"`temperature` must be positive. Found temperature=0"):
        DWA(0)
    scalarizer = DWA()
    scalarizer(torch.ones(3))
    with pytest.raises(
        ValueError, match=r"`values` must have the shape of the losses of this epoch"
    ):
        scalarizer(torch.ones(2))
    scalarizer.step()
    with pytest.raises(ValueError, match=r"losses of previous epochs, \(3,\)"):
        scalarizer(torch.ones(2))
    scalarizer.reset()
    assert scalarizer(torch.ones(2)) == 2.0  # after reset, any shape again


def test_repr():
    assert repr(DWA()) == "DWA(temperature=2.0)"

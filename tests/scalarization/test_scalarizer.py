"""The base class and the checks that every scalarizer shares."""

import pytest
import torch

from torchjd.scalarization import (
    COSMOS,
    DWA,
    FAMO,
    IMTLL,
    PBI,
    STCH,
    UW,
    Constant,
    GeometricMean,
    Mean,
    Random,
    Scalarizer,
    Sum,
)


def _all_scalarizers() -> list[Scalarizer]:
    ones = torch.ones(2)
    return [
        Mean(), Sum(), Random(), Constant(ones), GeometricMean(), STCH(1.0), PBI(1.0, ones),
        COSMOS(1.0, ones), DWA(), FAMO(2), UW(2), IMTLL(2),
    ]  # fmt: skip


@pytest.mark.parametrize("scalarizer", _all_scalarizers(), ids=lambda s: type(s).__name__)
def test_bad_values_are_refused_and_leave_no_state(scalarizer: Scalarizer):
    with pytest.raises(TypeError, match=r"`values` must be a torch.Tensor"):
        scalarizer([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`values` must have a floating-point dtype"):
        scalarizer(torch.tensor([1, 2]))
    values = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    result = scalarizer(values)
    assert result.shape == ()
    assert result.dtype == torch.float64
    assert result.requires_grad
    assert torch.autograd.grad(result, values)[0].isfinite().all()


def test_scalarizer_is_abstract_and_subclassable():
    with pytest.raises(TypeError, match=r"abstract"):
        Scalarizer()  # type: ignore[abstract]

    class Max(Scalarizer):
        def forward(self, values: torch.Tensor, /) -> torch.Tensor:
            return values.max()

    assert Max()(torch.tensor([1.0, 3.0])) == 3.0
    assert repr(Max()) == "Max()"

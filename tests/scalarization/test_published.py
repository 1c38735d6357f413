"""Agreement with the published ``torchjd==0.18.0`` (values recorded in tests/data)."""

from collections.abc import Callable
from itertools import pairwise

import pytest
import torch

from tests.data.published_scalarization import EXPECTED, LOSSES, S, W, Z
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
    Scalarizer,
    Sum,
)

F64 = torch.float64


def _value_and_gradient(scalarizer: Scalarizer, losses: list[float], dtype: torch.dtype) -> list:
    x = torch.tensor(losses, dtype=dtype, requires_grad=True)
    y = scalarizer(x)
    (grad,) = torch.autograd.grad(y, x)
    return [y.item(), grad.tolist()]


def _uw() -> Scalarizer:
    scalarizer = UW(3).double()
    with torch.no_grad():
        scalarizer.log_var.copy_(torch.tensor(S))
    return scalarizer


def _imtll() -> Scalarizer:
    scalarizer = IMTLL(3).double()
    with torch.no_grad():
        scalarizer.log_scale.copy_(torch.tensor(S))
    return scalarizer


STATELESS: dict[str, Callable[[], Scalarizer]] = {
    "Mean": Mean,
    "Sum": Sum,
    "Constant": lambda: Constant(torch.tensor(W)),
    "GeometricMean": GeometricMean,
    "STCH_0.5_w_z": lambda: STCH(0.5, torch.tensor(W), torch.tensor(Z)),
    "STCH_1.0": lambda: STCH(1.0),
    "PBI_2.0_w_z": lambda: PBI(2.0, torch.tensor(W), torch.tensor(Z)),
    "PBI_3.0_w": lambda: PBI(3.0, torch.tensor(W)),
    "COSMOS_1.5_w": lambda: COSMOS(1.5, torch.tensor(W)),
    "UW_s": _uw,
    "IMTLL_s": _imtll,
}


@pytest.mark.parametrize("name", list(STATELESS))
def test_stateless_and_learnable(name: str):
    results = [_value_and_gradient(STATELESS[name](), L, F64) for L in LOSSES]
    torch.testing.assert_close(results, EXPECTED[name], rtol=1e-6, atol=1e-7)


def test_dwa():
    scalarizer = DWA(1.5)
    results = []
    for epoch in range(3):
        for L in LOSSES[2 * epoch : 2 * epoch + 2]:
            results.append(_value_and_gradient(scalarizer, L, F64))
        scalarizer.step()
    results.append(_value_and_gradient(scalarizer, LOSSES[0], F64))
    torch.testing.assert_close(results, EXPECTED["DWA_1.5"], rtol=1e-6, atol=1e-7)


def test_famo():
    famo = FAMO(3, min_losses=torch.tensor([0.1, 0.0, 0.2]), lr=0.1, weight_decay=0.01)
    results = []
    for L, L_next in pairwise(LOSSES):
        results.append(_value_and_gradient(famo, L, torch.float32))
        famo.update(torch.tensor(L_next))
    torch.testing.assert_close(results, EXPECTED["FAMO_min_0.1_0.01"], rtol=1e-5, atol=1e-6)

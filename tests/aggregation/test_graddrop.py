import pytest
import torch

from tests.reference.matrices import FACTORIES, make
from torchjd.aggregation import GradDrop


def graddrop_by_hand(J: torch.Tensor, U: torch.Tensor, leak: list[float], f) -> torch.Tensor:
    """Chen et al. (2020), Algorithm 1, lines 10-15, one coordinate at a time."""
    m, n = J.shape
    out = torch.zeros(n, dtype=J.dtype)
    for k in range(n):
        column = J[:, k].tolist()
        total_abs = sum(abs(x) for x in column)
        P = 0.5 * (1 + sum(column) / total_abs) if total_abs > 0 else 0.5
        fP = float(f(torch.tensor(P, dtype=J.dtype)))
        for i in range(m):
            keep = (fP > U[k] and column[i] > 0) or (fP < U[k] and column[i] < 0)
            out[k] += (leak[i] + (1 - leak[i]) * keep) * column[i]
    return out


@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("with_leak", [False, True])
def test_matches_the_algorithm(family: str, m: int, with_leak: bool):
    J = make(family, m, 8, seed=m)
    leak = torch.linspace(0, 1, m, dtype=J.dtype) if with_leak else None
    f = torch.sqrt if with_leak else (lambda P: P)
    torch.manual_seed(5)
    U = torch.rand(8, dtype=J.dtype).tolist()
    torch.manual_seed(5)
    result = GradDrop(f=f, leak=leak)(J)
    expected = graddrop_by_hand(J, U, [0.0] * m if leak is None else leak.tolist(), f)
    torch.testing.assert_close(result, expected)


def test_full_leak_is_the_sum():
    J = make("normal", 4, 5)
    torch.testing.assert_close(GradDrop(leak=torch.ones(4))(J), J.sum(dim=0))


def test_same_signs_are_kept():
    J = torch.tensor([[1.0, -2.0], [3.0, -1.0]])
    assert torch.equal(GradDrop()(J), J.sum(dim=0))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"leak": torch.ones(2)}, ValueError, "`leak` has 2 entries, so `matrix` must have 2"),
        ({"leak": torch.ones(3, dtype=torch.int64)}, TypeError, "`leak` must have a floating"),
        ({"f": 3.0}, TypeError, "`f` must be callable"),
    ],
)
def test_bad_inputs(kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        GradDrop(**kwargs)(torch.randn(3, 4))


def test_repr_and_str():
    assert repr(GradDrop()).startswith("GradDrop(f=<function _identity")
    assert str(GradDrop()) == "GradDrop"
    assert str(GradDrop(leak=torch.tensor([0.1, 0.2]))) == "GradDrop([0.1, 0.2])"

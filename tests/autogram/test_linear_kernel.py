"""The Linear kernel on both paths (closed form, per-objective gradients) vs brute force."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from torchjd.autogram._rules._linear import weight_gramian


def reference(X: torch.Tensor, Gamma: torch.Tensor) -> torch.Tensor:
    P, B, R, T, _ = Gamma.shape
    rows = []
    for i in range(B):
        for r in range(R):
            blocks = [
                sum(torch.outer(Gamma[p, i, r, t], X[p, i, t]) for t in range(T)) for p in range(P)
            ]
            rows.append(torch.cat([b.flatten() for b in blocks]))
    J = torch.stack(rows)
    return J @ J.T


@given(
    P=st.integers(1, 2),
    B=st.integers(1, 4),
    R=st.integers(1, 3),
    T=st.integers(1, 6),
    d_in=st.integers(1, 5),
    d_out=st.sampled_from([1, 2, 40]),
)
def test_weight_gramian(P, B, R, T, d_in, d_out):
    X = torch.randn(P, B, T, d_in, dtype=torch.float64)
    Gamma = torch.randn(P, B, R, T, d_out, dtype=torch.float64)
    torch.testing.assert_close(weight_gramian(X, Gamma), reference(X, Gamma), rtol=1e-10, atol=0)

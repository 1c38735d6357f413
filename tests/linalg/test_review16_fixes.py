"""Two faults found by the session-16 review: Lawson-Hanson's least-squares fallback on singular
faces, and a tensor cached under inference mode reused by a tracked call."""

import torch

from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import TorchProjector
from torchjd.linalg._enumeration import _active_sets
from torchjd.linalg._lawson_hanson import _face_solve


def test_face_solve_on_a_singular_face_is_the_least_norm_solution():
    """A face with a zero row: the least-norm least-squares solution, every time (the default CPU
    driver, gelsy, returned x = 0 on about nine calls in ten, depending on the allocator's
    leftovers)."""
    g = torch.Generator().manual_seed(0)
    F = torch.randn(4, 6, generator=g, dtype=torch.float64)
    spd = torch.zeros(6, 6, dtype=torch.float64)
    spd[1:5, 1:5] = F @ F.T  # zero rows 0 and 5 around a positive definite block
    zero_row = torch.diag(torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    for A in (zero_row, spd):
        b = A @ torch.randn(A.shape[0], generator=g, dtype=torch.float64)  # in A's range
        expected = torch.linalg.pinv(A) @ b
        for _ in range(30):
            _ = [torch.randint(-9, 9, (int(torch.randint(1, 40, (), generator=g)),)) for _ in "ab"]
            torch.testing.assert_close(_face_solve(A, b), expected, rtol=1e-10, atol=1e-12)


def test_tracked_call_after_an_untracked_one():
    """The active sets cached by an untracked call (run under inference mode) serve a later
    tracked call, whose backward pass saves them: they must be normal tensors. Its gradient equals
    that of a tracked call on a fresh cache."""
    J = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = J @ J.T
    weighting = UPGradWeighting(projector=TorchProjector())
    grads = []
    for untracked_first in (False, True):
        _active_sets.cache_clear()
        if untracked_first:
            weighting(G)
        tracked = G.clone().requires_grad_()
        weighting(tracked).square().sum().backward()
        grads.append(tracked.grad)
    assert grads[0] is not None
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)

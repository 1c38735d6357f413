"""A fault found by the session-16 review: Lawson-Hanson's least-squares fallback on singular
faces (the other, a tensor cached under inference mode reused by a tracked call, is tested in
test_trk16_tracked.py)."""

import torch

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

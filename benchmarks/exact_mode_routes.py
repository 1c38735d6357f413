"""The exact mode's two routes, side by side: time per call relative to the default projector.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/exact_mode_routes.py [--sizes 16 64 256] [--count 10]

For each family of Jacobians and each size ``m``, it times ``UPGrad()`` (the default projector),
the exact mode ``TorchProjector(norm_eps=0.0, reg_eps=0.0)`` as it is (a nonsingular Gramian goes
through the default mode's machinery on ``G`` itself), and the exact mode forced onto its
least-norm route (the route of every Gramian before the nonsingular fast path). Columns: the
default's median time per call, the median of the per-matrix ratios exact / default for both
routes, how many of the Gramians took the fast path (a call where no row conflicts takes
neither route), and the worst conflict of the exact mode,
``min_i J_i · d / (‖J_i‖ · max_j ‖J_j‖)``.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from torchjd.aggregation import UPGrad
from torchjd.linalg import TorchProjector, _bounded_qp


def _family(name: str) -> Callable[[int, torch.Generator], torch.Tensor]:
    def make(m: int, g: torch.Generator) -> torch.Tensor:
        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        if name == "wide":  # more columns than rows: nonsingular
            return randn(m, 4 * m)
        if name == "shared":  # a strong common direction, as per-sample gradients have
            return randn(m, 4 * m) + 2.0 * randn(1, 4 * m)
        if name == "spread":  # row norms over six decades
            J = randn(m, 4 * m)
            return J * 10 ** (torch.rand(m, 1, generator=g, dtype=torch.float64) * 6 - 3)
        if name == "low-rank":  # singular
            return randn(m, m // 4) @ randn(m // 4, 4 * m)
        if name == "tall":  # more rows than columns: singular
            return randn(m, m // 2)
        J = randn(m, 4 * m)  # near-duplicate rows: nonsingular, barely
        J[: m // 8] = J[m // 8 : m // 4] + 1e-6 * randn(m // 8, 4 * m)
        return J

    return make


FAMILIES = ("wide", "shared", "spread", "near-duplicate", "low-rank", "tall")


def conflict(J: torch.Tensor, d: torch.Tensor) -> float:
    J, d = J.double(), d.double()
    norms = J.norm(dim=1)
    return float(((J @ d) / (norms * norms.max())).min())


def timed(aggregator: UPGrad, J: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    d = aggregator(J)
    return time.perf_counter() - start, d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    default = UPGrad()
    exact = UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))
    fast_calls = 0
    nonsingular = _bounded_qp._nonsingular

    def counted(G: torch.Tensor) -> bool:
        nonlocal fast_calls
        result = nonsingular(G)
        fast_calls += result
        return result

    header = (
        f"{'family':>14} {'m':>5} {'dtype':>8} | {'default ms':>10} | {'before':>8} {'after':>8} "
        f"{'fast':>5} | {'worst conflict':>14}"
    )
    print(header)
    print("-" * len(header))
    for family in args.families:
        make = _family(family)
        for m in args.sizes:
            for dtype in (getattr(torch, name) for name in args.dtypes):
                g = torch.Generator().manual_seed(args.seed + m)
                times: dict[str, list[float]] = {"default": [], "before": [], "after": []}
                worst = 0.0
                fast_calls = 0
                for _ in range(args.count):
                    J = make(m, g).to(dtype)
                    times["default"].append(timed(default, J)[0])
                    with mock.patch.object(_bounded_qp, "_nonsingular", return_value=False):
                        times["before"].append(timed(exact, J)[0])
                    with mock.patch.object(_bounded_qp, "_nonsingular", counted):
                        elapsed, d = timed(exact, J)
                    times["after"].append(elapsed)
                    worst = min(worst, conflict(J, d))
                ratio = {
                    name: statistics.median(
                        t / d for t, d in zip(times[name], times["default"], strict=True)
                    )
                    for name in ("before", "after")
                }
                print(
                    f"{family:>14} {m:>5} {str(dtype)[6:]:>8} | "
                    f"{statistics.median(times['default']) * 1e3:>10.2f} | "
                    f"{ratio['before']:>7.2f}x {ratio['after']:>7.2f}x "
                    f"{fast_calls:>2}/{args.count:<2} | {worst:>14.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

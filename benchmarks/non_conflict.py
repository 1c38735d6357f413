"""Does UPGrad's update conflict with a row? The default projector beside the exact mode.

Usage::

    python benchmarks/non_conflict.py [--sizes 16 64 256 1024] [--count 1000] [--count-1024 50]

Each size draws ``--count`` hard random Jacobians (half in float64, half in float32), mixing:
rank deficiency, more rows than columns, zero rows (and, rarely, a zero matrix), near-duplicate and
opposite rows, row norms spread over 1e-3..1e3 and an overall scale in 1e-6..1e4. For each, it runs
``UPGrad()`` (Gramian normalised by its trace, 1e-4 added to its diagonal, as in the paper and the
published library) and ``UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))`` (the exact
mode), and measures the conflict of the update ``d`` with the rows,
``min_i J_i · d / (‖J_i‖ · max_j ‖J_j‖)`` (in float64), counting a matrix as conflicting below
``-1e-6`` in float64 and ``-1e-3`` in float32. Columns: mean time per call, number of conflicting
matrices, worst conflict; then the ratio of the exact mode's total time to the default's, the
median of the per-matrix ratios, and the exact mode's slowest call. With ``--before``, the exact
mode also runs without its spanning route (``_spanning``: rows that positively span a subspace),
and its median ratio and slowest call are printed beside.
"""

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from torchjd.aggregation import UPGrad
from torchjd.linalg import TorchProjector, _bounded_qp

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}


def hard_jacobian(m: int, g: torch.Generator) -> torch.Tensor:
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))

    def chance(p: float) -> bool:
        return float(torch.rand((), generator=g)) < p

    if chance(0.01):
        return torch.zeros(m, max(1, m // 2), dtype=torch.float64)
    n = max(1, int(m * 10 ** uniform(-1, 0.6)))  # from m/10 (more rows) to 4m columns
    if chance(0.4):
        rank = max(1, int(min(m, n) * uniform(0.05, 0.9)))
        J = torch.randn(m, rank, generator=g, dtype=torch.float64)
        J = J @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    else:
        J = torch.randn(m, n, generator=g, dtype=torch.float64)
    if chance(0.5):  # a shared direction, as per-sample gradients have
        J += uniform(0, 2) * torch.randn(1, n, generator=g, dtype=torch.float64)
    rows = torch.randperm(m, generator=g)
    k = max(1, m // 8)
    if chance(0.3):
        J[rows[:k]] = J[rows[k : 2 * k]] + 1e-6 * torch.randn(k, n, generator=g, dtype=J.dtype)
    if chance(0.3):
        J[rows[2 * k : 3 * k]] = -uniform(0.1, 10) * J[rows[3 * k : 4 * k]]
    if chance(0.2):
        J[rows[4 * k : 5 * k]] = 0.0
    if chance(0.5):
        log_norms = torch.rand(m, 1, generator=g, dtype=J.dtype) * 6 - 3
        J = J / J.norm(dim=1, keepdim=True).clamp_min(1e-300) * 10**log_norms
    return J * 10 ** uniform(-6, 4)


def conflict(J: torch.Tensor, d: torch.Tensor) -> float:
    J, d = J.double(), d.double()
    norms = J.norm(dim=1)
    if float(norms.max()) == 0.0:
        return 0.0
    return float(((J @ d) / (norms * norms.max()).clamp_min(1e-300)).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--count-1024", type=int, default=50, help="count for m ≥ 1024")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", action="store_true", help="also without the spanning route")
    args = parser.parse_args()

    exact = UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))
    aggregators = {"default": UPGrad(), "exact": exact}
    if args.before:
        aggregators["before"] = exact

    def route(name: str) -> contextlib.AbstractContextManager:
        if name == "before":
            return mock.patch.object(_bounded_qp, "zero_update_weights", return_value=None)
        return contextlib.nullcontext()

    header = (
        f"{'m':>5} {'dtype':>8} {'count':>6} | {'default ms':>10} {'conflicts':>9} {'worst':>9} "
        f"| {'exact ms':>9} {'conflicts':>9} {'worst':>9} | {'time ratio':>10} "
        f"{'median ratio':>12} {'exact max ms':>12}"
        + (f" | {'before median':>13} {'before max ms':>13}" if args.before else "")
    )
    print(header)
    print("-" * len(header))
    for m in args.sizes:
        count = args.count if m < 1024 else args.count_1024
        for dtype in (torch.float64, torch.float32):
            g = torch.Generator().manual_seed(args.seed + m)
            stats = {
                name: {"time": 0.0, "times": [], "conflicts": 0, "worst": 0.0}
                for name in aggregators
            }
            for _ in range(count // 2):
                J = hard_jacobian(m, g).to(dtype)
                for name, aggregator in aggregators.items():
                    with route(name):
                        start = time.perf_counter()
                        d = aggregator(J)
                        elapsed = time.perf_counter() - start
                    stats[name]["time"] += elapsed
                    stats[name]["times"].append(elapsed)
                    value = conflict(J, d)
                    stats[name]["worst"] = min(stats[name]["worst"], value)
                    stats[name]["conflicts"] += value < -TOLERANCE[dtype]
            n = count // 2
            pairs = zip(stats["exact"]["times"], stats["default"]["times"], strict=True)
            ratios = [e / d for e, d in pairs]
            default, exact = stats["default"], stats["exact"]
            before = ""
            if args.before:
                pairs = zip(stats["before"]["times"], stats["default"]["times"], strict=True)
                before_ratio = statistics.median(b / d for b, d in pairs)
                before = f" | {before_ratio:>12.2f}x {max(stats['before']['times']) * 1e3:>13.1f}"
            print(
                f"{m:>5} {str(dtype)[6:]:>8} {n:>6} | {default['time'] / n * 1e3:>10.2f} "
                f"{default['conflicts']:>9} {default['worst']:>9.1e} | "
                f"{exact['time'] / n * 1e3:>9.2f} {exact['conflicts']:>9} {exact['worst']:>9.1e} | "
                f"{exact['time'] / default['time']:>9.2f}x "
                f"{statistics.median(ratios):>11.2f}x {max(exact['times']) * 1e3:>12.1f}" + before,
                flush=True,
            )


if __name__ == "__main__":
    main()

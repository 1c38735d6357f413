"""Does UPGrad's update conflict with a row? The default projector beside the exact mode.

Usage::

    python benchmarks/non_conflict.py [--sizes 16 64 256 1024] [--count 1000] [--count-1024 50]
        [--baseline DIR] [--rounds 1] [--clock wall|cpu]

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

``--baseline DIR`` (an exported ``src/`` of another version: ``git archive REV src | tar -x -C
/tmp/baseX``, then ``--baseline /tmp/baseX/src``) runs both versions, each in its own process, on
the same matrices, and prints the baseline's row under each of this version's. ``--rounds N``
runs every version N times, in turn, keeping each call's fastest time (on a shared machine, with
``--clock cpu``: the process's CPU time, which other processes disturb less).
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch

from torchjd.aggregation import UPGrad
from torchjd.linalg import TorchProjector, _bounded_qp

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


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


def measure(
    m: int, count: int, seed: int, clock: str, before: bool
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per dtype and aggregator (``default``, ``exact`` and, with ``before``, ``before``): the
    time and the conflict of each call."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    exact = UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))
    aggregators = {"default": UPGrad(), "exact": exact}
    if before:
        aggregators["before"] = exact

    def route(name: str) -> contextlib.AbstractContextManager:
        if name == "before":
            return mock.patch.object(_bounded_qp, "zero_update_weights", return_value=None)
        return contextlib.nullcontext()

    results = {}
    for dtype_name, dtype in DTYPES.items():
        g = torch.Generator().manual_seed(seed + m)
        stats = {name: {"times": [], "conflicts": []} for name in aggregators}
        for _ in range(count // 2):
            J = hard_jacobian(m, g).to(dtype)
            for name, aggregator in aggregators.items():
                with route(name):
                    start = now()
                    d = aggregator(J)
                    elapsed = now() - start
                stats[name]["times"].append(elapsed)
                stats[name]["conflicts"].append(conflict(J, d))
        results[dtype_name] = stats
    return results


def row(m: int, dtype_name: str, version: str, stats: dict[str, dict[str, list[float]]]) -> str:
    dtype = DTYPES[dtype_name]
    default, exact = stats["default"], stats["exact"]
    n = len(default["times"])

    def summary(name: str) -> str:
        times, conflicts = stats[name]["times"], stats[name]["conflicts"]
        count = sum(value < -TOLERANCE[dtype] for value in conflicts)
        return f"{sum(times) / n * 1e3:>9.2f} {count:>9} {min(0.0, *conflicts):>9.1e}"

    ratios = [e / d for e, d in zip(exact["times"], default["times"], strict=True)]
    line = (
        f"{m:>5} {'f' + dtype_name[5:]:>5} {version:>8} {n:>6} | {summary('default')} | "
        f"{summary('exact')} | {sum(exact['times']) / sum(default['times']):>9.2f}x "
        f"{statistics.median(ratios):>11.2f}x {max(exact['times']) * 1e3:>12.1f}"
    )
    if "before" in stats:
        pairs = zip(stats["before"]["times"], default["times"], strict=True)
        before_ratio = statistics.median(b / d for b, d in pairs)
        line += f" | {before_ratio:>12.2f}x {max(stats['before']['times']) * 1e3:>13.1f}"
    return line


def run_version(src: str | None, m: int, args: argparse.Namespace) -> dict:
    """:func:`measure` in a process that imports ``torchjd`` from ``src`` (None: this one)."""
    command = [sys.executable, __file__, "--worker", "--sizes", str(m), "--count", str(args.count)]
    command += ["--seed", str(args.seed), "--clock", args.clock] + ["--before"] * args.before
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(output.stdout)


def fastest(runs: list[dict]) -> dict:
    """Each call's fastest time over the runs (the conflicts are those of the first)."""
    best = runs[0]
    for dtype_stats in best.values():
        for stats in dtype_stats.values():
            stats["times"] = list(stats["times"])
    for other in runs[1:]:
        for dtype_name, dtype_stats in other.items():
            for name, stats in dtype_stats.items():
                kept = best[dtype_name][name]["times"]
                kept[:] = [min(a, b) for a, b in zip(kept, stats["times"], strict=True)]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--count-1024", type=int, default=50, help="count for m ≥ 1024")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", action="store_true", help="also without the spanning route")
    parser.add_argument("--baseline", help="exported src/ of another version, run beside")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each version, in turn")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        m = args.sizes[0]
        count = args.count if m < 1024 else args.count_1024
        print(json.dumps(measure(m, count, args.seed, args.clock, args.before)))
        return

    versions = {"this": None} | ({"baseline": args.baseline} if args.baseline else {})
    header = (
        f"{'m':>5} {'dtype':>5} {'version':>8} {'count':>6} | {'default ms':>9} {'conflicts':>9} "
        f"{'worst':>9} | {'exact ms':>9} {'conflicts':>9} {'worst':>9} | {'time ratio':>10} "
        f"{'median ratio':>12} {'exact max ms':>12}"
        + (f" | {'before median':>13} {'before max ms':>13}" if args.before else "")
    )
    print(header)
    print("-" * len(header))
    for m in args.sizes:
        count = args.count if m < 1024 else args.count_1024
        if len(versions) == 1 and args.rounds == 1:
            results = {"this": measure(m, count, args.seed, args.clock, args.before)}
        else:
            runs: dict[str, list[dict]] = {version: [] for version in versions}
            for _ in range(args.rounds):
                for version, src in versions.items():
                    runs[version].append(run_version(src, m, args))
            results = {version: fastest(version_runs) for version, version_runs in runs.items()}
        for dtype_name in DTYPES:
            for version, stats in results.items():
                print(row(m, dtype_name, version, stats[dtype_name]), flush=True)


if __name__ == "__main__":
    main()

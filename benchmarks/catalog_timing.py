"""Time CAGrad, NashMTL, PCGrad and FairGrad on random Jacobians, beside the published torchjd.

Usage::

    python benchmarks/catalog_timing.py [--sizes 8 64] [--n 1000] [--repeats 5]
        [--reference-python /work/ref-venv/bin/python]

Each size ``m`` draws one random ``J`` of shape ``[m, n]`` in float64 and times each aggregator
on it (median of ``--repeats`` calls after one warm-up call). The published library (e.g.
``torchjd==0.18.0`` in its own virtualenv) is given with ``--reference-python`` (or
``$TORCHJD_REFERENCE_PYTHON``); it is run in a subprocess on the same matrices, and only timed.
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import torch

from torchjd.aggregation import CAGrad, FairGrad, NashMTL, PCGrad

METHODS: dict[str, Callable[[int], torch.nn.Module]] = {
    "CAGrad(c=0.5)": lambda m: CAGrad(c=0.5),
    "NashMTL": lambda m: NashMTL(n_tasks=m),
    "PCGrad": lambda m: PCGrad(),
    "FairGrad(alpha=2)": lambda m: FairGrad(alpha=2.0),
}

_REFERENCE_SCRIPT = """
import statistics, sys, time, torch
from torchjd.aggregation import CAGrad, FairGrad, NashMTL, PCGrad
torch.set_num_threads({threads})
J = torch.load(sys.argv[1])
m = J.shape[0]
makers = {{
    "CAGrad(c=0.5)": lambda: CAGrad(c=0.5),
    "NashMTL": lambda: NashMTL(n_tasks=m),
    "PCGrad": lambda: PCGrad(),
    "FairGrad(alpha=2)": lambda: FairGrad(alpha=2.0),
}}
for name, make in makers.items():
    aggregator = make()
    aggregator(J)
    times = []
    for _ in range({repeats}):
        start = time.perf_counter()
        aggregator(J)
        times.append(time.perf_counter() - start)
    print(name, statistics.median(times), flush=True)
"""


def time_ours(aggregator: torch.nn.Module, J: torch.Tensor, repeats: int) -> float:
    aggregator(J)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        aggregator(J)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_reference(python: str, J: torch.Tensor, repeats: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "J.pt")
        torch.save(J, path)
        script = _REFERENCE_SCRIPT.format(repeats=repeats, threads=threads)
        result = subprocess.run(
            [python, "-c", script, path], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        return {}
    times = {}
    for line in result.stdout.splitlines():
        name, value = line.rsplit(" ", 1)
        times[name] = float(value)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, for both libraries (small ops)"
    )
    parser.add_argument(
        "--reference-python", default=os.environ.get("TORCHJD_REFERENCE_PYTHON", "")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| method | m | ours (ms) | torchjd 0.18.0 (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for m in args.sizes:
        J = torch.randn(m, args.n, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
        reference = (
            time_reference(args.reference_python, J, args.repeats, args.threads)
            if args.reference_python
            else {}
        )
        for name, make in METHODS.items():
            ours = time_ours(make(m), J, args.repeats)
            theirs = reference.get(name)
            their_text = f"{1e3 * theirs:.2f}" if theirs is not None else "-"
            ratio = f"{theirs / ours:.1f}x" if theirs is not None else "-"
            print(f"| {name} | {m} | {1e3 * ours:.2f} | {their_text} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

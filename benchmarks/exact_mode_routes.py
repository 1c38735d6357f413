"""The exact mode's routes, side by side: time per call relative to the default projector.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/exact_mode_routes.py [--sizes 16 64 256] [--count 10]

For each family of Jacobians and each size ``m``, it times ``UPGrad()`` (the default projector)
and the exact mode ``TorchProjector(norm_eps=0.0, reg_eps=0.0)`` three ways: as it is (a
nonsingular Gramian goes through the default mode's machinery on ``G`` itself, rows that
positively span a subspace through ``_spanning``, other Gramians of rank at most ``2m / 3``
through ``_unique_face``), without the spanning route (``no span``; such Gramians then take the
unique-face route), and forced onto its least-norm pivoting route (``pivoting``: every Gramian
before the nonsingular fast path; skipped with ``--skip-pivoting``). Columns: the default's median
time per call, the median of the per-matrix ratios exact / default, how many of the Gramians took
the nonsingular fast path, the spanning route and the unique-face route (a call where no row
conflicts takes none), and the worst conflict of the exact mode,
``min_i J_i · d / (‖J_i‖ · max_j ‖J_j‖)``.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from torchjd.aggregation import UPGrad
from torchjd.linalg import TorchProjector, _bounded_qp, _spanning


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
    parser.add_argument("--skip-pivoting", action="store_true")
    args = parser.parse_args()

    default = UPGrad()
    exact = UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))
    counts = {"fast": 0, "span": 0, "uniq": 0}
    nonsingular = _bounded_qp._nonsingular
    spanning = _spanning.zero_update_weights
    unique = _bounded_qp.unique_optimum_rows

    def counted_nonsingular(G: torch.Tensor) -> bool:
        result = nonsingular(G)
        counts["fast"] += result
        return result

    def counted_spanning(*args: object) -> object:
        result = spanning(*args)  # type: ignore[arg-type]
        counts["span"] += result is not None
        return result

    def counted_unique(*args: object) -> object:
        counts["uniq"] += 1
        return unique(*args)  # type: ignore[arg-type]

    routes = ("after", "no span") if args.skip_pivoting else ("after", "no span", "pivoting")
    header = (
        f"{'family':>14} {'m':>5} {'dtype':>8} | {'default ms':>10} | "
        + " ".join(f"{name:>8}" for name in routes)
        + f" | {'fast':>5} {'span':>5} {'uniq':>5} | {'worst conflict':>14}"
    )
    print(header)
    print("-" * len(header))
    for family in args.families:
        make = _family(family)
        for m in args.sizes:
            for dtype in (getattr(torch, name) for name in args.dtypes):
                g = torch.Generator().manual_seed(args.seed + m)
                times: dict[str, list[float]] = {name: [] for name in ("default", *routes)}
                worst = 0.0
                counts.update(fast=0, span=0, uniq=0)
                for _ in range(args.count):
                    J = make(m, g).to(dtype)
                    times["default"].append(timed(default, J)[0])
                    if "pivoting" in routes:
                        with mock.patch.object(_bounded_qp, "_nonsingular", return_value=False):
                            times["pivoting"].append(timed(exact, J)[0])
                    with mock.patch.object(_bounded_qp, "zero_update_weights", return_value=None):
                        times["no span"].append(timed(exact, J)[0])
                    with (
                        mock.patch.object(_bounded_qp, "_nonsingular", counted_nonsingular),
                        mock.patch.object(_bounded_qp, "zero_update_weights", counted_spanning),
                        mock.patch.object(_bounded_qp, "unique_optimum_rows", counted_unique),
                    ):
                        elapsed, d = timed(exact, J)
                    times["after"].append(elapsed)
                    worst = min(worst, conflict(J, d))
                ratio = {
                    name: statistics.median(
                        t / d for t, d in zip(times[name], times["default"], strict=True)
                    )
                    for name in routes
                }
                print(
                    f"{family:>14} {m:>5} {str(dtype)[6:]:>8} | "
                    f"{statistics.median(times['default']) * 1e3:>10.2f} | "
                    + " ".join(f"{ratio[name]:>7.2f}x" for name in routes)
                    + f" | {counts['fast']:>2}/{args.count:<2} {counts['span']:>2}/{args.count:<2}"
                    + f" {counts['uniq']:>2}/{args.count:<2}"
                    + f" | {worst:>14.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Time ``UPGradWeighting`` on random Gramians, side by side with the published ``torchjd``.

Usage::

    python benchmarks/upgrad_weighting.py [--sizes 16 64 256 1024] [--dtypes float32 float64]
        [--reference-python PATH] [--reference-max-m 256] [--baseline-python PATH]
        [--repeats 5] [--rounds 1] [--clock wall|cpu]

The published library (``torchjd==0.18.0``) must live in its own virtualenv; give its interpreter
with ``--reference-python`` (or ``$TORCHJD_REFERENCE_PYTHON``). It is only timed and used to
cross-check the weights, in a subprocess, on the very same Gramians (saved to a temporary file).
``--baseline-python``: the interpreter of another checkout of this library (e.g. the main
branch's virtualenv), timed the same way, for before/after tables. Every library runs in its own
worker process; on each Gramian, the libraries take turns, ``--rounds`` times; each turn times
the median of ``--repeats`` calls, and the best turn is kept. On a shared machine, ``--clock
cpu`` (the process's CPU time, one thread) steadies the figures.

Families of Gramians ``G = J Jᵀ`` (``J`` of shape ``[m, n]``):

- ``wishart``: ``J`` standard normal with ``n = m`` (about half the pairs of rows conflict);
- ``wide``: standard normal with ``n = 4m``;
- ``per-sample``: ``J = 0.3 · g + noise``, a shared mean gradient plus per-sample noise, the
  shape of per-sample gradients in instance-wise risk minimisation;
- ``low-rank``: rank 32 with singular values spread over four decades;
- ``mlp``: the real per-sample Gramian (``torchjd.autogram.Engine``) of the cross-entropy losses
  of an MLP 784-512-512-10 at initialisation on ``m`` random inputs and labels, as in
  ``benchmarks/autogram_step.py`` (rows of the same label agree, of other labels conflict);
- ``mlp-trained``: the same after 100 steps of UPGrad (SGD, learning rate 0.1) on that batch,
  when it is nearly memorised (more conflicts, row norms over a decade and a half).

Columns: median time per call (ms) for this library, the baseline and the published one, and the
ratio of the published time to ours; the largest weight
difference relative to the largest weight; the largest conflict of each library's update with a
row, on the problem both solve (the regularised Gramian), relative to that row's norm (see
:func:`conflict`; zero at the exact optimum).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from torchjd.aggregation import UPGradWeighting

TIMING_SCRIPT = """
import json, sys, time, statistics, torch
from torchjd.aggregation import UPGradWeighting
torch.set_num_threads(1)
gramians = torch.load(sys.argv[1])
now = time.process_time if sys.argv[2] == "cpu" else time.perf_counter
weighting = UPGradWeighting()
for line in sys.stdin:
    index, repeats = map(int, line.split())
    G = gramians[index]
    weights = weighting(G)
    times = []
    for _ in range(repeats):
        start = now()
        weighting(G)
        times.append(now() - start)
    print(json.dumps({"time": statistics.median(times), "weights": weights.double().tolist()}))
    sys.stdout.flush()
"""


def make_gramian(family: str, m: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family == "wishart":
        J = torch.randn(m, m, generator=g, dtype=torch.float64)
    elif family == "wide":
        J = torch.randn(m, 4 * m, generator=g, dtype=torch.float64)
    elif family == "per-sample":
        n = 4 * m
        J = 0.3 * torch.randn(1, n, generator=g, dtype=torch.float64)
        J = J + torch.randn(m, n, generator=g, dtype=torch.float64)
    elif family == "mlp":
        return mlp_gramian(m, seed).to(dtype)
    elif family == "mlp-trained":
        return mlp_gramian(m, seed, steps=100).to(dtype)
    elif family == "low-rank":
        singular_values = torch.logspace(0, -4, 32, dtype=torch.float64)
        left = torch.randn(m, 32, generator=g, dtype=torch.float64) * singular_values
        J = left @ torch.randn(32, 4 * m, generator=g, dtype=torch.float64)
    else:
        raise ValueError(family)
    return (J @ J.T).to(dtype)


def mlp_gramian(m: int, seed: int, steps: int = 0) -> torch.Tensor:
    from torch import nn

    from torchjd.autogram import Engine

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    x = torch.randn(m, 784, generator=g)
    y = torch.randint(0, 10, (m,), generator=g)
    engine = Engine(model, batch_dim=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weighting = UPGradWeighting()
    for _ in range(steps):
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.backward(weighting(engine.compute_gramian(losses)))
        optimizer.step()
        optimizer.zero_grad()
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    return engine.compute_gramian(losses).detach().double()


class Library:
    """A worker process of the interpreter ``python`` that times ``UPGradWeighting`` on the
    Gramians (saved to ``path``) one request at a time, so that the libraries' runs alternate."""

    def __init__(self, python: str, path: Path, clock: str) -> None:
        self.process = subprocess.Popen(
            [python, "-c", TIMING_SCRIPT, str(path), clock],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def time(self, index: int, repeats: int) -> tuple[float, torch.Tensor]:
        """The median time per call on Gramian ``index``, and the weights."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(f"{index} {repeats}\n")
        self.process.stdin.flush()
        item = json.loads(self.process.stdout.readline())
        return item["time"], torch.tensor(item["weights"], dtype=torch.float64)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def conflict(G: torch.Tensor, weights: torch.Tensor) -> float:
    """Largest conflict of the update with a row, on the regularised problem both libraries solve:
    ``max_j (−(G'w)_j)₊ / (‖J'_j‖ · max_l ‖J'_l‖ · max p)``, with ``G' = G / tr G + 1e-4 I`` and
    ``p = 1/m`` (zero at the exact optimum)."""
    G = G.double()
    m = G.shape[0]
    G = G / G.trace() + 1e-4 * torch.eye(m, dtype=torch.float64)
    row_scale = (G.diagonal() * G.diagonal().max()).sqrt()
    return float((-(G @ weights.double()) / (row_scale / m)).clamp_min(0).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument(
        "--families",
        nargs="+",
        default=["wishart", "wide", "per-sample", "low-rank", "mlp", "mlp-trained"],
    )
    parser.add_argument(
        "--reference-python",
        default=os.environ.get("TORCHJD_REFERENCE_PYTHON"),
        help="interpreter of a virtualenv with torchjd==0.18.0[full]",
    )
    parser.add_argument("--reference-max-m", type=int, default=256)
    parser.add_argument("--baseline-python", help="interpreter of another checkout of this library")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()

    cases = [
        (m, family, dtype_name)
        for dtype_name in args.dtypes
        for m in args.sizes
        for family in args.families
    ]
    gramians = [make_gramian(family, m, getattr(torch, dtype)) for m, family, dtype in cases]
    pythons = {
        "ours": sys.executable,
        "baseline": args.baseline_python,
        "published": args.reference_python,
    }
    best: dict[str, dict[int, tuple[float, torch.Tensor]]] = {name: {} for name in pythons}
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "gramians.pt"
        torch.save(gramians, path)
        libraries = {
            name: Library(python, path, args.clock)
            for name, python in pythons.items()
            if python is not None
        }
        # Case by case, the libraries in turn, --rounds times: each keeps its best median.
        for i, (m, _, _) in enumerate(cases):
            repeats = args.repeats if m <= 256 else max(1, args.repeats // 2)
            for _ in range(args.rounds):
                for name, library in libraries.items():
                    if name == "published" and m > args.reference_max_m:
                        continue
                    result = library.time(i, repeats)
                    kept = best[name]
                    kept[i] = min(kept.get(i, result), result, key=lambda r: r[0])
        for library in libraries.values():
            library.close()

    print(f"torch {torch.__version__}, 1 thread, clock {args.clock}, {sys.platform}")
    header = (
        f"{'m':>5} {'family':>11} {'dtype':>8} {'ours ms':>9} {'baseline ms':>12} "
        f"{'published ms':>13} {'speed-up':>9} {'max|Δw|/max|w|':>15} {'conflict ours':>14} "
        f"{'published':>10}"
    )
    print(header)
    print("-" * len(header))
    for i, ((m, family, dtype_name), G) in enumerate(zip(cases, gramians, strict=True)):
        ours_time, ours = best["ours"][i]
        row = f"{m:>5} {family:>11} {dtype_name:>8} {ours_time * 1e3:>9.2f} "
        baseline = best.get("baseline", {})
        row += f"{baseline[i][0] * 1e3:>12.2f} " if i in baseline else f"{'-':>12} "
        published = best.get("published", {})
        if i in published:
            ref_time, ref = published[i]
            difference = float((ours.double() - ref).abs().max() / ref.abs().max())
            row += (
                f"{ref_time * 1e3:>13.2f} {ref_time / ours_time:>8.1f}x "
                f"{difference:>15.1e} {conflict(G, ours):>14.1e} {conflict(G, ref):>10.1e}"
            )
        else:
            row += f"{'-':>13} {'-':>9} {'-':>15} {conflict(G, ours):>14.1e} {'-':>10}"
        print(row, flush=True)


if __name__ == "__main__":
    main()

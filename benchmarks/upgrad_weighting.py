"""Time ``UPGradWeighting`` on random Gramians, side by side with the published ``torchjd``.

Usage::

    python benchmarks/upgrad_weighting.py [--sizes 16 64 256 1024] [--dtypes float32 float64]
        [--reference-python PATH] [--reference-max-m 256] [--repeats 5]

The published library (``torchjd==0.18.0``) must live in its own virtualenv; give its interpreter
with ``--reference-python`` (or ``$TORCHJD_REFERENCE_PYTHON``). It is only timed and used to
cross-check the weights, in a subprocess, on the very same Gramians (saved to a temporary file).

Families of Gramians ``G = J Jᵀ`` (``J`` of shape ``[m, n]``):

- ``wishart``: ``J`` standard normal with ``n = m`` (about half the pairs of rows conflict);
- ``wide``: standard normal with ``n = 4m``;
- ``per-sample``: ``J = 0.3 · g + noise``, a shared mean gradient plus per-sample noise, the
  shape of per-sample gradients in instance-wise risk minimisation;
- ``low-rank``: rank 32 with singular values spread over four decades;
- ``mlp``: the real per-sample Gramian (``torchjd.autogram.Engine``) of the cross-entropy losses
  of an MLP 784-512-512-10 at initialisation on ``m`` random inputs and labels, as in
  ``benchmarks/autogram_step.py`` (rows of the same label agree, of other labels conflict).

Columns: median wall time per call (ms) for both libraries and their ratio; the largest weight
difference relative to the largest weight; the largest conflict of each library's update with a
row, on the problem both solve (the regularised Gramian), relative to that row's norm (see
:func:`conflict`; zero at the exact optimum).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchjd.aggregation import UPGradWeighting

REFERENCE_SCRIPT = """
import json, sys, time, statistics, torch
from torchjd.aggregation import UPGradWeighting
G = torch.load(sys.argv[1])
repeats = int(sys.argv[2])
weighting = UPGradWeighting()
weights = weighting(G)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    weighting(G)
    times.append(time.perf_counter() - start)
json.dump({"time": statistics.median(times), "weights": weights.double().tolist()}, sys.stdout)
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
    elif family == "low-rank":
        singular_values = torch.logspace(0, -4, 32, dtype=torch.float64)
        left = torch.randn(m, 32, generator=g, dtype=torch.float64) * singular_values
        J = left @ torch.randn(32, 4 * m, generator=g, dtype=torch.float64)
    else:
        raise ValueError(family)
    return (J @ J.T).to(dtype)


def mlp_gramian(m: int, seed: int) -> torch.Tensor:
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
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    return engine.compute_gramian(losses).detach().double()


def time_ours(G: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    weighting = UPGradWeighting()
    weights = weighting(G)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        weighting(G)
        times.append(time.perf_counter() - start)
    return statistics.median(times), weights


def time_reference(python: str, G: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "gramian.pt"
        torch.save(G, path)
        result = subprocess.run(
            [python, "-c", REFERENCE_SCRIPT, str(path), str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
    data = json.loads(result.stdout)
    return data["time"], torch.tensor(data["weights"], dtype=torch.float64)


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
        "--families", nargs="+", default=["wishart", "wide", "per-sample", "low-rank", "mlp"]
    )
    parser.add_argument(
        "--reference-python",
        default=os.environ.get("TORCHJD_REFERENCE_PYTHON"),
        help="interpreter of a virtualenv with torchjd==0.18.0[full]",
    )
    parser.add_argument("--reference-max-m", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {sys.platform}")
    header = (
        f"{'m':>5} {'family':>11} {'dtype':>8} {'ours ms':>9} {'published ms':>13} "
        f"{'speed-up':>9} {'max|Δw|/max|w|':>15} {'conflict ours':>14} {'published':>10}"
    )
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for m in args.sizes:
            for family in args.families:
                G = make_gramian(family, m, dtype)
                repeats = args.repeats if m <= 256 else max(1, args.repeats // 2)
                ours_time, ours = time_ours(G, repeats)
                row = f"{m:>5} {family:>11} {dtype_name:>8} {ours_time * 1e3:>9.1f} "
                if args.reference_python and m <= args.reference_max_m:
                    ref_time, ref = time_reference(args.reference_python, G, 1 if m > 64 else 3)
                    difference = float((ours.double() - ref).abs().max() / ref.abs().max())
                    row += (
                        f"{ref_time * 1e3:>13.1f} {ref_time / ours_time:>8.0f}x "
                        f"{difference:>15.1e} {conflict(G, ours):>14.1e} "
                        f"{conflict(G, ref):>10.1e}"
                    )
                else:
                    row += f"{'-':>13} {'-':>9} {'-':>15} {conflict(G, ours):>14.1e} {'-':>10}"
                print(row, flush=True)


if __name__ == "__main__":
    main()

"""Time and peak memory of one multi-task step with autojac, side by side with the published
``torchjd``.

Usage::

    python benchmarks/autojac_memory.py [--tasks 2 8 32] [--repeats 5]
        [--reference-python PATH]

The step is ``mtl_backward`` then ``jac_to_grad(shared params, UPGrad())`` on a shared trunk of
about one million parameters (MLP 256 → 1024 → 512 → 256, batch of 64) with one linear head per
task. Each configuration runs in a fresh subprocess, with one thread, on CPU; the published library
(``torchjd==0.18.0``, in its own virtualenv given by ``--reference-python`` or
``$TORCHJD_REFERENCE_PYTHON``) runs the very same worker, as a black box.

Columns: best CPU time and median wall time of a step (ms, default allocator settings; with one
thread, the CPU time, user plus system, is what the step costs, and its best over the repeats, as
with ``timeit``, is the least sensitive to other processes on a shared machine); peak memory
above the memory held before the measured steps (MiB: the peak resident set size ``VmHWM`` after
a warm-up step, reset through ``/proc/self/clear_refs``, in a separate process with a fixed
``malloc`` mmap threshold so that freed tensors leave the resident set), compared with plain
autograd (``sum(losses).backward()``) and with ``m`` copies of the trunk's parameters.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER_IMPLS = ["autograd", "default", "optimized"]


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since the last reset), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set size (Linux ≥ 4.0)


def worker(impl: str, m: int, repeats: int) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256)
    )
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(m))
    x = torch.randn(64, 256)
    y = torch.randn(m, 64, 1)

    if impl != "autograd":
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = UPGrad()

    def step() -> None:
        features = trunk(x)
        losses = [((head(features) - t) ** 2).mean() for head, t in zip(heads, y, strict=True)]
        if impl == "autograd":
            torch.stack(losses).sum().backward()
        else:
            mtl_backward(losses, features=features)
            jac_to_grad(
                trunk.parameters(), aggregator, optimize_gramian_computation=impl == "optimized"
            )
        trunk.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)

    step()  # one-off initialisations (lazy imports, vmap set-up) are not measured
    before = _status_mib("VmRSS")
    _reset_peak()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = _status_mib("VmHWM")
    n = sum(p.numel() for p in trunk.parameters())
    return {
        "wall_ms": 1e3 * statistics.median(wall),
        "cpu_ms": 1e3 * min(cpu),
        "peak_mib": peak - before,
        "n": n,
    }


def run(python: str, impl: str, m: int, repeats: int) -> dict:
    """Time in one fresh process with the default allocator settings; memory in another."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", impl, str(m), str(repeats)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    timed = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    # For memory, a fixed mmap threshold: glibc otherwise raises it after each large free, and
    # memory freed afterwards may stay resident, so that the resident set would not follow the
    # live tensors (it also makes every large allocation pay its page faults: not for timing).
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    measured = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(measured.strip().splitlines()[-1])
    timing = json.loads(timed.strip().splitlines()[-1])
    result["wall_ms"], result["cpu_ms"] = timing["wall_ms"], timing["cpu_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--reference-python",
        default=os.environ.get("TORCHJD_REFERENCE_PYTHON", "/work/ref-venv/bin/python"),
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, m, repeats = args.worker
        print(json.dumps(worker(impl, int(m), int(repeats))))
        return

    reference = args.reference_python if Path(args.reference_python).exists() else None
    header = (
        f"{'m':>3} {'library':<22} {'CPU (ms)':>9} {'wall (ms)':>10} {'peak (MiB)':>11} "
        f"{'above autograd':>15} {'m × params':>11}"
    )
    print(header)
    print("-" * len(header))
    for m in args.tasks:
        base = run(sys.executable, "autograd", m, args.repeats)
        rows = [("autograd (sum)", base)]
        rows += [
            (f"ours {impl}", run(sys.executable, impl, m, args.repeats))
            for impl in WORKER_IMPLS[1:]
        ]
        if reference is not None:
            for impl in WORKER_IMPLS[1:]:
                rows.append((f"published {impl}", run(reference, impl, m, args.repeats)))
        copies = m * base["n"] * 4 / 2**20
        for name, r in rows:
            print(
                f"{m:>3} {name:<22} {r['cpu_ms']:>9.1f} {r['wall_ms']:>10.1f} "
                f"{r['peak_mib']:>11.1f} {r['peak_mib'] - base['peak_mib']:>15.1f} {copies:>11.1f}"
            )


if __name__ == "__main__":
    main()

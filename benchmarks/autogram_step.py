"""Time one IWRM step with the autogram engine against one ERM step and the published engine.

Usage::

    python benchmarks/autogram_step.py [--steps 5] [--threads 1] [--reference-python PATH]
        [--only mlp64 ...] [--clock wall|cpu]
    python benchmarks/autogram_step.py --interleave [--steps 20] [--repeats 2]
        [--baseline OTHER/src] [--only ...] [--clock cpu]

Each configuration runs in its own subprocess (so that peak memory is measured per run): the
ERM step (mean loss, backward, SGD step), the IWRM step with this library (forward,
``Engine.compute_gramian``, ``UPGradWeighting``, ``losses.backward(weights)``, SGD step), and the
same IWRM step with the published ``torchjd==0.18.0`` (its virtualenv's interpreter, given by
``--reference-python`` or ``$TORCHJD_REFERENCE_PYTHON``; the step code is the same, only the
library differs), and the fused IWRM step of this library (``Engine.backward(losses, weighting)``:
the Linear and convolution gradients formed from what the Gramian pass recorded, a second backward
only for the other parameters; its phases are timed by a wrapper around the weighting). Models:
an MLP 784-512-512-10 (batch 64 and 256), a CNN on 3x32x32 (batch 64), and a two-layer
Transformer encoder (d_model 128, 4 heads, seq 32, batch 32), and a tiny MLP 10-32-10 (batch 16),
where the engine's fixed cost per step is nearly everything. ``mlp64x4``, ``cnn64x4`` and
``transformer32x4`` (named with ``--only``) have four objectives per sample (the cross-entropy for
four shifted targets), so ``m = 4 B``.

One torch thread by default: on a shared machine, thread hand-offs dominate otherwise; there,
``--clock cpu`` (the process's CPU time instead of the elapsed time) also steadies the figures.
Columns: median time per step (ms) and its split (forward, Gramian, weighting, backward + step),
the ratio to the ERM step, and the peak resident memory of the process above its level after
building the model and the data (MiB).

With ``--interleave``, one process per configuration runs the ERM, IWRM and fused steps one after
the other (each on its own copy of the model), round after round: the ratios to the ERM step of the
same round are much steadier on a shared machine than those of separate runs. Columns: the median
step and phases over the rounds, the median of the rounds' ratios, and the median number of minor
page faults of a step (memory that the allocator returned to the system and takes back, a
microsecond or two each). ``--baseline`` names a folder holding another version's ``torchjd``
package (``git archive REV src | tar -x -C DIR``, then ``DIR/src``): its workers alternate with
this version's, ``--repeats`` times each, for before/after figures from one run.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "mlp64": ("mlp", 64),
    "mlp256": ("mlp", 256),
    "cnn64": ("cnn", 64),
    "transformer32": ("transformer", 32),
    "tiny16": ("tiny", 16),
    # four objectives per sample (``--only`` names them; not run by default)
    "mlp64x4": ("mlp+4", 64),
    "cnn64x4": ("cnn+4", 64),
    "transformer32x4": ("transformer+4", 32),
}
DEFAULT_CONFIGS = [name for name, (kind, _) in CONFIGS.items() if "+" not in kind]


def build(kind: str, batch: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    kind = kind.split("+")[0]
    if kind == "tiny":  # where the engine's fixed cost per step is everything
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 10))
        x = torch.randn(batch, 10)
    elif kind == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        x = torch.randn(batch, 784)
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
        )  # fmt: skip
        x = torch.randn(batch, 3, 32, 32)
    else:

        class Encoder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.Sequential(
                    *[
                        nn.TransformerEncoderLayer(
                            128, 4, dim_feedforward=256, dropout=0.0, batch_first=True
                        )
                        for _ in range(2)
                    ]
                )
                self.head = nn.Linear(128, 10)

            def forward(self, x):
                return self.head(self.layers(x).mean(dim=1))

        model = Encoder()
        x = torch.randn(batch, 32, 128)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def setup(kind: str, batch: int, mode: str):
    """The model, data, optimiser, per-sample loss, and (except for ERM) engine and weighting."""
    import torch
    from torch import nn

    model, x, y = build(kind, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    if "+" in kind:  # several objectives per sample: the loss for as many shifted targets
        objectives = int(kind.split("+")[1])
        per_sample = loss_fn

        def loss_fn(output, target):
            shifted = [(target + k) % output.shape[1] for k in range(objectives)]
            return torch.stack([per_sample(output, t) for t in shifted], dim=1)

    engine = weighting = None
    if mode != "erm":
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine

        engine = Engine(model, batch_dim=0)
        weighting = UPGradWeighting()
    return model, x, y, optimizer, loss_fn, engine, weighting


def one_step(model, x, y, optimizer, loss_fn, engine, weighting, mode: str, now) -> list[float]:
    """One step of ``mode``; its phases' durations in ms (forward, Gramian, weighting, backward +
    optimiser step)."""
    t0 = now()
    losses = loss_fn(model(x), y)
    t1 = now()
    if mode == "erm":
        t2 = t3 = t1
        losses.mean().backward()
    elif mode == "fused":
        marks: list[float] = []

        def timed_weighting(gramian):
            marks.append(now())
            weights = weighting(gramian)
            marks.append(now())
            return weights

        engine.backward(losses, timed_weighting)
        t2, t3 = marks
    else:
        gramian = engine.compute_gramian(losses)
        t2 = now()
        weights = weighting(gramian)
        t3 = now()
        losses.backward(weights.reshape(losses.shape))
    optimizer.step()
    optimizer.zero_grad()
    t4 = now()
    return [1000 * (b - a) for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))]


def worker(kind: str, batch: int, mode: str, steps: int, threads: int, clock: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    now = time.process_time if clock == "cpu" else time.perf_counter
    model, x, y, optimizer, loss_fn, engine, weighting = setup(kind, batch, mode)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times: dict[str, list[float]] = {"forward": [], "gramian": [], "weighting": [], "backward": []}
    for _ in range(steps + 2):
        durations = one_step(model, x, y, optimizer, loss_fn, engine, weighting, mode, now)
        for key, duration in zip(times, durations, strict=True):
            times[key].append(duration)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {key: statistics.median(values[2:]) for key, values in times.items()}
    result["total"] = sum(result.values())
    result["peak_mib"] = (peak - base) / 1024
    return result


def interleaved_worker(kind: str, batch: int, steps: int, threads: int, clock: str) -> dict:
    """The three steps (each on its own copy of the model) one after the other, ``steps`` rounds
    after two warm-up rounds: per mode, the phases' durations and the ratio of the step to the ERM
    step of the same round, one entry per round."""
    import torch

    torch.set_num_threads(threads)
    now = time.process_time if clock == "cpu" else time.perf_counter
    states = {mode: setup(kind, batch, mode) for mode in MODES}
    rounds: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
    faults: dict[str, list[int]] = {mode: [] for mode in MODES}
    for _ in range(steps + 2):
        for mode in MODES:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            rounds[mode].append(one_step(*states[mode], mode, now))
            faults[mode].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    result = {}
    for mode in MODES:
        kept = rounds[mode][2:]
        ratios = [sum(d) / sum(e) for d, e in zip(kept, rounds["erm"][2:], strict=True)]
        result[mode] = {"phases": kept, "ratios": ratios, "faults": faults[mode][2:]}
    return result


MODES = ("erm", "iwrm", "fused")
PHASES = ("forward", "gramian", "weighting", "backward")


def interleaved(
    names: list[str], steps: int, threads: int, clock: str, baseline: str, repeats: int
):
    """Prints, for each configuration, the medians of the interleaved rounds of ``repeats``
    workers; with ``baseline`` (a folder holding another version's ``torchjd`` package), the
    workers of that version alternate with this one's."""
    versions = [("new", "")]
    if baseline:
        versions.insert(0, ("base", baseline))
    print(
        f"{'config':<16}{'version':<8}{'step':<7}{'ms':>8}{'xERM':>7}{'fwd':>8}{'gram':>8}"
        f"{'weight':>8}{'bwd+opt':>9}{'faults':>8}"
    )
    for name in names:
        kind, batch = CONFIGS[name]
        merged: dict[str, dict[str, list]] = {}
        for _ in range(repeats):
            for label, path in versions:
                arguments = [kind, str(batch), str(steps), str(threads), clock]
                r = run_worker(
                    sys.executable, __file__, arguments, extra_path=path, flag="--interleaved"
                )
                if r is None:
                    continue
                for mode in MODES:
                    entry = merged.setdefault(label, {}).setdefault(
                        mode, {"phases": [], "ratios": [], "faults": []}
                    )
                    for key in entry:
                        entry[key] += r[mode][key]
        for label, _ in versions:
            for mode in MODES:
                entry = merged.get(label, {}).get(mode)
                if entry is None:
                    continue
                phases = [
                    statistics.median(column) for column in zip(*entry["phases"], strict=True)
                ]
                print(
                    f"{name:<16}{label:<8}{mode:<7}{sum(phases):>8.1f}"
                    f"{statistics.median(entry['ratios']):>7.2f}"
                    + "".join(
                        f"{value:>{w}.1f}" for value, w in zip(phases, (8, 8, 8, 9), strict=True)
                    )
                    + f"{statistics.median(entry['faults']):>8.0f}",
                    flush=True,
                )


def run(
    python: str, name: str, mode: str, steps: int, threads: int, clock: str = "wall"
) -> dict | None:
    kind, batch = CONFIGS[name]
    return run_worker(python, __file__, [kind, str(batch), mode, str(steps), str(threads), clock])


def run_worker(
    python: str, script: str, arguments: list[str], extra_path: str = "", flag: str = "--worker"
) -> dict | None:
    """Runs ``script flag *arguments`` with ``python`` (from ``/``, with this folder, and
    ``extra_path`` first if given, on the path) and returns the JSON of its last line, or None
    (said) when it fails."""
    path = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [extra_path, path])))
    command = [python, script, flag, *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/")
    if completed.returncode != 0:
        print(f"  {' '.join(arguments)} failed: {completed.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument(
        "--reference-python", default=os.environ.get("TORCHJD_REFERENCE_PYTHON", "")
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time (steadier on a shared machine)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="the three steps interleaved in one process per configuration (steadier ratios)",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="with --interleave: a folder holding another version's torchjd package (e.g. "
        "an exported src/), whose workers alternate with this version's",
    )
    parser.add_argument("--repeats", type=int, default=1, help="with --interleave: workers each")
    parser.add_argument("--worker", nargs=6)
    parser.add_argument("--interleaved", nargs=5)
    args = parser.parse_args()
    if args.interleaved:
        kind, batch, steps, threads, clock = args.interleaved
        print(json.dumps(interleaved_worker(kind, int(batch), int(steps), int(threads), clock)))
        return
    if args.interleave:
        interleaved(args.only, args.steps, args.threads, args.clock, args.baseline, args.repeats)
        return
    if args.worker:
        kind, batch, mode, steps, threads, clock = args.worker
        print(json.dumps(worker(kind, int(batch), mode, int(steps), int(threads), clock)))
        return
    header = (
        f"{'config':<16}{'step':<10}{'ms':>8}{'xERM':>7}{'fwd':>8}{'gram':>8}{'weight':>8}"
        f"{'bwd+opt':>9}{'peak MiB':>10}"
    )
    print(header)
    for name in args.only:
        rows = [
            ("ERM", sys.executable, "erm"),
            ("IWRM", sys.executable, "iwrm"),
            ("fused", sys.executable, "fused"),
        ]
        if args.reference_python:
            rows.append(("IWRM 0.18", args.reference_python, "iwrm"))
        erm = None
        for label, python, mode in rows:
            r = run(python, name, mode, args.steps, args.threads, args.clock)
            if r is None:
                continue
            erm = r["total"] if mode == "erm" else erm
            ratio = r["total"] / erm if erm else float("nan")
            print(
                f"{name:<16}{label:<10}{r['total']:>8.1f}{ratio:>7.1f}{r['forward']:>8.1f}"
                f"{r['gramian']:>8.1f}{r['weighting']:>8.1f}{r['backward']:>9.1f}"
                f"{r['peak_mib']:>10.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

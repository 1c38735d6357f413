"""Peak tensor memory of one IWRM step against one ERM step and the published engine.

Usage::

    python benchmarks/autogram_memory.py [--only mlp64 ...] [--reference-python PATH]
        [--baseline OTHER/src]

Same models and steps as ``benchmarks/autogram_step.py`` (ERM: mean loss, backward, SGD step;
IWRM: ``Engine.compute_gramian``, ``UPGradWeighting``, ``losses.backward(weights)``, SGD step;
fused: ``Engine.backward(losses, weighting)``; IWRM 0.18: the same IWRM step with the published
``torchjd==0.18.0``, run by the interpreter of its own virtualenv).

Unlike the resident set size (which also counts the allocator's caches and the library code paged
in), this counts the bytes that the CPU allocator holds: the profiler's allocation events (with
``profile_memory=True``) carry the allocator's running total, so every allocation counts, those
inside an operator too (oneDNN's reorders, a convolution's temporaries). A ``TorchDispatchMode``
that tracks the storages that operators return (this benchmark's former measure) misses those, and
changes what it measures: while a mode is active, autograd accumulates the gradients of a tensor
used several times out of place (``old + new``, not ``old.add_(new)``), which added 3 MiB to
transformer32's Gramian pass (the gradients of MultiheadAttention's packed q/k/v projection).
Each step starts with ``.grad`` set to None, so every figure includes the parameter gradients.
Columns (KiB, above the level at the start of the step, after two warm-up steps): the live bytes
after the forward pass (the activations that autograd keeps, plus the losses); ``kept``, the
tensors that the engine keeps from step to step (its rules' workspaces, e.g. the per-sample
gradients of a fused step's Transformer layers), which exist before the step and are added to its
peak; the peak over the step; ``extra`` is the step's peak minus the ERM step's peak and ``/ act``
that extra divided by the ERM step's activations; then the peak of each phase (forward; Gramian;
weighting; weighted backward, or the fused step's gradients, and the optimiser step).
"""

import argparse
import json
import os
import sys

from autogram_step import CONFIGS, DEFAULT_CONFIGS, run_worker, setup

PHASES = ("forward", "gramian", "weighting", "backward")
MODES = (("IWRM", "iwrm"), ("fused", "fused"))


def worker(kind: str, batch: int, mode: str) -> dict:
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import profile, record_function

    torch.set_num_threads(1)
    model, x, y, optimizer, loss_fn, engine, weighting = setup(kind, batch, mode)

    def step() -> None:
        def timed_weighting(gramian):
            with record_function("phase:weighting"):
                return weighting(gramian)

        with record_function("phase:forward"):
            losses = loss_fn(model(x), y)
        with record_function("phase:gramian"):
            if mode == "fused":
                engine.backward(losses, timed_weighting)
            elif mode == "iwrm":
                weights = timed_weighting(engine.compute_gramian(losses))
        with record_function("phase:backward"):
            if mode == "erm":
                losses.mean().backward()
            elif mode == "iwrm":
                losses.backward(weights.reshape(losses.shape))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del losses

    for _ in range(2):
        step()
    with profile(profile_memory=True) as prof:
        step()
    # the allocator's running total at each allocation and free, and the phases' time ranges
    events, ranges = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif node.name.startswith("phase:"):
            ranges[node.name[6:]] = (node.start_time_ns, node.end_time_ns)
    events.sort()
    start = events[0][1] - events[0][2]  # the total before the step's first allocation
    result = dict.fromkeys(PHASES, 0.0)
    live = start
    for time, total, _ in events:
        if time > ranges["forward"][1] and "activations" not in result:
            result["activations"] = (live - start) / 1024
        live = total
        for phase, (begin, end) in ranges.items():
            if begin <= time <= end and phase in result:
                # a nested phase (the weighting, inside the fused step) takes its own events
                inner = [
                    p for p, (b, e) in ranges.items() if p != phase and begin <= b <= time <= e
                ]
                if not inner:
                    result[phase] = max(result[phase], (total - start) / 1024)
    result["kept"] = _kept_bytes(engine) / 1024
    result["peak"] = max(result[phase] for phase in PHASES) + result["kept"]
    return result


def _kept_bytes(engine) -> int:
    """The bytes of the tensors that an engine keeps from step to step (its rules' workspaces,
    e.g. a fused step's per-sample gradients formed in place), which exist before the step begins
    and so escape the count of the tensors that it creates; 0 for an engine without them (the
    published one, ERM)."""
    workspaces = getattr(engine, "_workspaces", None)
    buffers = getattr(workspaces, "_buffers", {})
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage() for b in buffers.values()}
    return sum(storage.nbytes() for storage in storages.values())


def run(python: str, name: str, mode: str, extra_path: str = "") -> dict | None:
    kind, batch = CONFIGS[name]
    return run_worker(python, __file__, [kind, str(batch), mode], extra_path=extra_path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument(
        "--reference-python", default=os.environ.get("TORCHJD_REFERENCE_PYTHON", "")
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="a folder holding another version's torchjd package (e.g. an exported src/): its "
        "IWRM and fused rows come first, marked 'base'",
    )
    parser.add_argument("--worker", nargs=3)
    args = parser.parse_args()
    if args.worker:
        kind, batch, mode = args.worker
        print(json.dumps(worker(kind, int(batch), mode)))
        return
    header = f"{'config':<16}{'step':<12}{'act KiB':>10}{'kept KiB':>10}{'peak KiB':>10}"
    header += f"{'extra':>9}{'/ act':>7}"
    header += "".join(f"{phase:>10}" for phase in ("fwd", "gram", "weight", "bwd+opt"))
    print(header)
    variants = [("ERM", sys.executable, "erm", "")]
    if args.baseline:
        variants += [
            (f"{label} base", sys.executable, mode, args.baseline) for label, mode in MODES
        ]
    variants += [(label, sys.executable, mode, "") for label, mode in MODES]
    if args.reference_python:
        variants.append(("IWRM 0.18", args.reference_python, "iwrm", ""))
    for name in args.only:
        erm = None
        for label, python, mode, path in variants:
            result = run(python, name, mode, path)
            if result is None:
                continue
            if mode == "erm":
                erm = result
            extra = result["peak"] - erm["peak"] if erm else float("nan")
            activations = erm["activations"] if erm else float("nan")
            print(
                f"{name:<16}{label:<12}{result['activations']:>10.0f}"
                f"{result.get('kept', 0.0):>10.0f}{result['peak']:>10.0f}"
                f"{extra:>9.0f}{extra / activations:>7.2f}"
                + "".join(f"{result[phase]:>10.0f}" for phase in PHASES),
                flush=True,
            )


if __name__ == "__main__":
    main()

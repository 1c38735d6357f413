"""Peak tensor memory of one IWRM step against one ERM step and the published engine.

Usage::

    python benchmarks/autogram_memory.py [--only mlp64 ...] [--reference-python PATH]
        [--baseline OTHER/src]

Same models and steps as ``benchmarks/autogram_step.py`` (ERM: mean loss, backward, SGD step;
IWRM: ``Engine.compute_gramian``, ``UPGradWeighting``, ``losses.backward(weights)``, SGD step;
fused: ``Engine.backward(losses, weighting)``; IWRM 0.18: the same IWRM step with the published
``torchjd==0.18.0``, run by the interpreter of its own virtualenv).

Unlike the resident set size (which also counts the allocator's caches and the library code paged
in), this counts the bytes of live tensor storages: a ``TorchDispatchMode`` sees every tensor that
an operator returns, adds its storage's size the first time it sees that storage (unless an input
holds it: views and in-place results), and a finalizer on the storage subtracts it when the
storage is freed. Each step starts with ``.grad`` set to None,
so every figure includes the parameter gradients. Columns (KiB, above the level at the start of the
step, after two warm-up steps): the live bytes after the forward pass (the activations that
autograd keeps, plus the losses); ``kept``, the tensors that the engine keeps from step to step
(its rules' workspaces, e.g. the per-sample gradients of a fused step's Transformer layers), which
exist before the step and are added to its peak; the peak over the step; ``extra`` is the step's
peak minus the ERM step's peak and ``/ act`` that extra divided by the ERM step's activations;
then the peak of each phase (forward; Gramian; weighting; weighted backward, or the fused step's
gradients, and the optimiser step).
"""

import argparse
import json
import os
import sys
import weakref

from autogram_step import CONFIGS, DEFAULT_CONFIGS, run_worker, setup

PHASES = ("forward", "gramian", "weighting", "backward")
MODES = (("IWRM", "iwrm"), ("fused", "fused"))


def worker(kind: str, batch: int, mode: str) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0
            self.seen: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {
                id(value.untyped_storage())
                for value in tree_flatten((args, kwargs))[0]
                if isinstance(value, torch.Tensor)
            }
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    storage = value.untyped_storage()
                    if id(storage) not in inputs:  # not a view of, or in place on, an input
                        self._track(storage)
            return out

        def _track(self, storage) -> None:
            key = id(storage)
            if key in self.seen:
                return
            self.seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())

        def _free(self, key: int, nbytes: int) -> None:
            self.seen.discard(key)
            self.live -= nbytes

    torch.set_num_threads(1)
    model, x, y, optimizer, loss_fn, engine, weighting = setup(kind, batch, mode)

    def step(tracker: LiveBytes | None) -> dict[str, float]:
        peaks: dict[str, float] = {}
        start = 0 if tracker is None else tracker.live

        def mark(phase: str) -> None:  # the peak of the phase that ends here
            if tracker is not None:
                peaks[phase] = (tracker.peak - start) / 1024
                peaks[phase + " end"] = (tracker.live - start) / 1024
                tracker.peak = tracker.live

        def timed_weighting(gramian):
            mark("gramian")
            weights = weighting(gramian)
            mark("weighting")
            return weights

        losses = loss_fn(model(x), y)
        mark("forward")
        if mode == "erm":
            mark("gramian")
            mark("weighting")
            losses.mean().backward()
        elif mode == "fused":
            engine.backward(losses, timed_weighting)
        else:
            losses.backward(timed_weighting(engine.compute_gramian(losses)).reshape(losses.shape))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("backward")
        return peaks

    for _ in range(2):
        step(None)
    tracker = LiveBytes()
    with tracker:
        peaks = step(tracker)
    result = {phase: peaks[phase] for phase in PHASES}
    result["activations"] = peaks["forward end"]
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

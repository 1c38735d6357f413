"""The ``torchjd`` command (``torchjd demo``, or ``python -m torchjd demo``).

Kept light: only the standard library is imported here; the demo's dependencies (the ``demo``
extra: scikit-learn, matplotlib, tqdm) are imported when the demo runs.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import TypeVar

_N = TypeVar("_N", int, float)
_PREFERRED_AGGREGATORS = ("Mean", "UPGrad", "MGDA", "PCGrad")
_EXTRA_HINT = 'the demo needs the "demo" extra: pip install "torchjd[demo]"'


def _aggregator_classes() -> dict[str, type]:
    """The aggregators of ``torchjd.aggregation`` that can be built without arguments, by name
    (found at run time, so that every aggregator added to the package is available)."""
    import inspect

    import torchjd.aggregation as aggregation

    classes = {}
    for name in aggregation.__all__:
        cls = getattr(aggregation, name)
        if (
            inspect.isclass(cls)
            and issubclass(cls, aggregation.Aggregator)
            and not inspect.isabstract(cls)
            and name not in {"Aggregator", "WeightedAggregator", "GramianWeightedAggregator"}
        ):
            required = [
                p
                for p in inspect.signature(cls).parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            if not required:
                classes[name] = cls
    return classes


def default_aggregators() -> tuple[str, ...]:
    available = _aggregator_classes()
    return tuple(name for name in _PREFERRED_AGGREGATORS if name in available)


def _aggregator_names(text: str) -> list[str]:
    available = _aggregator_classes()
    by_lower = {name.lower(): name for name in available}
    names = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        if token.lower() not in by_lower:
            raise argparse.ArgumentTypeError(
                f"unknown aggregator {token!r}; expected names among those of "
                f"torchjd.aggregation that need no arguments: {', '.join(sorted(available))}"
            )
        names.append(by_lower[token.lower()])
    if not names:
        raise argparse.ArgumentTypeError("expected at least one aggregator name")
    return names


def _converted(text: str, convert: Callable[[str], _N], expected: str) -> _N:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _converted(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _converted(text, float, "a positive number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _seed(text: str) -> int:
    value = _converted(text, int, "an integer")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser of the command line, and that of its ``demo`` command."""
    parser = argparse.ArgumentParser(prog="torchjd", description="torchjd: Jacobian descent.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train on scikit-learn's digits with ERM and Jacobian descent, and compare",
        description=(
            "Trains one small network with ERM + SGD and with instance-wise risk minimisation "
            "(UPGrad, through autojac and through autogram), then a multi-task network under "
            "several aggregators, all from the same seed on the same batches; prints a table per "
            "part and saves a figure of the loss curves. Needs the demo extra: "
            'pip install "torchjd[demo]".'
        ),
    )
    demo.add_argument("--epochs", type=_positive_int, help="epochs per run (default 8; 1 quick)")
    demo.add_argument("--batch-size", type=_positive_int, default=32, help="(default 32)")
    demo.add_argument("--lr", type=_positive_float, default=0.1, help="SGD step (default 0.1)")
    demo.add_argument("--seed", type=_seed, default=0, help="(default 0)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default cpu)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("torchjd-demo"),
        help="folder of the figure demo.png and the tables results.md (default ./torchjd-demo)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a few seconds: 256 training images, 1 epoch"
    )
    demo.add_argument(
        "--aggregators",
        type=_aggregator_names,
        action="extend",
        metavar="NAMES",
        help="comma-separated aggregators of the multi-task part (default: "
        + ",".join(default_aggregators())
        + ")",
    )
    return parser, demo


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (``sys.argv[1:]`` when None); returns the exit status.
    Bad arguments raise :class:`SystemExit` (status 2) with the reason on stderr."""
    parser, demo_parser = _parsers()
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            demo_parser.error(
                "argument --device: cuda is not available (torch was built without CUDA, or no "
                "GPU is visible); use --device cpu"
            )
    if args.out.exists() and not args.out.is_dir():
        demo_parser.error(f"argument --out: {str(args.out)!r} exists and is not a folder")
    missing = [name for name in ("sklearn", "matplotlib", "tqdm") if find_spec(name) is None]
    if missing:
        print(f"torchjd demo: {', '.join(missing)} not found; {_EXTRA_HINT}", file=sys.stderr)
        return 1
    from torchjd._demo import DemoConfig, run_demo
    from torchjd._demo._report import figure, report

    config = DemoConfig(
        epochs=args.epochs or (1 if args.quick else 8),
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        out=args.out,
        quick=args.quick,
        aggregators=tuple(args.aggregators or default_aggregators()),
    )
    try:
        result = run_demo(config)
    except KeyboardInterrupt:  # while loading the data, before the first run started
        print("interrupted (Ctrl-C) before any run finished", file=sys.stderr)
        return 130
    text = report(result)
    print(text)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "results.md").write_text(text)
    png = config.out / "demo.png"
    if result.runs:
        figure(result, png)
        print(f"figure: {png}")
    print(f"tables: {config.out / 'results.md'}")
    if result.interrupted:
        print("interrupted (Ctrl-C): the tables show the runs finished before it", file=sys.stderr)
        return 130
    return 0

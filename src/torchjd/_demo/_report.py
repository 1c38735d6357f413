"""The demo's report: one markdown table per part, and a figure of the loss curves."""

from pathlib import Path

from torchjd._demo._data import TASKS
from torchjd._demo._memory import MEMORY_NOTE
from torchjd._demo._runner import DemoResult, RunResult


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _common(run: RunResult) -> list[str]:
    return [
        f"{100 * run.share_increased:.0f} %",
        f"{run.ms_per_step:.1f}",
        f"{run.peak_mib:.1f}",
    ]


_COMMON_HEADER = ["steps with a loss up", "ms/step", "peak MiB"]


def instance_wise_table(runs: list[RunResult]) -> str:
    header = ["method", "train acc", "train loss", "test acc", "test loss", "test worst 10 %"]
    rows = []
    for run in runs:
        train, test = run.train[-1], run.test[-1]
        rows.append(
            [
                run.name,
                f"{100 * train.accuracies[0]:.1f} %",
                f"{train.loss:.4f}",
                f"{100 * test.accuracies[0]:.1f} %",
                f"{test.loss:.4f}",
                f"{test.worst_decile:.4f}",
                *_common(run),
            ]
        )
    return _table(header + _COMMON_HEADER, rows)


def multi_task_table(runs: list[RunResult]) -> str:
    header = [
        "aggregator",
        *(f"test acc {task}" for task in TASKS),
        "train loss",
        "test loss",
        "test worst 10 %",
    ]
    rows = []
    for run in runs:
        train, test = run.train[-1], run.test[-1]
        rows.append(
            [
                run.name,
                *(f"{100 * a:.1f} %" for a in test.accuracies),
                f"{train.loss:.4f}",
                f"{test.loss:.4f}",
                f"{test.worst_decile:.4f}",
                *_common(run),
            ]
        )
    return _table(header + _COMMON_HEADER, rows)


def report(result: DemoResult) -> str:
    """The tables of the finished runs, in markdown, with what their columns mean."""
    parts = []
    for part, title, table in [
        (
            "instance-wise",
            "Instance-wise risk minimisation (one objective per sample)",
            instance_wise_table,
        ),
        ("multi-task", "Multi-task learning (one objective per task)", multi_task_table),
    ]:
        runs = [run for run in result.runs if run.part == part]
        if runs:
            parts.append(f"### {title}\n\n{table(runs)}")
    parts.append(
        f"{result.train_size} training and {result.test_size} test images. Losses are "
        "cross-entropies (summed over the tasks in the multi-task part); worst 10 %: the mean of "
        "the largest tenth of the per-sample losses; steps with a loss up: the share of steps "
        "after which some objective of the batch (a sample's loss, or a task's loss) was higher "
        "when evaluated again on the same batch; ms/step: median wall time of a step; "
        f"{MEMORY_NOTE}."
    )
    return "\n\n".join(parts) + "\n"


_MARKERS = "o+x^sdv*"


def _style(k: int, n: int) -> dict:
    """Run ``k`` of ``n``: equal curves (autojac and autogram make the same steps) stay visible,
    the earlier drawn thicker under the later."""
    return {
        "color": f"C{k}",
        "marker": _MARKERS[k % len(_MARKERS)],
        "markersize": 4,
        "linewidth": 1.2 + 1.5 * (n - 1 - k),
        "alpha": 0.85,
    }


def figure(result: DemoResult, path: Path) -> None:
    """Loss curves per epoch: the instance-wise part (mean and worst-decile training loss), then
    one panel per task of the multi-task part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    mtl = [run for run in result.runs if run.part == "multi-task"]
    iw = [run for run in result.runs if run.part == "instance-wise"]
    n_panels = 1 + (len(TASKS) if mtl else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    for k, run in enumerate(iw):
        style = _style(k, len(iw))
        ax.plot([m.loss for m in run.train], label=run.name, **style)
        ax.plot([m.worst_decile for m in run.train], linestyle="--", **style)
    ax.set(title="instance-wise: train loss\n(dashed: worst 10 %)", xlabel="epoch", yscale="log")
    ax.legend(fontsize=7)
    for t, task in enumerate(TASKS if mtl else ()):
        ax = axes[0, 1 + t]
        for k, run in enumerate(mtl):
            style = _style(k, len(mtl))
            ax.plot([m.task_losses[t] for m in run.train], label=run.name, **style)
            ax.plot([m.task_losses[t] for m in run.test], linestyle=":", **style)
        ax.set(title=f"multi-task: {task}\n(dotted: test)", xlabel="epoch", yscale="log")
        ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The ``torchjd demo`` command: its report on a quick run, its refusals, Ctrl-C."""

import contextlib
import io
import math
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import torchjd._cli
import torchjd._demo._memory as memory
import torchjd._demo._runner as runner
from torchjd._cli import default_aggregators, main


def _rows(text: str, title: str) -> dict[str, dict[str, str]]:
    """The rows of the markdown table under ``title``, by their first cell, as column → cell."""
    lines = text[text.index(title) :].splitlines()[2:]
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, rows = table[0], table[2:]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def _number(cell: str) -> float:
    return float(cell.removesuffix("%").strip())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,  # keep glibc's defaults for the rest of the suite
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        patch.setattr(memory, "_map_large_allocations", lambda: None)
        torch.manual_seed(1)  # the demo must not depend on the global seed
        status = main(["demo", "--quick", "--out", str(out)])
    return status, stdout.getvalue(), out


def test_quick_demo_instance_wise_table(quick_run: tuple[int, str, Path]):
    status, text, _ = quick_run
    assert status == 0
    rows = _rows(text, "### Instance-wise")
    erm, autojac = rows["ERM + SGD"], rows["IWRM, autojac + UPGrad"]
    autogram = rows["IWRM, autogram + UPGradWeighting"]
    assert len(rows) == 3
    for row in rows.values():
        assert 0 <= _number(row["train acc"]) <= 100
        assert 0 <= _number(row["steps with a loss up"]) <= 100
        assert _number(row["ms/step"]) > 0
        # one epoch already beats the initial loss (about log 10 for 10 balanced classes)
        assert _number(row["train loss"]) < math.log(10)
        assert _number(row["test worst 10 %"]) >= _number(row["test loss"])
    # autojac + UPGrad and autogram + UPGradWeighting make the same steps
    for column in ["train loss", "test loss", "test worst 10 %"]:
        assert _number(autojac[column]) == pytest.approx(_number(autogram[column]), abs=2e-3)
    assert erm["train loss"] != autojac["train loss"]


def test_quick_demo_multi_task_table(quick_run: tuple[int, str, Path]):
    _, text, _ = quick_run
    rows = _rows(text, "### Multi-task")
    assert list(rows) == list(default_aggregators())
    assert {"Mean", "UPGrad", "MGDA"} <= set(rows)
    for row in rows.values():
        for task in ["digit", "parity", "digit >= 5"]:
            assert 0 <= _number(row[f"test acc {task}"]) <= 100
        # three tasks: the summed loss starts near log 10 + 2 log 2
        assert 0 < _number(row["train loss"]) < math.log(10) + 2 * math.log(2)


def test_quick_demo_files(quick_run: tuple[int, str, Path]):
    _, text, out = quick_run
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert f"figure: {png}" in text
    assert (out / "results.md").read_text() in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs: expected a positive integer, got 0"),
        (["--epochs", "two"], "--epochs: expected a positive integer, got 'two'"),
        (["--batch-size", "-3"], "--batch-size: expected a positive integer, got -3"),
        (["--lr", "0"], "--lr: expected a positive finite number, got 0"),
        (["--lr", "nan"], "--lr: expected a positive finite number"),
        (["--seed", "-1"], r"--seed: expected an integer in \[0, 2\*\*63\)"),
        (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
        (["--aggregators", "Nope"], "unknown aggregator 'Nope'; expected names among"),
        (["--aggregators", "Constant"], "unknown aggregator 'Constant'"),  # needs arguments
        (["--aggregators", ","], "expected at least one aggregator name"),
    ],
)
def test_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: torchjd demo" in err
    assert err.count("error:") == 1
    assert re.search(message, err), err


def test_unavailable_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])
    assert "--device: cuda is not available" in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(file)])
    assert "exists and is not a folder" in capsys.readouterr().err


def test_missing_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    real_find_spec = torchjd._cli.find_spec
    monkeypatch.setattr(
        torchjd._cli, "find_spec", lambda name: None if name == "sklearn" else real_find_spec(name)
    )
    assert main(["demo", "--quick"]) == 1
    assert 'sklearn not found; the demo needs the "demo" extra' in capsys.readouterr().err


def test_aggregators_are_case_insensitive_and_comma_separated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
):
    seen = []

    def fake_run(config: object) -> runner.DemoResult:
        seen.append(config)
        return runner.DemoResult([], interrupted=False, train_size=0, test_size=0)

    monkeypatch.setattr("torchjd._demo.run_demo", fake_run)
    assert main(["demo", "--aggregators", "upgrad,MEAN", "--out", str(tmp_path)]) == 0
    assert seen[0].aggregators == ("UPGrad", "Mean")


def test_ctrl_c_prints_the_finished_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
):
    real_train = runner._train
    calls = []

    def interrupted_train(*args: object) -> runner.RunResult:
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args)

    monkeypatch.setattr(runner, "_train", interrupted_train)
    monkeypatch.setattr(memory, "_map_large_allocations", lambda: None)
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 130
    assert torch.get_num_threads() == threads  # restored
    captured = capsys.readouterr()
    rows = _rows(captured.out, "### Instance-wise")
    assert list(rows) == ["ERM + SGD"]
    assert "Multi-task" not in captured.out
    assert "interrupted" in captured.err
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_entry_points():
    (script,) = entry_points(group="console_scripts", name="torchjd")
    assert script.load() is main
    # python -m torchjd, and the light import: no demo dependency before the demo runs (tqdm is
    # not checked: torch itself imports it when it is installed)
    code = (
        "import sys, runpy; sys.argv = ['torchjd', 'demo', '--epochs', '0']\n"
        "try: runpy.run_module('torchjd', run_name='__main__')\n"
        "except SystemExit as e: print(e.code, any(m.split('.')[0] in sys.modules "
        "for m in ['sklearn', 'matplotlib']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "False"]
    assert "--epochs: expected a positive integer" in done.stderr

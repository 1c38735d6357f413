"""The public surface: names, version, typing marker."""

import subprocess
import sys
from importlib import resources

import torchjd
import torchjd.aggregation
import torchjd.autogram
import torchjd.autojac
import torchjd.distributed
import torchjd.linalg
import torchjd.scalarization


def test_version():
    assert isinstance(torchjd.__version__, str)
    assert torchjd.__version__[0].isdigit()


def test_py_typed_is_shipped():
    assert resources.files("torchjd").joinpath("py.typed").is_file()


def test_every_public_name_exists():
    for module in [
        torchjd,
        torchjd.aggregation,
        torchjd.linalg,
        torchjd.autojac,
        torchjd.autogram,
        torchjd.scalarization,
        torchjd.distributed,
    ]:
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_foundation_names():
    assert {"Stateful"} <= set(torchjd.__all__)
    expected = {
        "Aggregator", "Weighting", "WeightedAggregator", "GramianWeightedAggregator",
        "UPGrad", "UPGradWeighting", "DualProj", "DualProjWeighting", "MGDA", "MGDAWeighting",
        "Mean", "MeanWeighting", "Sum", "SumWeighting", "Constant", "ConstantWeighting",
        "Random", "RandomWeighting",
    }  # fmt: skip
    assert expected <= set(torchjd.aggregation.__all__)
    assert {"Matrix", "PSDMatrix", "DualConeProjector"} <= set(torchjd.linalg.__all__)


def test_autojac_names():
    assert {"backward", "jac", "mtl_backward", "jac_to_grad"} <= set(torchjd.autojac.__all__)


def test_autogram_names():
    assert {"Engine", "register_rule"} <= set(torchjd.autogram.__all__)


def test_beyond_the_published_api_names():
    expected = {
        "GeneralizedWeighting", "Flattening", "Normalized", "MoCo", "GradNorm",
        "GradNormWeighting", "DBMTL",
    }  # fmt: skip
    assert expected <= set(torchjd.aggregation.__all__)
    for name in ["MoCo", "GradNorm", "GradNormWeighting", "DBMTL"]:
        assert issubclass(getattr(torchjd.aggregation, name), torchjd.Stateful), name


def test_scalarization_names():
    expected = {
        "Scalarizer", "Constant", "COSMOS", "DWA", "FAMO", "GeometricMean", "IMTLL", "Mean", "PBI",
        "Random", "STCH", "Sum", "UW",
    }  # fmt: skip
    assert set(torchjd.scalarization.__all__) == expected
    stateful = {"DWA", "FAMO", "IMTLL", "UW"}
    for name in expected - {"Scalarizer"}:
        cls = getattr(torchjd.scalarization, name)
        assert issubclass(cls, torchjd.scalarization.Scalarizer)
        assert issubclass(cls, torchjd.Stateful) == (name in stateful), name


def test_stateful_is_abstract():
    class Counter(torchjd.Stateful):
        def __init__(self) -> None:
            self.count = 3

        def reset(self) -> None:
            self.count = 0

    counter = Counter()
    counter.reset()
    assert counter.count == 0


def test_distributed_names():
    expected = {
        "jac_to_grad",
        "average_grads",
        "compute_gramian",
        "local_weights",
        "sharded_jac_to_grad",
    }
    assert expected <= set(torchjd.distributed.__all__)


def test_subpackages_are_attributes_of_a_plain_import():
    """``import torchjd`` alone gives ``torchjd.autojac`` and the other subpackages (as the
    published package does for some of them), each imported on first use; a fresh interpreter,
    since this file's imports already made them attributes."""
    code = """
import sys
import torchjd
names = ["aggregation", "autogram", "autojac", "distributed", "linalg", "scalarization"]
assert not any(f"torchjd.{n}" in sys.modules for n in names), "imported eagerly"
assert set(names) <= set(dir(torchjd))
assert callable(torchjd.autojac.backward) and callable(torchjd.autogram.Engine)
assert torchjd.aggregation.UPGrad.__module__.startswith("torchjd.aggregation")
for n in names:
    assert getattr(torchjd, n) is sys.modules[f"torchjd.{n}"]
try:
    torchjd.not_a_subpackage
except AttributeError as error:
    assert "not_a_subpackage" in str(error)
else:
    raise AssertionError("no AttributeError")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

"""The hyperparameters of the aggregators and weightings are properties, read and set.

For every class and hyperparameter: the property returns the value given to the constructor; after
a set, the object computes what an object built with that value computes (bitwise, float64); an
invalid value raises as the constructor does and changes nothing; an aggregator keeps no copy of
its weighting's hyperparameters. Stateful methods keep their state when a hyperparameter is set
(as the published library does), except NashMTL when ``n_tasks`` changes.
"""

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import torchjd.aggregation as agg
from torchjd import Stateful
from torchjd._properties import Hyperparameter
from torchjd.linalg import QuadprogProjector, TorchProjector
from torchjd.scalarization import GeometricMean, Scalarizer
from torchjd.scalarization import Mean as MeanScalarizer
from torchjd.scalarization import Random as RandomScalarizer
from torchjd.scalarization import Sum as SumScalarizer

M, N = 5, 7
F64 = torch.float64


def vector(*values: float) -> Tensor:
    return torch.tensor(values, dtype=F64)


P = vector(0.1, 0.4, 0.2, 0.2, 0.1)
Q = vector(0.3, 0.1, 0.2, 0.3, 0.1)

# class, constructor arguments (besides the one tested), kind of input: "matrix" (J), "gramian"
# (J Jᵀ) or "square" (J₁ J₂ᵀ of two mini-batches)
CLASSES: dict[str, tuple[type, dict[str, Any], str]] = {
    "AlignedMTL": (agg.AlignedMTL, {}, "matrix"),
    "AlignedMTLWeighting": (agg.AlignedMTLWeighting, {}, "gramian"),
    "CAGrad": (agg.CAGrad, {"c": 0.5}, "matrix"),
    "CAGradWeighting": (agg.CAGradWeighting, {"c": 0.5}, "gramian"),
    "ConFIG": (agg.ConFIG, {}, "matrix"),
    "DualProj": (agg.DualProj, {}, "matrix"),
    "DualProjWeighting": (agg.DualProjWeighting, {}, "gramian"),
    "ExcessMTL": (agg.ExcessMTL, {"n_warmup_steps": 1}, "matrix"),
    "ExcessMTLWeighting": (agg.ExcessMTLWeighting, {"n_warmup_steps": 1}, "matrix"),
    "FairGrad": (agg.FairGrad, {"alpha": 1.0}, "matrix"),
    "FairGradWeighting": (agg.FairGradWeighting, {"alpha": 1.0}, "gramian"),
    "GradDrop": (agg.GradDrop, {}, "matrix"),
    "GradVac": (agg.GradVac, {}, "matrix"),
    "GradVacWeighting": (agg.GradVacWeighting, {}, "gramian"),
    "Krum": (agg.Krum, {"n_byzantine": 1}, "matrix"),
    "KrumWeighting": (agg.KrumWeighting, {"n_byzantine": 1}, "gramian"),
    "MGDA": (agg.MGDA, {}, "matrix"),
    "MGDAWeighting": (agg.MGDAWeighting, {}, "gramian"),
    "MoDoWeighting": (agg.MoDoWeighting, {}, "square"),
    "NashMTL": (agg.NashMTL, {"n_tasks": M, "update_weights_every": 3}, "matrix"),
    "PCD": (agg.PCD, {"tau": 0.3}, "matrix"),
    "PCDWeighting": (agg.PCDWeighting, {"tau": 0.3}, "gramian"),
    "SDMGradWeighting": (agg.SDMGradWeighting, {"lr": 0.5, "n_iter": 2}, "square"),
    "TrimmedMean": (agg.TrimmedMean, {"trim_number": 1}, "matrix"),
    "UPGrad": (agg.UPGrad, {}, "matrix"),
    "UPGradWeighting": (agg.UPGradWeighting, {}, "gramian"),
    # not in the published library: for a uniform interface
    "DBMTL": (agg.DBMTL, {}, "matrix"),
    "MoCo": (agg.MoCo, {}, "matrix"),
    "GradNorm": (agg.GradNorm, {"lr": 0.05}, "matrix"),
    "GradNormWeighting": (agg.GradNormWeighting, {}, "gramian"),
    "CRMOGMWeighting": (agg.CRMOGMWeighting, {"weighting": agg.UPGradWeighting()}, "gramian"),
}


# class name, property, a value other than the one of CLASSES (or the default)
def _projection_rows(name: str) -> list[tuple[str, str, Any]]:
    """The rows of an aggregator of projections (UPGrad, DualProj) and of its weighting."""
    return [
        (name, "pref_vector", P),
        (name, "projector", QuadprogProjector(reg_eps=1e-5)),
        (name + "Weighting", "pref_vector", P),
        (name + "Weighting", "projector", TorchProjector(norm_eps=0.0, reg_eps=0.0)),
    ]


VALUES: list[tuple[str, str, Any]] = [
    ("AlignedMTL", "pref_vector", P),
    ("AlignedMTL", "scale_mode", "rmse"),
    ("AlignedMTLWeighting", "pref_vector", -P),
    ("AlignedMTLWeighting", "scale_mode", "median"),
    ("CAGrad", "c", 2.0),
    ("CAGrad", "norm_eps", 1e3),
    ("CAGradWeighting", "c", 0.0),
    ("CAGradWeighting", "norm_eps", 1e3),
    ("ConFIG", "pref_vector", P),
    *_projection_rows("DualProj"),
    ("ExcessMTL", "robust_step_size", 0.3),
    ("ExcessMTL", "n_warmup_steps", 0),
    ("ExcessMTLWeighting", "robust_step_size", 3.0),
    ("ExcessMTLWeighting", "n_warmup_steps", 2),
    ("FairGrad", "alpha", 2.0),
    ("FairGrad", "max_iters", 1),
    ("FairGradWeighting", "alpha", 0.5),
    ("FairGradWeighting", "max_iters", 2),
    ("GradDrop", "leak", P),
    ("GradDrop", "f", torch.sqrt),
    ("GradVac", "beta", 0.9),
    ("GradVac", "eps", 10.0),
    ("GradVacWeighting", "beta", 0.0),
    ("GradVacWeighting", "eps", 10.0),
    ("Krum", "n_byzantine", 2),
    ("Krum", "n_selected", 2),
    ("KrumWeighting", "n_byzantine", 0),
    ("KrumWeighting", "n_selected", 3),
    ("MGDA", "epsilon", 0.2),
    ("MGDA", "max_iters", 1),
    ("MGDAWeighting", "epsilon", 0.2),
    ("MGDAWeighting", "max_iters", 2),
    ("MoDoWeighting", "gamma", 0.5),
    ("MoDoWeighting", "rho", 2.0),
    ("NashMTL", "max_norm", 0.5),
    ("NashMTL", "update_weights_every", 1),
    ("NashMTL", "optim_niter", 1),
    ("NashMTL", "n_tasks", M),
    ("PCD", "tau", vector(0.1, 0.7, 0.0, 0.5)),
    ("PCD", "beta", 0.5),
    ("PCD", "eps", 10.0),
    ("PCDWeighting", "tau", 0.8),
    ("PCDWeighting", "beta", 0.0),
    ("PCDWeighting", "eps", 10.0),
    ("SDMGradWeighting", "lr", 5.0),
    ("SDMGradWeighting", "momentum", 0.9),
    ("SDMGradWeighting", "n_iter", 3),
    ("SDMGradWeighting", "lambda_", 2.0),
    ("SDMGradWeighting", "pref_vector", P),
    ("TrimmedMean", "trim_number", 2),
    *_projection_rows("UPGrad"),
    ("DBMTL", "beta", 0.5),
    ("DBMTL", "beta_sigma", 1.0),
    ("MoCo", "beta", 0.9),
    ("MoCo", "beta_sigma", 0.0),
    ("MoCo", "gamma", 0.5),
    ("MoCo", "gamma_sigma", 0.0),
    ("MoCo", "rho", 1.0),
    ("GradNorm", "alpha", 0.5),
    ("GradNorm", "lr", 0.5),
    ("GradNormWeighting", "alpha", 0.0),
    ("GradNormWeighting", "lr", 1.0),
    ("CRMOGMWeighting", "alpha", 0.2),
    ("CRMOGMWeighting", "initial_weights", -P),
]

NAMES = sorted({(name, prop) for name, prop, _ in VALUES})

_NOT_INT = "must be an int"
_NOT_FLOAT = "must be a float"
_NOT_TENSOR = "must be a 1-D torch.Tensor"

# class name, property, an invalid value, the exception (that of the constructor), its message
INVALID: list[tuple[str, str, Any, type[Exception], str]] = [
    ("AlignedMTL", "pref_vector", torch.ones(M, M, dtype=F64), ValueError, "must be a vector"),
    ("AlignedMTL", "pref_vector", 1.0, TypeError, _NOT_TENSOR),
    ("AlignedMTL", "scale_mode", "max", ValueError, "must be one of"),
    ("AlignedMTLWeighting", "pref_vector", vector(math.nan, 1.0), ValueError, "finite"),
    ("AlignedMTLWeighting", "scale_mode", None, ValueError, "must be one of"),
    ("CAGrad", "c", -1.0, ValueError, "must be non-negative"),
    ("CAGrad", "norm_eps", "small", TypeError, _NOT_FLOAT),
    ("CAGradWeighting", "c", math.nan, ValueError, "must be non-negative"),
    ("CAGradWeighting", "norm_eps", -1e-3, ValueError, "must be non-negative"),
    ("ConFIG", "pref_vector", torch.ones(M, dtype=torch.int64), TypeError, "floating-point"),
    ("ConFIG", "pref_vector", torch.ones(0, dtype=F64), ValueError, "at least one entry"),
    ("DualProj", "pref_vector", -P, ValueError, "non-negative entries"),
    ("DualProj", "projector", "quadprog", TypeError, "must be a torchjd.linalg.DualConeProjector"),
    ("DualProjWeighting", "pref_vector", torch.tensor(0.5), ValueError, "must be a vector"),
    ("DualProjWeighting", "projector", 1.0, TypeError, "must be a torchjd.linalg"),
    ("ExcessMTL", "robust_step_size", 0.0, ValueError, "must be positive"),
    ("ExcessMTL", "n_warmup_steps", -1.0, ValueError, "must be non-negative"),
    ("ExcessMTLWeighting", "robust_step_size", None, TypeError, _NOT_FLOAT),
    ("ExcessMTLWeighting", "n_warmup_steps", 1.5, TypeError, _NOT_INT),
    ("FairGrad", "alpha", -1.0, ValueError, "must be positive"),
    ("FairGrad", "max_iters", 0, ValueError, "must be positive"),
    ("FairGradWeighting", "alpha", True, TypeError, _NOT_FLOAT),
    ("FairGradWeighting", "max_iters", 2.0, TypeError, _NOT_INT),
    ("GradDrop", "leak", torch.ones(1, M, dtype=F64), ValueError, "must be a vector"),
    ("GradDrop", "leak", [0.5] * M, TypeError, _NOT_TENSOR),
    ("GradDrop", "f", 0.5, TypeError, "must be callable"),
    ("GradVac", "beta", 2, ValueError, r"must be in \[0.0, 1.0\]"),
    ("GradVac", "eps", -1, ValueError, "must be non-negative"),
    ("GradVacWeighting", "beta", math.nan, ValueError, "must be in"),
    ("GradVacWeighting", "eps", torch.tensor(1.0), TypeError, _NOT_FLOAT),
    ("Krum", "n_byzantine", -1, ValueError, "must be non-negative"),
    ("Krum", "n_selected", 0, ValueError, "must be positive"),
    ("KrumWeighting", "n_byzantine", 1.0, TypeError, _NOT_INT),
    ("KrumWeighting", "n_selected", -2.0, ValueError, "must be positive"),
    ("MGDA", "epsilon", 0.0, ValueError, "must be positive"),
    ("MGDA", "max_iters", 2.5, TypeError, _NOT_INT),
    ("MGDAWeighting", "epsilon", "tiny", TypeError, _NOT_FLOAT),
    ("MGDAWeighting", "max_iters", -3, ValueError, "must be positive"),
    ("MoDoWeighting", "gamma", 0, ValueError, "must be positive"),
    ("MoDoWeighting", "rho", -0.5, ValueError, "must be non-negative"),
    ("NashMTL", "max_norm", -1.0, ValueError, "must be non-negative"),
    ("NashMTL", "update_weights_every", 0, ValueError, "must be positive"),
    ("NashMTL", "optim_niter", 2.0, TypeError, _NOT_INT),
    ("NashMTL", "n_tasks", 0, ValueError, "must be positive"),
    ("PCD", "tau", 1.5, ValueError, r"must be in \[0.0, 1.0\]"),
    ("PCD", "tau", vector(0.5, 2.0), ValueError, r"must have entries in \[0, 1\]"),
    ("PCD", "beta", 1.0, ValueError, r"must be in \[0.0, 1.0\)"),
    ("PCDWeighting", "tau", "half", TypeError, _NOT_FLOAT),
    ("PCDWeighting", "beta", True, ValueError, r"must be in \[0.0, 1.0\)"),
    ("PCDWeighting", "eps", math.nan, ValueError, "must be non-negative"),
    ("SDMGradWeighting", "lr", 0.0, ValueError, "must be positive"),
    ("SDMGradWeighting", "momentum", 1.0, ValueError, r"must be in \[0.0, 1.0\)"),
    ("SDMGradWeighting", "n_iter", 0, ValueError, "must be positive"),
    ("SDMGradWeighting", "lambda_", -0.1, ValueError, "must be non-negative"),
    ("SDMGradWeighting", "pref_vector", vector(math.inf, 1.0), ValueError, "finite"),
    ("TrimmedMean", "trim_number", -1, ValueError, "must be non-negative"),
    ("TrimmedMean", "trim_number", 0.5, TypeError, _NOT_INT),
    ("UPGrad", "pref_vector", -P, ValueError, "non-negative entries"),
    ("UPGrad", "projector", TorchProjector, TypeError, "must be a torchjd.linalg"),
    ("UPGradWeighting", "pref_vector", P.int(), TypeError, "floating-point"),
    ("UPGradWeighting", "projector", object(), TypeError, "must be a torchjd.linalg"),
    ("DBMTL", "beta", 1.0, ValueError, r"must be in \[0, 1\)"),
    ("DBMTL", "beta_sigma", -1, ValueError, "must be non-negative"),
    ("MoCo", "beta", 0.0, ValueError, "must be positive"),
    ("MoCo", "beta", 1.5, ValueError, r"must be in \(0, 1\]"),
    ("MoCo", "beta_sigma", "x", TypeError, _NOT_FLOAT),
    ("MoCo", "gamma", -1.0, ValueError, "must be positive"),
    ("MoCo", "gamma_sigma", math.nan, ValueError, "must be non-negative"),
    ("MoCo", "rho", None, TypeError, _NOT_FLOAT),
    ("GradNorm", "alpha", -1.0, ValueError, "must be non-negative"),
    ("GradNorm", "lr", 0.0, ValueError, "must be positive"),
    ("GradNormWeighting", "alpha", True, TypeError, _NOT_FLOAT),
    ("GradNormWeighting", "lr", None, TypeError, _NOT_FLOAT),
    ("CRMOGMWeighting", "alpha", 1.5, ValueError, r"must be in \[0.0, 1.0\]"),
    ("CRMOGMWeighting", "initial_weights", torch.ones(2, 2), ValueError, "must be a vector"),
]


def build(name: str, **changes: Any) -> Any:
    cls, kwargs, _ = CLASSES[name]
    return cls(**{**kwargs, **changes})


def inputs(name: str, count: int) -> list[Tensor]:
    """``count`` random inputs (float64, seeded) of the kind that the class takes."""
    kind = CLASSES[name][2]
    generator = torch.Generator().manual_seed(7)
    result = []
    for _ in range(count):
        J = torch.randn(M, N, generator=generator, dtype=F64)
        J[1] -= 1.5 * J[0]  # conflicting rows, so that the projections do something
        if kind == "gramian":
            result.append(J @ J.T)
        elif kind == "square":
            result.append(J @ (J + 0.1 * torch.randn(M, N, generator=generator, dtype=F64)).T)
        else:
            result.append(J)
    return result


def outputs(obj: Callable[[Tensor], Tensor], stats: list[Tensor]) -> list[Tensor]:
    result = []
    for i, stat in enumerate(stats):
        torch.manual_seed(i)  # GradDrop, GradVac draw at random
        if isinstance(obj, (agg.GradNorm, agg.GradNormWeighting)):
            obj.record_losses(torch.linspace(1.0, 2.0, M, dtype=F64) ** (i + 1))
        result.append(obj(stat))
    return result


def assert_same(a: list[Tensor], b: list[Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == F64
        torch.testing.assert_close(x, y, rtol=0.0, atol=1e-12)


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    return a is b or a == b


def test_the_tables_cover_every_property():
    for name, prop in NAMES:
        assert isinstance(getattr(CLASSES[name][0], prop), property), (name, prop)
    for name, (cls, _, _) in CLASSES.items():
        public = {p for p in dir(cls) if isinstance(getattr(cls, p), property)}
        public -= {"gramian_weighting"}
        assert public == {prop for n, prop in NAMES if n == name}, name


@pytest.mark.parametrize(("name", "prop", "value"), VALUES)
def test_get_returns_the_constructor_value(name: str, prop: str, value: Any):
    obj = build(name, **{prop: value})
    assert same_value(getattr(obj, prop), value)
    if isinstance(value, Tensor):  # a copy, detached: later edits of the argument do not leak
        assert getattr(obj, prop) is not value
    default = inspect.signature(CLASSES[name][0]).parameters[prop].default
    if default is not inspect.Parameter.empty and prop not in CLASSES[name][1]:
        got = getattr(build(name), prop)
        if prop == "projector":
            assert type(got) is TorchProjector
        else:
            assert same_value(got, default)


@pytest.mark.parametrize(("name", "prop", "value"), VALUES)
def test_set_takes_effect(name: str, prop: str, value: Any):
    stats = inputs(name, 4)
    obj = build(name)
    setattr(obj, prop, value)
    assert same_value(getattr(obj, prop), value)
    expected = outputs(build(name, **{prop: value}), stats)
    assert_same(outputs(obj, stats), expected)
    if (name, prop) != ("NashMTL", "n_tasks"):  # the value matters: an ignored set would show
        unchanged = outputs(build(name), stats)
        assert any(not torch.allclose(a, b) for a, b in zip(expected, unchanged, strict=True))


@pytest.mark.parametrize(("name", "prop", "value"), VALUES)
def test_an_aggregator_forwards_to_its_weighting(name: str, prop: str, value: Any):
    obj = build(name)
    if not isinstance(obj, agg.WeightedAggregator):
        return
    weighting = obj._inner_weighting()
    setattr(obj, prop, value)
    assert getattr(weighting, prop) is getattr(obj, prop)
    other = getattr(build(name), prop)
    setattr(weighting, prop, other)
    assert getattr(obj, prop) is other or same_value(getattr(obj, prop), other)
    assert prop not in vars(obj)


@pytest.mark.parametrize(("name", "prop", "value", "error", "message"), INVALID)
def test_an_invalid_set_raises_as_the_constructor_and_changes_nothing(
    name: str, prop: str, value: Any, error: type[Exception], message: str
):
    with pytest.raises(error, match=message) as from_constructor:
        build(name, **{prop: value})
    assert f"`{prop}`" in str(from_constructor.value)
    stats = inputs(name, 4)
    obj = build(name)
    outputs(obj, stats[:2])
    twin = copy.deepcopy(obj)
    before = getattr(obj, prop)
    with pytest.raises(error, match=message) as from_setter:
        setattr(obj, prop, value)
    assert str(from_setter.value) == str(from_constructor.value)
    assert getattr(obj, prop) is before
    assert_same(outputs(obj, stats[2:]), outputs(twin, stats[2:]))


@pytest.mark.parametrize(
    ("name", "prop"),
    [
        ("UPGrad", "pref_vector"),
        ("DualProjWeighting", "pref_vector"),
        ("AlignedMTL", "pref_vector"),
        ("ConFIG", "pref_vector"),
        ("GradDrop", "leak"),
        ("PCD", "tau"),
        ("SDMGradWeighting", "pref_vector"),
    ],
)
def test_a_parameter_is_set_as_the_constructor_takes_it(name: str, prop: str):
    """As a detached copy (``nn.Module`` alone would try to register it under the same name)."""
    value = torch.nn.Parameter(P[1:] if prop == "tau" else P.clone())
    obj = build(name)
    setattr(obj, prop, value)
    stored = getattr(obj, prop)
    assert type(stored) is Tensor
    assert not stored.requires_grad
    assert torch.equal(stored, value)
    assert list(obj.parameters()) == []
    stats = inputs(name, 2)
    assert_same(outputs(obj, stats), outputs(build(name, **{prop: value}), stats))


STATEFUL = [
    (name, prop, value) for name, prop, value in VALUES if issubclass(CLASSES[name][0], Stateful)
]


@pytest.mark.parametrize(("name", "prop", "value"), STATEFUL)
def test_a_set_keeps_the_state(name: str, prop: str, value: Any):
    """Setting a value and setting back the old one leaves the object as it was: no reset."""
    stats = inputs(name, 5)
    obj = build(name)
    outputs(obj, stats[:2])
    twin = copy.deepcopy(obj)
    old = getattr(obj, prop)
    setattr(obj, prop, value)
    setattr(obj, prop, old)
    expected = outputs(twin, stats[2:])
    assert_same(outputs(obj, stats[2:]), expected)
    fresh = outputs(build(name), stats[2:])  # the state matters: a reset would have shown
    assert any(not torch.equal(a, b) for a, b in zip(expected, fresh, strict=True))


@pytest.mark.parametrize(("name", "prop", "value"), STATEFUL)
def test_a_set_applies_from_the_next_call_on_the_kept_state(name: str, prop: str, value: Any):
    """Setting through the aggregator and through the weighting, or before the first call and in
    the constructor, give the same: one value, one state."""
    stats = inputs(name, 5)
    obj = build(name)
    outputs(obj, stats[:2])
    twin = copy.deepcopy(obj)
    setattr(obj, prop, value)
    target = twin._inner_weighting() if isinstance(twin, agg.WeightedAggregator) else twin
    setattr(target, prop, value)
    assert_same(outputs(obj, stats[2:]), outputs(twin, stats[2:]))


def test_nash_mtl_resets_when_n_tasks_changes():
    stats = inputs("NashMTL", 4)
    obj = agg.NashMTL(n_tasks=M, update_weights_every=3)
    outputs(obj, stats[:1])
    obj.n_tasks = M - 1  # the kept weights have M entries: they go
    obj.n_tasks = M
    assert_same(
        outputs(obj, stats[1:]), outputs(agg.NashMTL(n_tasks=M, update_weights_every=3), stats[1:])
    )
    smaller = agg.NashMTL(n_tasks=M, update_weights_every=3)
    outputs(smaller, stats[:1])
    smaller.n_tasks = M - 1
    expected = agg.NashMTL(n_tasks=M - 1, update_weights_every=3)
    rows = [J[: M - 1] for J in stats[1:]]
    assert_same(outputs(smaller, rows), outputs(expected, rows))


def test_exact_mode_set_on_the_projector_of_upgrad_takes_effect():
    """The projector is used as it is, not copied: setting its own properties changes UPGrad."""
    J = inputs("UPGrad", 1)[0]
    aggregator = agg.UPGrad()
    aggregator.projector.norm_eps = 0.0
    aggregator.projector.reg_eps = 0.0
    exact = agg.UPGrad(projector=TorchProjector(norm_eps=0.0, reg_eps=0.0))
    torch.testing.assert_close(aggregator(J), exact(J), rtol=0.0, atol=1e-12)
    assert not torch.allclose(agg.UPGrad()(J), exact(J), rtol=0.0, atol=1e-9)


def test_properties_are_typed_and_documented():
    for name, prop in NAMES:
        descriptor = getattr(CLASSES[name][0], prop)
        assert descriptor.__doc__, (name, prop)
        assert inspect.signature(descriptor.fget).return_annotation is not inspect.Signature.empty
        assert descriptor.fset is not None
        # typed for static checkers (a property made by a function would be Any to them)
        assert isinstance(descriptor, Hyperparameter), (name, prop)


@pytest.mark.parametrize(
    "cls",
    [
        agg.Aggregator,
        agg.Weighting,
        agg.MeanWeighting,
        agg.SumWeighting,
        agg.RandomWeighting,
        Scalarizer,
        MeanScalarizer,
        SumScalarizer,
        RandomScalarizer,
        GeometricMean,
    ],
)
def test_base_constructors_take_no_argument(cls: type):
    assert str(inspect.signature(cls)) == "() -> None"
    assert str(inspect.signature(cls.__init__)) == "(self) -> None"
    if inspect.isabstract(cls):
        with pytest.raises(TypeError, match="abstract"):
            cls()
    else:
        cls()
        with pytest.raises(TypeError):
            cls(1.0)

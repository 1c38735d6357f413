"""The published signatures of the catalog (keyword names and defaults are API)."""

import inspect

import pytest
import torch

import torchjd
import torchjd.aggregation as aggregation

_ = inspect.Parameter.empty
SIGNATURES = {
    "AlignedMTL": {"pref_vector": None, "scale_mode": "min"},
    "AlignedMTLWeighting": {"pref_vector": None, "scale_mode": "min"},
    "CAGrad": {"c": _, "norm_eps": 0.0001},
    "CAGradWeighting": {"c": _, "norm_eps": 0.0001},
    "ConFIG": {"pref_vector": None},
    "CRMOGMWeighting": {"weighting": _, "alpha": 0.9, "initial_weights": None},
    "ExcessMTL": {"robust_step_size": 1.0, "n_warmup_steps": 0},
    "ExcessMTLWeighting": {"robust_step_size": 1.0, "n_warmup_steps": 0},
    "FairGrad": {"alpha": _, "max_iters": None},
    "FairGradWeighting": {"alpha": _, "max_iters": None},
    "GradDrop": {"f": "identity", "leak": None},
    "GradVac": {"beta": 0.5, "eps": 1e-08},
    "GradVacWeighting": {"beta": 0.5, "eps": 1e-08},
    "IMTLG": {},
    "IMTLGWeighting": {},
    "Krum": {"n_byzantine": _, "n_selected": 1},
    "KrumWeighting": {"n_byzantine": _, "n_selected": 1},
    "MoDoWeighting": {"gamma": 0.1, "rho": 0.1},
    "NashMTL": {"n_tasks": _, "max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20},
    "PCD": {"tau": 0.02, "beta": 0.999, "eps": 1e-08},
    "PCDWeighting": {"tau": 0.02, "beta": 0.999, "eps": 1e-08},
    "PCGrad": {},
    "PCGradWeighting": {},
    "SDMGradWeighting": {
        "lr": 10.0, "momentum": 0.5, "n_iter": 20, "lambda_": 0.3, "pref_vector": None,
    },
    "TrimmedMean": {"trim_number": _},
}  # fmt: skip
STATEFUL = {
    "CRMOGMWeighting", "ExcessMTL", "ExcessMTLWeighting", "GradVac", "GradVacWeighting",
    "MoDoWeighting", "NashMTL", "PCD", "PCDWeighting", "SDMGradWeighting",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name: str):
    assert name in aggregation.__all__
    parameters = inspect.signature(getattr(aggregation, name)).parameters
    assert list(parameters) == list(SIGNATURES[name])
    for key, default in SIGNATURES[name].items():
        if default == "identity":
            x = torch.ones(2)
            assert parameters[key].default(x) is x
        else:
            assert parameters[key].default == default


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_stateful_methods_say_so(name: str):
    assert issubclass(getattr(aggregation, name), torchjd.Stateful) == (name in STATEFUL)


AGGREGATORS = {
    "AlignedMTL": lambda m: aggregation.AlignedMTL(),
    "CAGrad": lambda m: aggregation.CAGrad(0.5),
    "ConFIG": lambda m: aggregation.ConFIG(),
    "ExcessMTL": lambda m: aggregation.ExcessMTL(),
    "FairGrad": lambda m: aggregation.FairGrad(2.0),
    "GradDrop": lambda m: aggregation.GradDrop(),
    "GradVac": lambda m: aggregation.GradVac(),
    "IMTLG": lambda m: aggregation.IMTLG(),
    "NashMTL": lambda m: aggregation.NashMTL(m),
    "PCD": lambda m: aggregation.PCD(),
    "PCGrad": lambda m: aggregation.PCGrad(),
}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate(name: str, bad: float):
    J = torch.randn(5, 4)
    J[1, 2] = bad
    assert not torch.isfinite(AGGREGATORS[name](5)(J)).all()


@pytest.mark.parametrize("aggregator", [aggregation.Krum(1), aggregation.TrimmedMean(1)])
def test_robust_methods_do_not_raise_on_non_finite_inputs(aggregator: torch.nn.Module):
    J = torch.randn(5, 4)
    J[1, 2] = float("nan")
    aggregator(J)

"""Every script of examples/ runs, and what it computes is checked."""

import runpy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parent.parent / "examples"


def _check_iwrm_autograd_baseline(namespace: dict) -> None:
    model, loss_fn, X, Y = (namespace[k] for k in ("model", "loss_fn", "X", "Y"))
    initial = namespace["initial_state"]
    with torch.no_grad():
        final_loss = loss_fn(model(X).squeeze(-1), Y)
        model.load_state_dict(initial)
        initial_loss = loss_fn(model(X).squeeze(-1), Y)
    assert final_loss < initial_loss  # ERM reduces the mean training loss


def _check_jacobian_descent_by_hand(namespace: dict) -> None:
    cosines = namespace["min_cosines"]
    assert min(cosines["UPGrad (exact)"]) >= -1e-4  # float32: never conflicts
    assert min(cosines["Mean"]) < -0.1  # the mean gradient does conflict
    for default, mean in zip(cosines["UPGrad (defaults)"], cosines["Mean"], strict=True):
        assert default > mean


def _check_iwrm_autojac(namespace: dict) -> None:
    final, initial = _mean_losses(namespace)
    # a step need not decrease every loss of other batches, but training reduces the mean loss
    assert final < initial


def _check_mtl(namespace: dict) -> None:
    first, last = namespace["history"][0], namespace["history"][-1]
    assert last[0] < 0.9 * first[0]  # each task improves
    assert last[1] < 0.9 * first[1]
    assert all(not hasattr(p, "jac") for p in namespace["shared"].parameters())


def _mean_losses(namespace: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean training loss over all batches, after training and with the initial parameters."""
    model, loss_fn, X, Y = (namespace[k] for k in ("model", "loss_fn", "X", "Y"))
    with torch.no_grad():
        final = loss_fn(model(X).squeeze(-1), Y).mean()
        model.load_state_dict(namespace["initial_state"])
        initial = loss_fn(model(X).squeeze(-1), Y).mean()
    return final, initial


def _check_iwrm_autogram(namespace: dict) -> None:
    final, initial = _mean_losses(namespace)
    assert final < initial  # IWRM reduces the training losses
    assert namespace["gramian"].shape == (16, 16)
    weights = namespace["weights"]
    assert (weights > 0).all()  # UPGrad weights are at least the preference (1/16)


def _check_partial_jd(namespace: dict) -> None:
    model = namespace["model"]
    first = {k: v.clone() for k, v in model[0].state_dict().items()}
    initial_first = {
        k[len("0.") :]: v for k, v in namespace["initial_state"].items() if k[0] == "0"
    }
    for key, value in first.items():  # the layer outside the engine is trained too
        assert not torch.equal(value, initial_first[key])
    final, initial = _mean_losses(namespace)
    assert final < initial


def _check_instance_wise_mtl(namespace: dict) -> None:
    first, last = namespace["history"][0], namespace["history"][-1]
    assert (last < 0.5 * first).all()  # every task improves
    assert namespace["gramian"].shape == (16, 16)  # m = 8 samples x 2 tasks
    assert namespace["weights"].shape == (8, 2)
    # the engine's Gramian is that of the Jacobian of the [8, 2] losses, rows in row-major order
    model, engine, loss_fn = namespace["model"], namespace["engine"], namespace["loss_fn"]
    x, y = namespace["X"][0], namespace["Y"][0]
    losses = loss_fn(model(x), y)
    gramian = engine.compute_gramian(losses)
    params = list(model.parameters())
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in losses.flatten()
    ]
    jacobian = torch.stack(rows)
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-4, atol=1e-4)


def _check_rnn(namespace: dict) -> None:
    assert namespace["final_loss"] < 0.5 * namespace["initial_loss"]
    assert namespace["weights"].shape == (8,)
    assert all(not hasattr(p, "jac") for p in namespace["params"])


def _check_amp(namespace: dict) -> None:
    history = namespace["history"]
    assert history[-1] < 0.2 * history[0]
    assert namespace["output"].dtype in (torch.bfloat16, torch.float16)  # autocast was on
    assert all(p.dtype == torch.float32 for p in namespace["model"].parameters())
    scale = namespace["scaler"].get_scale()
    assert scale >= 1.0
    # the premise of passing the scaled Jacobian to UPGrad: it is positively homogeneous
    J = torch.randn(16, 20)
    aggregator = namespace["aggregator"]
    torch.testing.assert_close(aggregator(scale * J), scale * aggregator(J), rtol=1e-4, atol=1e-3)


def _check_monitoring(namespace: dict) -> None:
    cosines, mean_cosines = namespace["cosines"], namespace["mean_cosines"]
    assert len(cosines) == len(mean_cosines) == 8  # the hook ran once per step
    assert all(c.shape == (16,) for c in cosines)
    assert min(c.min() for c in cosines) >= -1e-4  # exact UPGrad never conflicts
    assert min(c.min() for c in mean_cosines) < -0.1  # the mean gradient does
    assert not namespace["aggregator"]._forward_hooks  # the handle was removed


def _check_distributed_iwrm(namespace: dict) -> None:
    rank_0, rank_1 = namespace["rank_states"]
    single = namespace["single_state"]
    initial = namespace["new_model"]().state_dict()
    for key, value in single.items():
        assert torch.equal(rank_0[key], rank_1[key])  # the ranks agree, bit for bit
        # and they made the steps of one process on the global batches
        torch.testing.assert_close(rank_0[key], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, initial[key])  # training moved every parameter


CHECKS: dict[str, Callable[[dict], None]] = {
    "iwrm_autograd_baseline": _check_iwrm_autograd_baseline,
    "iwrm_autojac": _check_iwrm_autojac,
    "iwrm_autogram": _check_iwrm_autogram,
    "partial_jd": _check_partial_jd,
    "jacobian_descent_by_hand": _check_jacobian_descent_by_hand,
    "mtl": _check_mtl,
    "instance_wise_mtl": _check_instance_wise_mtl,
    "rnn": _check_rnn,
    "amp": _check_amp,
    "monitoring": _check_monitoring,
    "distributed_iwrm": _check_distributed_iwrm,
    "sharded_autogram": _check_distributed_iwrm,  # the same: 2 ranks, the step of one process
    "fsdp_mtl": _check_distributed_iwrm,  # the same: 2 ranks, the step of one process
}


# They need `lightning`, which CI does not install: tests/test_lightning.py runs them where it is.
LIGHTNING_EXAMPLES = {path.stem for path in EXAMPLES.glob("lightning_*.py")}


def test_every_example_is_checked():
    assert {path.stem for path in EXAMPLES.glob("*.py")} - LIGHTNING_EXAMPLES == set(CHECKS)
    lightning_tests = (Path(__file__).parent / "test_lightning.py").read_text()
    assert all(f'"{name}' in lightning_tests for name in LIGHTNING_EXAMPLES)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example(name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    torch.manual_seed(0)
    initial_states: list[dict] = []
    original_init = torch.nn.Sequential.__init__

    def recording_init(self: torch.nn.Sequential, *args: object) -> None:
        original_init(self, *args)
        initial_states.append({k: v.clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(torch.nn.Sequential, "__init__", recording_init)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only slow them down on a busy machine
    try:
        namespace = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    namespace["initial_state"] = initial_states[0] if initial_states else None
    assert capsys.readouterr().out  # it reports something
    CHECKS[name](namespace)

"""The PyTorch Lightning examples run, and compute what the same loops written without Lightning
compute. Skipped where ``lightning`` is not installed (as in CI)."""

import copy
import importlib.util
import pickle
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn import MSELoss
from torch.optim import SGD
from torch.utils.data import DataLoader

pytest.importorskip("lightning")

from lightning import Callback

from tests.reference.jacobians import brute_force_jacobian
from torchjd.aggregation import UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autojac import jac_to_grad, mtl_backward

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only slow them down
    yield
    torch.set_num_threads(threads)


def _load(name: str) -> dict:
    """The example's definitions, without running its main part, as an importable module (for
    its classes to pickle)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return vars(module)


@pytest.fixture(scope="module")
def iwrm() -> Iterator[dict]:
    yield _load("lightning_iwrm")
    del sys.modules["lightning_iwrm"]


def _plain_iwrm(
    model: torch.nn.Module, loader: DataLoader, epochs: int, lr: float, fused: bool = False
) -> list:
    """The IWRM loop of the example, without Lightning: the weights of every step."""
    engine = Engine(model, batch_dim=0)
    optimizer = SGD(model.parameters(), lr=lr)
    loss_fn, weighting = MSELoss(reduction="none"), UPGradWeighting()
    all_weights = []
    for _ in range(epochs):
        for x, y in loader:
            losses = loss_fn(model(x).squeeze(dim=1), y)
            if fused:
                weights = engine.backward(losses, weighting)
            else:
                weights = weighting(engine.compute_gramian(losses))
                losses.backward(weights)
            optimizer.step()
            optimizer.zero_grad()
            all_weights.append(weights)
    engine.close()
    return all_weights


def _assert_same_training(module, model, weights: list, lightning_weights: list) -> None:
    assert len(lightning_weights) == len(weights)
    for got, expected in zip(lightning_weights, weights, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for (name, got), expected in zip(
        module.model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


class _HookCounter(Callback):
    """Records, at every training batch, how many forward hooks the first layer holds."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counts.append(len(pl_module.model[0]._forward_hooks))


def test_iwrm_example(capsys: pytest.CaptureFixture):
    torch.manual_seed(0)
    namespace = runpy.run_path(str(EXAMPLES / "lightning_iwrm.py"), run_name="__main__")
    module, dataset = namespace["module"], namespace["dataset"]
    assert namespace["final_loss"] < 0.05 * namespace["initial_loss"]
    assert len(module.step_weights) == 5 * 8  # 5 epochs of 8 batches
    assert all(w.shape == (16,) and (w > 0).all() for w in module.step_weights)
    assert namespace["trainer"].callback_metrics["val_loss"] == pytest.approx(
        namespace["mean_loss"](module, dataset), rel=1e-5
    )
    assert module.engine is None  # closed by on_fit_end: no hook left
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert "mean training loss" in capsys.readouterr().out


@pytest.mark.parametrize("fused", [False, True])
def test_iwrm_same_steps_as_plain_loop(iwrm: dict, fused: bool):
    torch.manual_seed(0)
    module = iwrm["IWRMModule"](fused=fused)
    model = copy.deepcopy(module.model)  # the same initial parameters
    loader = DataLoader(iwrm["make_data"](), batch_size=16)
    counter = _HookCounter()
    iwrm["make_trainer"](max_epochs=2, callbacks=[counter]).fit(module, loader)
    weights = _plain_iwrm(model, loader, epochs=2, lr=module.hparams.lr, fused=fused)
    _assert_same_training(module, model, weights, module.step_weights)
    assert counter.counts == [1] * 16  # one engine's hook during the fit


def test_iwrm_fit_twice_and_checkpoint(iwrm: dict, tmp_path: Path):
    """Two fits of one module continue its training (one engine at a time); a checkpoint saved
    after them restores the module and resumes training as if it had not stopped."""
    torch.manual_seed(0)
    IWRMModule, make_trainer = iwrm["IWRMModule"], iwrm["make_trainer"]
    module = IWRMModule()
    model = copy.deepcopy(module.model)
    loader = DataLoader(iwrm["make_data"](), batch_size=16)
    counter = _HookCounter()
    make_trainer(max_epochs=1, callbacks=[counter]).fit(module, loader)
    trainer = make_trainer(max_epochs=1, callbacks=[counter])
    trainer.fit(module, loader)
    assert counter.counts == [1] * 16  # the first engine was closed before the second was made
    path = tmp_path / "iwrm.ckpt"
    trainer.save_checkpoint(path)
    restored = IWRMModule.load_from_checkpoint(path)
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    # the checkpoint holds the second trainer's epoch count (1): one more epoch
    make_trainer(max_epochs=2).fit(restored, loader, ckpt_path=path)
    weights = _plain_iwrm(model, loader, epochs=2, lr=module.hparams.lr)
    _assert_same_training(module, model, weights, module.step_weights)
    weights = _plain_iwrm(model, loader, epochs=1, lr=module.hparams.lr)
    _assert_same_training(restored, model, weights, restored.step_weights)
    # outside fit, the module holds no hook: it pickles and deep-copies
    copied = pickle.loads(pickle.dumps(restored))
    deep = copy.deepcopy(restored)
    x = torch.randn(4, 10)
    torch.testing.assert_close(copied.model(x), restored.model(x))
    torch.testing.assert_close(deep.model(x), restored.model(x))


def test_iwrm_bf16_mixed(iwrm: dict):
    """Under ``precision="bf16-mixed"``, the model runs in bfloat16 inside the training step; the
    engine's Gramian is that of the Jacobian that autograd gives for that computation, and the
    training matches the float32 one up to bfloat16's precision."""
    IWRMModule = iwrm["IWRMModule"]
    gramians: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Checked(IWRMModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                x, y = batch
                output = self.model(x).squeeze(dim=1)
                autocast = self.trainer.precision == "bf16-mixed"
                assert torch.is_autocast_enabled("cpu") == autocast
                assert output.dtype == (torch.bfloat16 if autocast else torch.float32)
                losses = self.loss_fn(output, y)
                gramian = self.engine.compute_gramian(losses)
                params = list(self.model.parameters())
                jacobian = brute_force_jacobian(losses, params).double()
                gramians.append((gramian, jacobian @ jacobian.T))
            return super().training_step(batch, batch_idx)

    loader = DataLoader(iwrm["make_data"](), batch_size=16)
    modules = {}
    for precision, fused in [("32-true", False), ("bf16-mixed", False), ("bf16-mixed", True)]:
        torch.manual_seed(0)
        module = Checked(fused=fused)
        iwrm["make_trainer"](max_epochs=3, precision=precision).fit(module, loader)
        assert all(p.dtype == torch.float32 for p in module.parameters())
        modules[precision, fused] = module
    for gramian, expected in gramians:
        assert gramian.dtype == torch.float32
        torch.testing.assert_close(gramian.double(), expected, rtol=2e-2, atol=2e-2)
    reference = modules["32-true", False]
    for key in [("bf16-mixed", False), ("bf16-mixed", True)]:
        module = modules[key]
        torch.testing.assert_close(
            module.step_weights[0], reference.step_weights[0], rtol=5e-2, atol=5e-3
        )
        loss = iwrm["mean_loss"](module, iwrm["make_data"]())
        assert loss < 1.5 * iwrm["mean_loss"](reference, iwrm["make_data"]())
    # the fused step's first weights are those of the two-pass step (its gradients then differ
    # from the two-pass ones by bfloat16 rounding, as both do from the float32 ones)
    torch.testing.assert_close(
        modules["bf16-mixed", True].step_weights[0], modules["bf16-mixed", False].step_weights[0]
    )


def test_mtl_example(capsys: pytest.CaptureFixture):
    torch.manual_seed(0)
    namespace = runpy.run_path(str(EXAMPLES / "lightning_mtl.py"), run_name="__main__")
    module = namespace["module"]
    first, last = module.history[0], module.history[-1]
    assert last[0] < 0.1 * first[0]  # each task improves
    assert last[1] < 0.1 * first[1]
    assert all(not hasattr(p, "jac") for p in module.shared.parameters())
    assert "last losses" in capsys.readouterr().out


def test_mtl_same_steps_as_plain_loop():
    namespace = runpy.run_path(str(EXAMPLES / "lightning_mtl.py"), run_name="lightning_mtl")
    torch.manual_seed(0)
    module = namespace["MTLModule"]()
    shared, task1, task2 = (copy.deepcopy(m) for m in (module.shared, module.task1, module.task2))
    loader = DataLoader(namespace["make_data"](), batch_size=16)
    trainer = namespace["Trainer"](
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False
    )
    trainer.fit(module, loader)
    # the same steps without Lightning (the parameters in the module's order)
    params = [*shared.parameters(), *task1.parameters(), *task2.parameters()]
    optimizer = SGD(params, lr=module.hparams.lr)
    loss_fn, aggregator = MSELoss(), UPGrad()
    history = []
    for _ in range(3):
        for x, y1, y2 in loader:
            features = shared(x)
            loss1 = loss_fn(task1(features).squeeze(dim=1), y1)
            loss2 = loss_fn(task2(features).squeeze(dim=1), y2)
            mtl_backward([loss1, loss2], features=features)
            jac_to_grad(shared.parameters(), aggregator)
            optimizer.step()
            optimizer.zero_grad()
            history.append((loss1.item(), loss2.item()))
    torch.testing.assert_close(torch.tensor(module.history), torch.tensor(history))
    got = [*module.shared.parameters(), *module.task1.parameters(), *module.task2.parameters()]
    for p, q in zip(got, params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_iwrm_16_mixed_with_a_gradient_scaler(iwrm: dict):
    """``precision="16-mixed"`` with its gradient scaler (on CPU through the plugin; Lightning makes
    one on CUDA): the two-pass and the fused steps (which scales the losses itself) both train as
    the float32 step does, up to float16's precision. Before, the fused step failed (its scaler had
    scaled nothing) and, once scaled, its float16 Gramian overflowed."""
    from lightning.pytorch.plugins import MixedPrecision

    IWRMModule = iwrm["IWRMModule"]
    loader = DataLoader(iwrm["make_data"](), batch_size=16)
    results = {}
    for precision, fused in [("32", False), ("16", False), ("16", True)]:
        torch.manual_seed(0)
        module = IWRMModule(fused=fused)
        kwargs: dict = {}
        if precision == "16":
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        iwrm["make_trainer"](max_epochs=2, **kwargs).fit(module, loader)
        results[precision, fused] = module
    reference = results["32", False]
    for key in [("16", False), ("16", True)]:
        module = results[key]
        assert len(module.step_weights) == len(reference.step_weights)
        for p, q in zip(module.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)


def test_mtl_16_mixed_with_a_gradient_scaler():
    """The MTL example under ``precision="16-mixed"`` with its gradient scaler: it scales its losses
    itself (mtl_backward bypasses manual_backward), so it trains as in float32, up to float16."""
    from lightning.pytorch.plugins import MixedPrecision

    mtl = _load("lightning_mtl")
    results = []
    for scaled in (False, True):
        torch.manual_seed(0)
        module = mtl["MTLModule"]()
        kwargs: dict = {}
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        trainer = mtl["Trainer"](
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **kwargs,
        )
        trainer.fit(module, DataLoader(mtl["make_data"](), batch_size=16))
        results.append(module)
    del sys.modules["lightning_mtl"]
    for p, q in zip(results[1].parameters(), results[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=2e-3)

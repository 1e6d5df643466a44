"""Invalid arguments and unsupported trainer setups: each raises early with the value and the fix.

Errors that can only be found during ``fit`` must come before the first optimizer step, so
the tests check that no parameter changed and no training step ran.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    TinyClassifier,
    assert_parameters_unchanged,
    limit_cpu_threads,
    make_trainer,
    parameter_snapshot,
)
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy

from lightning_twophase.batch_policy import DynamicBatchPolicy
from lightning_twophase import ConvexitySwitch
from lightning_twophase.checks import check_fit_start, check_setup
from lightning_twophase.swap import ADAM_FAMILY

limit_cpu_threads()


def fit_expecting_error(model: TinyClassifier, switch: ConvexitySwitch, match: str, **trainer_kwargs) -> str:
    """Fit until ``ValueError`` matching ``match`` is raised; check that nothing was trained."""
    before = parameter_snapshot(model)
    trainer = make_trainer(max_epochs=2, callbacks=[switch], **trainer_kwargs)

    with pytest.raises(ValueError, match=match) as raised:
        trainer.fit(model)

    assert model.training_steps == 0
    assert_parameters_unchanged(model, before)
    return str(raised.value)


@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.5, 0.0, 1.0])
def test_ratio_outside_unit_interval(ratio: float):
    with pytest.raises(ValueError, match=rf"Invalid ratio: {re.escape(repr(ratio))}\. Use a value strictly between 0 and 1"):
        ConvexitySwitch(detector="peak_ratio", ratio=ratio)


@pytest.mark.parametrize("ratio", [True, "0.9", None])
def test_ratio_of_wrong_type(ratio):
    with pytest.raises(ValueError, match=rf"Invalid ratio: {re.escape(repr(ratio))}"):
        ConvexitySwitch(detector="peak_ratio", ratio=ratio)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"check_every_n_steps": 0}, r"Invalid check_every_n_steps: 0\. Expected an int >= 1 or None"),
        ({"cg_batch_size": 0}, r"Invalid cg_batch_size: 0\. Expected an int >= 1 or None"),
        ({"cg_batch_size": 12.5}, r"Invalid cg_batch_size: 12\.5\. Expected an int >= 1 or None"),
        ({"cg_micro_batch_size": -1}, r"Invalid cg_micro_batch_size: -1\. Expected an int >= 1 or None"),
        ({"min_epochs": -1}, r"Invalid min_epochs: -1\. Expected an int >= 0"),
        ({"min_steps": -3}, r"Invalid min_steps: -3\. Expected an int >= 0"),
        ({"figure_every_n_checks": 0}, r"Invalid figure_every_n_checks: 0\. Expected an int >= 1"),
        ({"cg_dtype": torch.float16}, r"Invalid cg_dtype: torch\.float16\. Use torch\.float64, torch\.float32 or None"),
        ({"patience": -1}, r"Invalid patience: -1\. Use 0 or a positive number"),
        ({"statistic": "loss"}, r"Invalid statistic: 'loss'\. Expected one of grad_norm_of_mean, grad_norm_batch_mean"),
        ({"detector": "nope"}, r"Invalid detector: 'nope'\. Expected one of peak_ratio, fixed_epoch, log_slope"),
    ],
)
def test_invalid_argument_rejected(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        ConvexitySwitch(**kwargs)


def test_manual_optimization_rejected():
    message = fit_expecting_error(
        TinyClassifier(manual=True), ConvexitySwitch(detector="peak_ratio"), match="automatic_optimization is False"
    )

    assert "remove `self.automatic_optimization = False`" in message


def test_two_optimizers_rejected_by_lightning():
    """Lightning 2.6 itself rejects two optimizers under automatic optimization, before any step."""
    model = TinyClassifier(two_optimizers=True)
    before = parameter_snapshot(model)
    trainer = make_trainer(max_epochs=2, callbacks=[ConvexitySwitch(detector="peak_ratio")])

    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual optimization"):
        trainer.fit(model)

    assert model.training_steps == 0
    assert_parameters_unchanged(model, before)


def test_two_optimizers_rejected_by_check():
    """``check_fit_start`` names the optimizers, for Lightning versions that accept two of them.

    The ``SimpleNamespace`` carries only ``optimizers``, the attribute the check reads.
    """
    model = TinyClassifier()
    optimizers = [torch.optim.Adam(model.hidden_layer.parameters()), torch.optim.SGD(model.output_layer.parameters())]
    trainer = SimpleNamespace(optimizers=optimizers)

    with pytest.raises(ValueError, match=r"Invalid optimizer configuration: 2 optimizers \(Adam, SGD\)") as raised:
        check_fit_start(trainer, adam_family=ADAM_FAMILY, expect_first_phase=True)

    assert "return a single optimizer from configure_optimizers" in str(raised.value)


def test_two_optimizers_with_manual_optimization_rejected():
    message = fit_expecting_error(
        TinyClassifier(two_optimizers=True, manual=True), ConvexitySwitch(detector="peak_ratio"), match="automatic_optimization is False"
    )

    assert "ConvexitySwitch replaces the optimizer that Lightning steps" in message


def test_iterable_without_cg_batch_size_rejected():
    message = fit_expecting_error(
        TinyClassifier(iterable=True), ConvexitySwitch(detector="peak_ratio"), match="Invalid cg_batch_size: None"
    )

    assert "IterableDataset" in message
    assert "ConvexitySwitch(cg_batch_size=N)" in message


def test_iterable_with_batch_policy_rejected():
    switch = ConvexitySwitch(detector="peak_ratio", cg_batch_size=64, cg_batch_policy=DynamicBatchPolicy(initial_size=32))
    message = fit_expecting_error(TinyClassifier(iterable=True), switch, match="Invalid cg_batch_policy")

    assert "IterableDataset" in message
    assert "cg_batch_policy=None" in message


def test_float16_amp_rejected():
    """``precision="16-mixed"`` steps the optimizer through a ``GradScaler`` without the closure.

    On a CPU-only machine Lightning 2.6 turns ``Trainer(precision="16-mixed")`` into
    ``bf16-mixed``, which has no scaler and is supported. The test therefore hands the
    Trainer Lightning's real float16 ``MixedPrecision`` plugin with a CPU ``GradScaler``, the
    configuration that ``precision="16-mixed"`` produces on a GPU.
    """
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))

    message = fit_expecting_error(
        TinyClassifier(), ConvexitySwitch(detector="peak_ratio"), match=r"Invalid precision: '16-mixed'", plugins=[plugin]
    )

    assert "precision='bf16-mixed'" in message
    assert "'32-true'" in message


def test_sharding_strategy_rejected():
    """A sharding strategy splits parameter tensors across ranks, so the CG phase cannot run.

    Lightning 2.6 rejects a Trainer with ``FSDPStrategy`` on a CPU accelerator, so the
    test calls ``check_setup`` directly with a real ``FSDPStrategy`` object in place of the
    trainer's strategy. The ``SimpleNamespace`` carries only the attributes ``check_setup``
    reads.
    """
    trainer = SimpleNamespace(
        strategy=FSDPStrategy(),
        precision_plugin=MixedPrecision("bf16-mixed", device="cpu"),
        precision="bf16-mixed",
        world_size=1,
    )

    with pytest.raises(ValueError, match=r"Invalid strategy: FSDPStrategy\.") as raised:
        check_setup(trainer, TinyClassifier(), cg_dtype=None)

    assert "strategy='ddp' or a single device" in str(raised.value)


def test_non_adam_first_optimizer_warns():
    switch = ConvexitySwitch(detector="peak_ratio")
    trainer = make_trainer(max_epochs=1, callbacks=[switch])

    with pytest.warns(UserWarning, match="the first optimizer is SGD, not from the Adam family"):
        trainer.fit(TinyClassifier(optimizer="sgd", lr=0.1))

    assert trainer.state.finished
    assert trainer.global_step == 8


def test_unknown_monitor_lists_available_keys():
    """An unknown ``monitor`` can only be detected once ``training_step`` has logged something.

    The error therefore comes at the end of the first training batch, after one optimizer step.
    """
    trainer = make_trainer(max_epochs=1, callbacks=[ConvexitySwitch(detector="peak_ratio", monitor="train_los")])

    with pytest.raises(ValueError, match=r"Invalid monitor: 'train_los'") as raised:
        trainer.fit(TinyClassifier())

    message = str(raised.value)
    assert "Available metrics: train_loss." in message
    assert "self.log('train_los', ..., on_step=True)" in message
    assert trainer.global_step == 1


def test_epoch_only_monitor_rejected():
    """A metric logged with ``on_step=False`` has no per-batch value for the interval mean.

    During epoch 0 Lightning has no value for it at all, and later it would return the previous
    epoch's mean. The first batch therefore raises with the fix ``on_step=True``.
    """

    class EpochLogged(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("epoch_loss", loss, on_step=False, on_epoch=True)
            return loss

    trainer = make_trainer(max_epochs=1, callbacks=[ConvexitySwitch(detector="peak_ratio", monitor="epoch_loss")])

    with pytest.raises(ValueError, match=r"Invalid monitor: 'epoch_loss' was not logged in this training step"):
        trainer.fit(EpochLogged())

    assert trainer.global_step == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cg_kwargs": {"beta": "xx"}}, r"Invalid cg_kwargs: .*'beta': 'xx'.*Invalid beta"),
        ({"cg_kwargs": {"max_iter": 0}}, r"Invalid cg_kwargs: .*max_iter"),
        ({"cg_kwargs": {"nonsense": 1}}, r"Invalid cg_kwargs: .*nonsense"),
        ({"cg_kwargs": {"history_size": -1}}, r"Invalid cg_kwargs: .*Invalid history_size: -1"),
        ({"cg_kwargs": {"preconditioner": [torch.ones(1)]}}, r"Invalid cg_kwargs key 'preconditioner'.*optimizer_factory"),
        ({"monitor": 3}, r"Invalid monitor: 3"),
    ],
)
def test_second_phase_settings_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvexitySwitch(detector="peak_ratio", **kwargs)


def test_non_callable_factory_rejected_at_construction():
    with pytest.raises(TypeError, match=r"Invalid optimizer_factory: 'lbfgs'.*callable"):
        ConvexitySwitch(detector="peak_ratio", optimizer_factory="lbfgs")

"""``run_cg_trial`` and ``log_loss_rate``: a CG trial measures its rate and leaves no trace."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import TinyClassifier, make_trainer, parameter_snapshot
from lightning_twophase import ConvexitySwitch
from lightning_twophase.detection import FixedEpochDetector
from lightning_twophase.detectors import CostAwareDetector
from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.trial import log_loss_rate, run_cg_trial

SAMPLES = 64

#: Training samples of TinyClassifier's default blobs data.
SAMPLES_TINY = 256


def batch_norm_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))


def regression_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(SAMPLES, 4, generator=generator)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(SAMPLES, 1, generator=generator)
    return inputs, targets


class CountingObjective:
    """Mean squared error over the whole data set, read through a shuffling DataLoader.

    The loader and the dropout layer both draw from torch's global generator, as a real
    training objective does.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.model = model
        self.loader = DataLoader(TensorDataset(inputs, targets), batch_size=SAMPLES, shuffle=True)
        self.samples = 0
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        inputs, targets = next(iter(self.loader))
        loss = F.mse_loss(self.model(inputs), targets)
        loss.backward()
        self.samples += len(inputs)
        self.calls += 1
        return loss.detach()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_log_loss_rate_value():
    assert log_loss_rate(1.0, math.exp(-2.0), 400) == pytest.approx(2.0 / 400.0, rel=1e-12)
    assert log_loss_rate(0.5, 1.0, 10) == pytest.approx(-math.log(2.0) / 10.0, rel=1e-12)


@pytest.mark.parametrize(
    ("before", "after", "samples"),
    [(1.0, 0.5, 0), (0.0, 0.5, 10), (1.0, -1.0, 10), (float("inf"), 0.5, 10), (float("nan"), 0.5, 10)],
)
def test_log_loss_rate_undefined(before, after, samples):
    assert math.isnan(log_loss_rate(before, after, samples))


def test_trial_restores_parameters_buffers_and_grads():
    model = batch_norm_model()
    inputs, targets = regression_data()
    objective = CountingObjective(model, inputs, targets)
    objective()
    before = snapshot(model)
    grads_before = [p.grad.clone() for p in model.parameters()]

    result = run_cg_trial(
        list(model.parameters()), list(model.buffers()), objective, lambda: objective.samples, iterations=3
    )

    assert result.loss_after < result.loss_before
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} not restored"
    for param, grad in zip(model.parameters(), grads_before):
        assert torch.equal(param.grad, grad)


def test_trial_buffers_change_without_restore():
    # Guards the previous test: the trial's evaluations do move the batch-norm statistics.
    model = batch_norm_model()
    inputs, targets = regression_data()
    before = snapshot(model)
    CountingObjective(model, inputs, targets)()

    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])
    assert model.state_dict()["1.num_batches_tracked"] == before["1.num_batches_tracked"] + 1


def test_trial_rate_and_samples():
    model = batch_norm_model()
    inputs, targets = regression_data()
    objective = CountingObjective(model, inputs, targets)

    result = run_cg_trial(
        list(model.parameters()), list(model.buffers()), objective, lambda: objective.samples, iterations=2
    )

    assert result.samples == objective.calls * SAMPLES
    assert result.samples >= 3 * SAMPLES
    expected = (math.log(result.loss_before) - math.log(result.loss_after)) / result.samples
    assert result.rate == pytest.approx(expected, rel=1e-12)
    assert result.rate > 0.0


def test_trial_losses_match_plain_cg():
    model = batch_norm_model()
    model.eval()  # No dropout or batch statistics, so the copy evaluates the same function.
    inputs, targets = regression_data()
    reference = copy.deepcopy(model)
    objective = CountingObjective(model, inputs, targets)
    reference_objective = CountingObjective(reference, inputs, targets)

    result = run_cg_trial(
        list(model.parameters()), list(model.buffers()), objective, lambda: objective.samples, iterations=2
    )
    optimizer = ConjugateGradient(reference.parameters(), max_iter=2)
    first_loss = float(optimizer.step(reference_objective))
    with torch.no_grad():
        final_loss = float(F.mse_loss(reference(inputs), targets))

    assert result.loss_before == pytest.approx(first_loss, rel=1e-6)
    assert result.loss_after == pytest.approx(final_loss, rel=1e-5)
    assert result.samples == reference_objective.samples


def test_trial_restores_global_generator():
    # The objective's DataLoader and dropout draw from the global generator. A trial that left it
    # advanced would change the next epoch's shuffle and so Adam's trajectory.
    model = batch_norm_model()
    inputs, targets = regression_data()
    objective = CountingObjective(model, inputs, targets)
    state = torch.get_rng_state()

    run_cg_trial(list(model.parameters()), list(model.buffers()), objective, lambda: objective.samples, iterations=2)

    assert torch.equal(torch.get_rng_state(), state)


def test_trial_overrides_max_iter():
    model = batch_norm_model()
    model.eval()
    inputs, targets = regression_data()
    objective = CountingObjective(model, inputs, targets)

    run_cg_trial(
        list(model.parameters()),
        list(model.buffers()),
        objective,
        lambda: objective.samples,
        iterations=1,
        cg_kwargs={"max_iter": 50, "max_eval": 100},
    )

    # One iteration: the start evaluation plus one line search of at most 25 evaluations.
    assert 2 <= objective.calls <= 26


# ---------------------------------------------------------------------- trials inside a Trainer


class ParameterRecorder(Callback):
    """Records a copy of the module's parameters at every epoch end (place it after the switch)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(parameter_snapshot(pl_module))


def fit_tiny(detector, epochs: int = 5) -> tuple[ConvexitySwitch, list[dict[str, torch.Tensor]], L.Trainer]:
    """Fit TinyClassifier with ``detector``; return the switch, the parameters per epoch end and the trainer."""
    L.seed_everything(0, verbose=False)
    switch = ConvexitySwitch(detector=detector, cg_kwargs={"max_iter": 2})
    recorder = ParameterRecorder()
    trainer = make_trainer(max_epochs=epochs, callbacks=[switch, recorder])
    trainer.fit(TinyClassifier())
    return switch, recorder.epochs, trainer


def test_trials_leave_adam_trajectory_unchanged():
    # margin 1e9: every post-peak check runs a trial and none wins, so the run stays with Adam.
    detector = CostAwareDetector(trial_every=1, trial_iterations=2, margin=1e9)
    with_trials, trial_params, trial_trainer = fit_tiny(detector)
    adam_only, adam_params, adam_trainer = fit_tiny(FixedEpochDetector(epoch=1000))

    assert not with_trials.switched
    assert adam_only.sample_gradients == 5 * SAMPLES_TINY
    # Trials ran at the four post-peak checks, each with at least three CG-batch evaluations.
    assert with_trials.sample_gradients - adam_only.sample_gradients >= 4 * 3 * SAMPLES_TINY
    for epoch, (trial, reference) in enumerate(zip(trial_params, adam_params)):
        for name in reference:
            assert torch.equal(trial[name], reference[name]), f"{name} differs after epoch {epoch}"
    trial_state = trial_trainer.optimizers[0].state_dict()["state"]
    adam_state = adam_trainer.optimizers[0].state_dict()["state"]
    for index in adam_state:
        assert torch.equal(trial_state[index]["exp_avg"], adam_state[index]["exp_avg"])
        assert torch.equal(trial_state[index]["exp_avg_sq"], adam_state[index]["exp_avg_sq"])


def test_winning_trial_swaps_at_unchanged_parameters():
    with_trials, trial_params, trainer = fit_tiny(CostAwareDetector(trial_every=1, trial_iterations=2, margin=1e-9))
    _, adam_params, _ = fit_tiny(FixedEpochDetector(epoch=1000), epochs=with_trials.switch_epoch + 1)

    assert with_trials.switched
    assert isinstance(trainer.optimizers[0], ConjugateGradient)
    assert "CG trial rate" in with_trials.switch_reason
    # At the end of the swap epoch the trial has run and CG has not stepped yet.
    for name, value in adam_params[-1].items():
        assert torch.equal(trial_params[with_trials.switch_epoch][name], value), name

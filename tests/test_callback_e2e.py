"""End-to-end runs of ``ConvexitySwitch`` with a real CPU ``Trainer`` on small synthetic data.

The default data are Gaussian blobs with 20% label noise, 256 samples and batch size 32.
The gradient norm peaks in epoch 0 and falls below 0.9 times the peak in epoch 1, so the
swap comes at the end of epoch 1 and later epochs run CG. The label noise keeps the minimum of
the loss well above 0, so "the loss keeps falling" is a real comparison.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FullLossRecorder,
    MemoryLogger,
    OptimizerRecorder,
    TinyClassifier,
    limit_cpu_threads,
    make_trainer,
)
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from lightning_twophase import ConjugateGradient, ConvexitySwitch, Phase
from lightning_twophase.tensorboard import TAG

limit_cpu_threads()

#: One micro-batch per CG evaluation: the whole 256-sample training set in one forward pass.
WHOLE_SET_MICRO_BATCH = 256
SAMPLES = 256
BATCH_SIZE = 32
STEPS_PER_EPOCH = SAMPLES // BATCH_SIZE


def fit(model: TinyClassifier, switch: ConvexitySwitch, max_epochs: int = 4, callbacks=(), **trainer_kwargs):
    """Fit ``model`` with ``switch`` first in the callback list; return the trainer."""
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[switch, *callbacks], **trainer_kwargs)
    trainer.fit(model)
    return trainer


def cg_phase_losses(logger: MemoryLogger) -> list[float]:
    """Return the logged ``twophase/loss`` of every CG-phase record, in step order."""
    return [float(m[TAG.LOSS]) for _, m in logger.records if m.get(TAG.PHASE) == float(Phase.CG) and TAG.LOSS in m]


def assert_non_increasing(values: list[float], rtol: float = 1e-5) -> None:
    """Assert that each value is at most the previous one, up to float32 round-off."""
    for index, (before, after) in enumerate(zip(values, values[1:])):
        assert after <= before * (1 + rtol), f"value rose at position {index + 1}: {before} -> {after}"


def whole_set_loss(model: TinyClassifier) -> float:
    """Return the mean cross-entropy over the whole training set at the current parameters."""
    inputs, labels = model.dataset.tensors
    with torch.no_grad():
        return float(F.cross_entropy(model(inputs), labels))


def test_swap_installs_cg_and_loss_falls():
    torch.manual_seed(0)
    model = TinyClassifier()
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)
    recorder, logger = OptimizerRecorder(), MemoryLogger()

    trainer = fit(model, switch, max_epochs=5, callbacks=[recorder], logger=logger)

    assert switch.switched
    assert switch.phase == Phase.CG
    assert switch.switch_epoch == 1
    assert switch.switch_step == 2 * STEPS_PER_EPOCH
    assert "fell below 0.9" in switch.switch_reason
    assert isinstance(trainer.optimizers[0], ConjugateGradient)

    stepped_before = {name for step, name in recorder.steps if step < switch.switch_step}
    stepped_after = {name for step, name in recorder.steps if step >= switch.switch_step}
    assert stepped_before == {"Adam"}
    assert stepped_after == {"ConjugateGradient"}
    assert trainer.global_step == 5 * STEPS_PER_EPOCH

    cg_losses = cg_phase_losses(logger)
    assert len(cg_losses) == 3 * STEPS_PER_EPOCH
    assert_non_increasing(cg_losses)
    assert cg_losses[-1] < 0.5 * cg_losses[0]
    # The CG objective is the mean loss over the whole training set.
    assert cg_losses[-1] == pytest.approx(whole_set_loss(model), rel=1e-4)


def test_cg_history_points_fall():
    # The CG-phase points of switch.history (one per CG step that moved) feed the norm-versus-loss figure.
    model = TinyClassifier()
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)

    fit(model, switch, max_epochs=5)

    adam_points = [p for p in switch.history if p.phase == int(Phase.ADAM)]
    cg_points = [p for p in switch.history if p.phase == int(Phase.CG)]
    assert [p.epoch for p in adam_points] == [0, 1]
    assert len(cg_points) >= 3
    assert {p.epoch for p in cg_points} <= {2, 3, 4}
    assert [p.step for p in cg_points] == sorted({p.step for p in cg_points})
    assert all(p.grad_norm > 0 for p in cg_points)
    assert_non_increasing([p.loss for p in cg_points])
    assert cg_points[-1].loss < cg_points[0].loss


def test_loss_at_swap_above_end_loss():
    # The whole-set loss right after the swap decision is compared with the loss at the end.
    model = TinyClassifier()
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)
    losses = FullLossRecorder()

    fit(model, switch, max_epochs=5, callbacks=[losses])

    by_epoch = {epoch: loss for epoch, _, loss in losses.losses}
    after_swap = [by_epoch[epoch] for epoch in range(switch.switch_epoch, 5)]
    assert_non_increasing(after_swap)
    assert after_swap[-1] < 0.5 * after_swap[0]


def test_dict_output_and_sample_count():
    model = TinyClassifier(dict_output=True)
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)

    trainer = fit(model, switch, max_epochs=3)

    objective = switch._objective
    optimizer_evaluations = trainer.optimizers[0].state[next(model.parameters())]["func_evals"]
    assert switch.switched
    assert objective.evaluations > 0
    # The first closure call of every CG step after the first reuses the previous step's end point.
    cg_steps = trainer.global_step - switch.switch_step
    assert objective.reused == cg_steps - 1
    assert objective.evaluations + objective.reused == optimizer_evaluations
    # Every training batch counts its mini-batch; every evaluation counts the whole set.
    assert switch.sample_gradients == trainer.global_step * BATCH_SIZE + objective.evaluations * SAMPLES


def test_guard_start_evaluation_is_reused():
    # A margin of 1e-9 never loses a window, so the run stays in CG with the guard armed.
    torch.manual_seed(0)
    switch = ConvexitySwitch(
        detector="peak_ratio", cg_micro_batch_size=WHOLE_SET_MICRO_BATCH, min_epochs=3, switch_back_margin=1e-9
    )

    trainer = fit(TinyClassifier(), switch, max_epochs=5)

    objective = switch._objective
    optimizer_evaluations = trainer.optimizers[0].state[next(trainer.lightning_module.parameters())]["func_evals"]
    assert switch.switched
    assert switch._guard is not None
    assert switch._guard.armed
    # The guard's starting evaluation at the swap serves the first CG step, so every step
    # reuses one evaluation and the guard costs no extra pass over the CG batch.
    cg_steps = trainer.global_step - switch.switch_step
    assert objective.reused == cg_steps
    assert objective.evaluations - 1 + objective.reused == optimizer_evaluations
    assert switch.sample_gradients == trainer.global_step * BATCH_SIZE + objective.evaluations * SAMPLES


def test_csv_logger_columns(tmp_path: Path):
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)
    logger = CSVLogger(tmp_path, name="csv", version=0)

    fit(TinyClassifier(), switch, max_epochs=3, logger=logger)

    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    for tag in (TAG.LOSS, TAG.GRAD_NORM, TAG.GRAD_NORM_MAX, TAG.THRESHOLD, TAG.PHASE, TAG.SAMPLES, TAG.CG_STEP_SIZE):
        assert tag in columns, f"{tag} missing from metrics.csv columns {sorted(columns)}"
    phases = [float(row[TAG.PHASE]) for row in rows if row[TAG.PHASE]]
    assert phases[0] == 0.0
    assert phases[-1] == 1.0


@pytest.mark.parametrize("interval", ["epoch", "step_interval"])
def test_schedulers_dropped_lr_monitor_continues(interval: str):
    model = TinyClassifier(scheduler=interval)
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)
    logger = MemoryLogger()
    monitor = LearningRateMonitor(logging_interval="step")

    trainer = fit(model, switch, max_epochs=4, callbacks=[monitor], logger=logger)

    assert switch.switched
    assert trainer.lr_scheduler_configs == []
    lr_steps = [step for step, metrics in logger.records if any(key.startswith("lr-") for key in metrics)]
    assert max(lr_steps) > switch.switch_step, "LearningRateMonitor stopped logging at the swap"
    adam_lrs = [value for _, value in logger.values("lr-Adam")]
    assert adam_lrs[-1] < adam_lrs[0], "the scheduler did not run before the swap"


def test_weight_decay_warning():
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)

    with pytest.warns(UserWarning, match=r"without weight_decay=0\.001 \(parameter group 0\)"):
        fit(TinyClassifier(weight_decay=1e-3), switch, max_epochs=2)

    assert switch.switched


def test_gradient_clipping_warning_cg_converges():
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)
    logger = MemoryLogger()

    with pytest.warns(UserWarning, match=r"gradient_clip_val=0\.5 is not applied in the CG phase"):
        fit(TinyClassifier(), switch, max_epochs=4, logger=logger, gradient_clip_val=0.5)

    cg_losses = cg_phase_losses(logger)
    assert switch.switched
    assert len(cg_losses) == 2 * STEPS_PER_EPOCH
    assert_non_increasing(cg_losses)
    assert cg_losses[-1] < 0.7 * cg_losses[0]


def test_gradient_accumulation_warning_training_continues():
    model = TinyClassifier()
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)
    logger = MemoryLogger()

    with pytest.warns(UserWarning, match=r"accumulate_grad_batches=2 is set to 1 for the CG phase"):
        trainer = fit(model, switch, max_epochs=4, logger=logger, accumulate_grad_batches=2)

    assert switch.switched
    assert trainer.accumulate_grad_batches == 1
    assert switch.switch_step == (switch.switch_epoch + 1) * STEPS_PER_EPOCH // 2
    # Every batch after the swap is one CG step.
    cg_epochs = 4 - switch.switch_epoch - 1
    assert trainer.global_step == switch.switch_step + cg_epochs * STEPS_PER_EPOCH
    cg_losses = cg_phase_losses(logger)
    assert len(cg_losses) == cg_epochs * STEPS_PER_EPOCH
    assert_non_increasing(cg_losses)
    assert cg_losses[-1] < cg_losses[0]
    assert cg_losses[-1] == pytest.approx(whole_set_loss(model), rel=1e-4)


def test_accumulation_logs_unscaled_loss():
    # Lightning divides the returned loss by accumulate_grad_batches; the logged mean must not be.
    model = TinyClassifier()
    logger = MemoryLogger()

    fit(model, ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, ratio=0.01), max_epochs=1, logger=logger, accumulate_grad_batches=2)

    logged = logger.values(TAG.LOSS)
    assert len(logged) == 1
    assert logged[0][1] == pytest.approx(sum(model.step_losses) / STEPS_PER_EPOCH, rel=1e-5)


def test_non_finite_loss_skipped_with_warning():
    model = TinyClassifier(nan_epochs=[1])
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)

    with pytest.warns(UserWarning, match=r"Skipped non-finite statistics at step 16\. The detector ignored this check"):
        fit(model, switch, max_epochs=5)

    adam_epochs = [p.epoch for p in switch.history if p.phase == int(Phase.ADAM)]
    assert 1 not in adam_epochs
    assert adam_epochs[0] == 0
    assert switch.switched
    assert switch.switch_epoch >= 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_monitor_uses_logged_metric():
    # The module logs train_loss = 10 x the returned loss, so the monitored history is 10x larger.
    histories = []
    for monitor in (None, "train_loss"):
        torch.manual_seed(0)
        switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, monitor=monitor, ratio=0.01)
        fit(TinyClassifier(logged_loss_scale=10.0), switch, max_epochs=2)
        histories.append(switch.history)

    returned, monitored = histories
    assert len(returned) == len(monitored) == 2
    for plain, scaled in zip(returned, monitored):
        assert scaled.loss == pytest.approx(10.0 * plain.loss, rel=1e-5)
        assert scaled.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)


def test_lbfgs_factory_swaps_and_loss_falls():
    model = TinyClassifier()
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None,
        cg_micro_batch_size=WHOLE_SET_MICRO_BATCH,
        optimizer_factory=lambda groups: torch.optim.LBFGS(groups, line_search_fn="strong_wolfe", max_iter=5),
    )
    recorder, losses = OptimizerRecorder(), FullLossRecorder()

    trainer = fit(model, switch, max_epochs=5, callbacks=[recorder, losses])

    assert switch.switched
    assert isinstance(trainer.optimizers[0], torch.optim.LBFGS)
    assert {name for step, name in recorder.steps if step >= switch.switch_step} == {"LBFGS"}
    by_epoch = {epoch: loss for epoch, _, loss in losses.losses}
    after_swap = [by_epoch[epoch] for epoch in range(switch.switch_epoch, 5)]
    assert_non_increasing(after_swap)
    assert after_swap[-1] < 0.5 * after_swap[0]


def test_check_every_n_steps_swaps_on_multiple():
    n = 5
    model = TinyClassifier()
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, check_every_n_steps=n, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)

    trainer = fit(model, switch, max_epochs=4)

    adam_steps = [p.step for p in switch.history if p.phase == int(Phase.ADAM)]
    assert switch.switched
    assert switch.switch_step % n == 0
    assert adam_steps == list(range(n, switch.switch_step + 1, n))
    assert isinstance(trainer.optimizers[0], ConjugateGradient)


def test_cg_subset_evaluates_exact_sample_count():
    subset = 200
    model = TinyClassifier()
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_batch_size=subset)
    logger = MemoryLogger()

    trainer = fit(model, switch, max_epochs=3, logger=logger)

    assert switch.switched
    source = switch._objective.source
    assert source.total == subset
    assert sum(len(batch[1]) for batch in source) == subset
    assert len(source) == -(-subset // BATCH_SIZE)

    samples_at_swap = logger.values(TAG.SAMPLES)[len([p for p in switch.history if p.phase == 0]) - 1][1]
    cg_batches = trainer.global_step - switch.switch_step
    expected = samples_at_swap + switch._objective.evaluations * subset + cg_batches * BATCH_SIZE
    assert switch.sample_gradients == expected


def test_iterable_dataset_with_cg_batch_size():
    model = TinyClassifier(iterable=True)
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_batch_size=100)
    logger = MemoryLogger()

    fit(model, switch, max_epochs=4, logger=logger)

    # The first 100 samples round up to whole batches of 32.
    assert switch.switched
    assert switch._objective.source.total == 128
    cg_losses = cg_phase_losses(logger)
    assert_non_increasing(cg_losses)
    assert cg_losses[-1] < cg_losses[0]


def test_dropout_warned_at_swap():
    model = TinyClassifier()
    model.hidden_layer = torch.nn.Sequential(model.hidden_layer, torch.nn.Dropout(0.2))
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)

    with pytest.warns(UserWarning, match=r"dropout in hidden_layer\.1 makes every CG-batch evaluation random"):
        fit(model, switch, max_epochs=3)

    assert switch.switched


def test_second_fit_starts_fresh():
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)
    fit(TinyClassifier(), switch, max_epochs=4)
    first_switch_epoch = switch.switch_epoch

    model = TinyClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = fit(model, switch, max_epochs=4)

    assert switch.switch_epoch == first_switch_epoch
    assert [p.phase for p in switch.history[:2]] == [int(Phase.ADAM), int(Phase.ADAM)]
    assert isinstance(trainer.optimizers[0], ConjugateGradient)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cg_convergence_announced_once(caplog):
    torch.manual_seed(0)
    switch = ConvexitySwitch(
        detector="peak_ratio",
        cg_micro_batch_size=WHOLE_SET_MICRO_BATCH,
        cg_kwargs={"tolerance_grad": 1e-2, "max_iter": 5},
        switch_back_patience=None,
    )

    with caplog.at_level("INFO"):
        fit(TinyClassifier(), switch, max_epochs=8)

    messages = [r.getMessage() for r in caplog.records if "CG converged" in r.getMessage()]
    assert len(messages) == 1
    assert "lower tolerance_grad/tolerance_change" in messages[0]


def test_scheduler_drop_warned():
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, cg_micro_batch_size=WHOLE_SET_MICRO_BATCH)

    with pytest.warns(UserWarning, match=r"learning-rate schedulers StepLR are dropped at the swap"):
        fit(TinyClassifier(scheduler="step"), switch, max_epochs=3)

    assert switch.switched

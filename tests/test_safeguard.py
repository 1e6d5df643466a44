"""Swap-back safeguard: ``SwapBackGuard`` alone, and ``ConvexitySwitch`` returning to Adam in a real Trainer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator

from helpers import OptimizerRecorder, TinyClassifier, make_trainer
from lightning_twophase import ConvexitySwitch, Phase
from lightning_twophase.detection import FixedEpochDetector
from lightning_twophase.safeguard import SwapBackGuard, adam_rate_from_history
from lightning_twophase.tensorboard import TAG

#: Training samples of TinyClassifier's default blobs data; also the guard's window.
SAMPLES = 256

#: TinyClassifier's default batch size gives this many optimizer steps per epoch.
STEPS_PER_EPOCH = 8

SWAP_BACK_TEXT_TAG = f"{TAG.SWITCH_BACK}/text_summary"


# ---------------------------------------------------------------------- adam_rate_from_history


def test_adam_rate_hand_computed():
    points = [(1.0, 0), (math.exp(-1.0), 100), (math.exp(-2.0), 200), (math.exp(-4.0), 300)]

    assert adam_rate_from_history(points, window=3) == pytest.approx(4.0 / 300.0, rel=1e-12)
    assert adam_rate_from_history(points, window=1) == pytest.approx(2.0 / 100.0, rel=1e-12)
    assert adam_rate_from_history(points, window=10) == pytest.approx(4.0 / 300.0, rel=1e-12)


def test_adam_rate_skips_unusable_losses():
    points = [(1.0, 0), (float("nan"), 50), (0.0, 80), (math.exp(-1.0), 100)]

    assert adam_rate_from_history(points) == pytest.approx(1.0 / 100.0, rel=1e-12)


@pytest.mark.parametrize("points", [[], [(1.0, 0)], [(1.0, 0), (float("inf"), 10)], [(1.0, 10), (0.5, 10)]])
def test_adam_rate_undefined(points):
    assert adam_rate_from_history(points) is None


# ---------------------------------------------------------------------- SwapBackGuard


def armed_guard(patience: int = 2, margin: float = 1.0) -> SwapBackGuard:
    """Return a guard with Adam's rate 0.01 per sample, started at loss 1 after 1000 samples."""
    guard = SwapBackGuard(window_samples=100, patience=patience, margin=margin)
    guard.start(adam_rate=0.01, loss=1.0, samples=1000)
    return guard


def losing_loss(loss: float) -> float:
    """Return the loss 100 samples later at half of Adam's rate."""
    return loss * math.exp(-0.5)


def winning_loss(loss: float) -> float:
    """Return the loss 100 samples later at twice Adam's rate."""
    return loss * math.exp(-2.0)


def test_guard_open_window_gives_no_verdict():
    guard = armed_guard(patience=1)

    verdict = guard.update(loss=0.01, samples=1099)

    assert not verdict.swap_back
    assert math.isnan(verdict.cg_rate)
    assert guard.state_dict()["failures"] == 0
    assert guard.state_dict()["mark_samples"] == 1000


def test_guard_counts_losing_windows():
    guard = armed_guard(patience=2)

    first = guard.update(loss=losing_loss(1.0), samples=1100)
    second = guard.update(loss=losing_loss(losing_loss(1.0)), samples=1200)

    assert first.cg_rate == pytest.approx(0.005, rel=1e-9)
    assert not first.swap_back
    assert "1 losing window(s) of 2" in first.message
    assert second.swap_back
    assert "2 losing window(s) of 2" in second.message


def test_guard_winning_window_resets():
    guard = armed_guard(patience=2)
    loss = 1.0
    verdicts = []
    for change in (losing_loss, winning_loss, losing_loss, losing_loss):
        loss = change(loss)
        verdicts.append(guard.update(loss=loss, samples=1000 + 100 * (len(verdicts) + 1)))

    assert [v.swap_back for v in verdicts] == [False, False, False, True]
    assert verdicts[1].cg_rate == pytest.approx(0.02, rel=1e-9)


def test_guard_margin_scales_adam_rate():
    # CG at twice Adam's rate still loses against a margin of 3.
    guard = armed_guard(patience=1, margin=3.0)

    verdict = guard.update(loss=winning_loss(1.0), samples=1100)

    assert verdict.swap_back


def test_guard_window_longer_than_step():
    guard = armed_guard(patience=1)
    guard.update(loss=0.9, samples=1050)

    verdict = guard.update(loss=math.exp(-0.5), samples=1100)

    # The window closed at 1100 samples, measured from the mark at 1000, not from 1050.
    assert verdict.cg_rate == pytest.approx(0.005, rel=1e-9)
    assert verdict.swap_back


@pytest.mark.parametrize("adam_rate", [None, 0.0, -0.01])
def test_guard_unarmed_never_swaps_back(adam_rate):
    guard = SwapBackGuard(window_samples=10, patience=1)
    guard.start(adam_rate=adam_rate, loss=1.0, samples=0)

    verdict = guard.update(loss=10.0, samples=1000)

    assert not guard.armed
    assert not verdict.swap_back
    assert "not armed" in verdict.message


def test_guard_state_round_trip():
    original = armed_guard(patience=2)
    original.update(loss=losing_loss(1.0), samples=1100)
    restored = SwapBackGuard(window_samples=100, patience=2)
    restored.load_state_dict(original.state_dict())

    continued = original.update(loss=losing_loss(losing_loss(1.0)), samples=1200)
    resumed = restored.update(loss=losing_loss(losing_loss(1.0)), samples=1200)

    assert resumed.swap_back
    assert continued.swap_back
    assert resumed.message == continued.message
    assert restored.state_dict() == original.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_samples": 0}, "Invalid window_samples: 0"),
        ({"patience": 0}, "Invalid switch_back_patience: 0"),
        ({"margin": 0.0}, "Invalid switch_back_margin: 0.0"),
        ({"margin": float("nan")}, "Invalid switch_back_margin: nan"),
    ],
)
def test_guard_invalid_arguments(kwargs, message):
    arguments = {"window_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        SwapBackGuard(**arguments)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"switch_back_patience": 0}, "Invalid switch_back_patience: 0"),
        ({"switch_back_patience": 1, "switch_back_margin": -1.0}, "Invalid switch_back_margin: -1.0"),
    ],
)
def test_callback_validates_guard_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvexitySwitch(detector="peak_ratio", **kwargs)


# ---------------------------------------------------------------------- swap back in a Trainer


def clone_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    state = optimizer.state_dict()["state"]
    return {index: {key: value.clone() for key, value in values.items()} for index, values in state.items()}


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for index, values in expected.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(actual[index][key], values[key]), f"{key} of parameter {index}"


class AdamAtSwap(Callback):
    """Captures the first optimizer and its state at the end of ``epoch``; place it before the switch.

    Lightning runs callbacks in list order, so the capture reads the optimizer that the switch is
    about to replace.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.optimizer: torch.optim.Optimizer | None = None
        self.state: dict | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.optimizer = trainer.optimizers[0]
            self.state = clone_state(self.optimizer)


class OptimizerAtSwapBack(Callback):
    """Captures the stepped optimizer and its state right after the first swap back; place it after the switch."""

    def __init__(self, switch: ConvexitySwitch) -> None:
        self.switch = switch
        self.optimizer: torch.optim.Optimizer | None = None
        self.state: dict | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.switch.switch_backs and self.optimizer is None:
            self.optimizer = trainer.optimizers[0]
            self.state = clone_state(self.optimizer)


def losing_switch(patience: int = 1) -> ConvexitySwitch:
    # Swap at the end of epoch 1, after two Adam checks give a positive Adam rate. A margin of 1e6
    # makes every CG window a losing one.
    return ConvexitySwitch(
        detector=FixedEpochDetector(epoch=1),
        cg_kwargs={"max_iter": 1},
        switch_back_patience=patience,
        switch_back_margin=1e6,
    )


@pytest.fixture(scope="module")
def swap_back_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    switch = losing_switch()
    at_swap, at_swap_back, steps = AdamAtSwap(epoch=1), OptimizerAtSwapBack(switch), OptimizerRecorder()
    logger = TensorBoardLogger(tmp_path_factory.mktemp("swap_back"), name="tb", version=0)
    trainer = make_trainer(max_epochs=4, callbacks=[at_swap, switch, at_swap_back, steps], logger=logger)
    trainer.fit(TinyClassifier())

    guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance=guidance)
    events.Reload()
    return {"switch": switch, "trainer": trainer, "at_swap": at_swap, "at_swap_back": at_swap_back,
            "steps": steps.steps, "events": events}


def test_swap_back_happens_once(swap_back_run):
    switch = swap_back_run["switch"]

    assert switch.switch_epoch == 1
    assert len(switch.switch_backs) == 1
    assert switch.switch_backs[0]["epoch"] == 2
    assert switch.switch_backs[0]["step"] == 2 * STEPS_PER_EPOCH + 1
    assert "1 losing window(s) of 1" in switch.switch_backs[0]["reason"]
    assert switch.phase == Phase.ADAM
    assert not switch.switched


def test_swap_back_restores_same_adam(swap_back_run):
    at_swap, at_swap_back = swap_back_run["at_swap"], swap_back_run["at_swap_back"]

    assert isinstance(at_swap.optimizer, torch.optim.Adam)
    assert at_swap_back.optimizer is at_swap.optimizer
    assert swap_back_run["trainer"].optimizers[0] is at_swap.optimizer
    assert_same_state(at_swap_back.state, at_swap.state)


def test_swap_back_steps_adam_afterwards(swap_back_run):
    steps = swap_back_run["steps"]
    swap_step = 2 * STEPS_PER_EPOCH

    assert [name for step, name in steps if step < swap_step] == ["Adam"] * swap_step
    assert [name for step, name in steps if step == swap_step] == ["ConjugateGradient"]
    after = [name for step, name in steps if step > swap_step]
    assert after == ["Adam"] * (4 * STEPS_PER_EPOCH - swap_step - 1)


def test_swap_back_text_written(swap_back_run):
    events, switch = swap_back_run["events"], swap_back_run["switch"]

    assert SWAP_BACK_TEXT_TAG in events.Tags()["tensors"]
    entries = events.Tensors(SWAP_BACK_TEXT_TAG)
    assert len(entries) == 1
    text = entries[0].tensor_proto.string_val[0].decode()
    assert "Swapped back to Adam" in text
    assert entries[0].step == switch.switch_backs[0]["step"]


def test_swap_back_phase_scalar(swap_back_run):
    phases = [(event.step, event.value) for event in swap_back_run["events"].Scalars(TAG.PHASE)]
    back_step = swap_back_run["switch"].switch_backs[0]["step"]

    cg_steps = [step for step, value in phases if value == 1.0]
    assert cg_steps, "no CG phase logged"
    assert max(cg_steps) <= back_step
    assert (back_step, 0.0) in phases
    assert all(value == 0.0 for step, value in phases if step > back_step)
    assert phases[-1][1] == 0.0


# ---------------------------------------------------------------------- resume in the CG phase


def test_resume_in_cg_restores_adam_state(tmp_path: Path):
    L.seed_everything(0, verbose=False)
    # Patience 1000: the first run stays in CG, so its checkpoints hold a CG optimizer.
    first = losing_switch(patience=1000)
    at_swap = AdamAtSwap(epoch=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[at_swap, first, checkpoints], enable_checkpointing=True)
    trainer.fit(TinyClassifier())
    assert first.switched and not first.switch_backs

    # The epoch-2 checkpoint was written after eight CG steps, so it holds CG state and a guard
    # with eight losing windows.
    checkpoint = torch.load(tmp_path / "epoch=2.ckpt", weights_only=False)
    saved = next(state for key, state in checkpoint["callbacks"].items() if key.startswith("ConvexitySwitch"))
    assert saved["phase"] == int(Phase.CG)
    assert saved["first_optimizer_state"] is not None
    assert "direction" in checkpoint["optimizer_states"][0]["state"][0]
    assert saved["guard"]["failures"] == STEPS_PER_EPOCH
    assert_same_state(saved["first_optimizer_state"]["state"], at_swap.state)

    L.seed_everything(0, verbose=False)
    resumed = losing_switch(patience=1)
    at_swap_back = OptimizerAtSwapBack(resumed)
    trainer = make_trainer(tmp_path / "resumed", max_epochs=4, callbacks=[resumed, at_swap_back])
    trainer.fit(TinyClassifier(), ckpt_path=tmp_path / "epoch=2.ckpt")

    assert len(resumed.switch_backs) == 1
    assert resumed.switch_backs[0]["step"] == 3 * STEPS_PER_EPOCH + 1
    assert isinstance(at_swap_back.optimizer, torch.optim.Adam)
    assert trainer.optimizers[0] is at_swap_back.optimizer
    assert_same_state(at_swap_back.state, at_swap.state)
    assert resumed.phase == Phase.ADAM


def test_swap_back_with_iterable_dataset():
    # An IterableDataset has no length, so the guard's window is the CG batch.
    L.seed_everything(0, verbose=False)
    switch = ConvexitySwitch(
        detector=FixedEpochDetector(epoch=1),
        cg_batch_size=128,
        cg_kwargs={"max_iter": 1},
        switch_back_patience=1,
        switch_back_margin=1e6,
    )
    trainer = make_trainer(max_epochs=3, callbacks=[switch])
    trainer.fit(TinyClassifier(iterable=True))

    assert len(switch.switch_backs) == 1
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)

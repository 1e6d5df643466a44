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
from lightning_twophase.safeguard import AdamTrend, SwapBackGuard, fit_adam_trend
from lightning_twophase.tensorboard import TAG

#: Training samples of TinyClassifier's default blobs data; also the guard's window.
SAMPLES = 256

#: TinyClassifier's default batch size gives this many optimizer steps per epoch.
STEPS_PER_EPOCH = 8

SWAP_BACK_TEXT_TAG = f"{TAG.SWITCH_BACK}/text_summary"

#: Epochs of the swap-back run.
MAX_EPOCHS = 5


# ---------------------------------------------------------------------- fit_adam_trend


def power_law_points(scale: float, exponent: float, samples: list[int]) -> list[tuple[float, int]]:
    return [(scale * s ** -exponent, s) for s in samples]


def test_trend_recovers_power_law():
    points = power_law_points(4.0, 1.5, [100, 200, 400, 800, 1600])

    trend = fit_adam_trend(points)

    assert trend.exponent == pytest.approx(1.5, rel=1e-12)
    assert trend.log_scale == pytest.approx(math.log(4.0), rel=1e-12)
    assert trend.points == 2  # only the checks at or after half of the last sample count: 800, 1600
    assert trend.samples_at(4.0 * 1000 ** -1.5) == pytest.approx(1000.0, rel=1e-9)
    assert trend.rate_at(4.0 * 1000 ** -1.5) == pytest.approx(1.5 / 1000.0, rel=1e-9)


def test_trend_ignores_first_half():
    # A flat start (loss 1) followed by a 1/S decay: the fit uses only the decay.
    early = [(1.0, s) for s in (100, 200, 300)]
    late = power_law_points(1000.0, 1.0, [1000, 1200, 1500, 2000])

    trend = fit_adam_trend(early + late)

    assert trend.exponent == pytest.approx(1.0, rel=1e-12)


def test_trend_skips_unusable_points():
    points = [(1.0, 0), (float("nan"), 50), (0.0, 80), *power_law_points(2.0, 0.5, [100, 150, 200])]

    assert fit_adam_trend(points).exponent == pytest.approx(0.5, rel=1e-12)


def test_trend_from_two_checks():
    trend = fit_adam_trend(power_law_points(1.0, 2.0, [100, 200]))

    assert trend.exponent == pytest.approx(2.0, rel=1e-12)
    assert trend.points == 2


def test_trend_of_rising_loss_is_flat():
    trend = fit_adam_trend(power_law_points(1.0, -1.0, [100, 150, 200]))

    assert trend.exponent == 0.0
    assert trend.rate_at(0.5) == 0.0


@pytest.mark.parametrize(
    "points",
    [[], [(1.0, 10)], [(1.0, 10), (0.9, 10), (0.8, 10)], [(1.0, 0), (float("inf"), 20), (0.5, 30)]],
)
def test_trend_undefined(points):
    assert fit_adam_trend(points) is None


# ---------------------------------------------------------------------- SwapBackGuard

#: Adam's trend L = 1000 / S: at loss L it spent 1000 / L samples and falls by L / 1000 per sample.
TREND = AdamTrend(log_scale=math.log(1000.0), exponent=1.0, points=3)


def armed_guard(patience: int = 2, margin: float = 1.0) -> SwapBackGuard:
    """Return a guard on TREND, started at loss 1 after 2000 samples, where the trend is at 0.5.

    CG starts behind Adam's trend, so a window is lost whenever CG is also slower.
    """
    guard = SwapBackGuard(window_samples=100, patience=patience, margin=margin)
    guard.start(TREND, loss=1.0, samples=2000)
    return guard


def losing_loss(loss: float) -> float:
    """Return the loss 100 samples later at a rate of 5e-4, about half of Adam's near loss 1."""
    return loss * math.exp(-0.05)


def winning_loss(loss: float) -> float:
    """Return the loss 100 samples later at a rate of 2e-3, about twice Adam's near loss 1."""
    return loss * math.exp(-0.2)


def test_guard_open_window_gives_no_verdict():
    guard = armed_guard(patience=1)

    verdict = guard.update(loss=0.01, samples=2099)

    assert not verdict.swap_back
    assert math.isnan(verdict.cg_rate)
    assert guard.state_dict()["failures"] == 0
    assert guard.state_dict()["mark_samples"] == 2000


def test_guard_compares_with_adam_rate_at_loss_level():
    guard = armed_guard(patience=2)

    first = guard.update(loss=losing_loss(1.0), samples=2100)

    assert first.cg_rate == pytest.approx(5e-4, rel=1e-9)
    # Adam's rate at the window's geometric-mean loss exp(-0.025) is exp(-0.025) / 1000.
    assert first.adam_rate == pytest.approx(math.exp(-0.025) / 1000.0, rel=1e-9)
    assert not first.swap_back
    assert "1 lost window(s) of 2" in first.message


def test_guard_counts_losing_windows():
    guard = armed_guard(patience=2)

    first = guard.update(loss=losing_loss(1.0), samples=2100)
    second = guard.update(loss=losing_loss(losing_loss(1.0)), samples=2200)

    assert not first.swap_back
    assert second.swap_back
    assert "2 lost window(s) of 2" in second.message


def test_guard_winning_window_resets():
    guard = armed_guard(patience=2)
    loss = 1.0
    verdicts = []
    for change in (losing_loss, winning_loss, losing_loss, losing_loss):
        loss = change(loss)
        verdicts.append(guard.update(loss=loss, samples=2000 + 100 * (len(verdicts) + 1)))

    assert [v.swap_back for v in verdicts] == [False, False, False, True]
    assert verdicts[1].cg_rate == pytest.approx(2e-3, rel=1e-9)


def test_guard_lower_loss_lowers_adam_rate():
    # The same CG rate loses near loss 1 and wins near loss 0.1, where Adam's trend is 10x slower.
    high, low = armed_guard(patience=1), SwapBackGuard(window_samples=100, patience=1, margin=1.0)
    low.start(TREND, loss=0.1, samples=1000)

    assert high.update(loss=losing_loss(1.0), samples=2100).swap_back
    assert not low.update(loss=losing_loss(0.1), samples=1100).swap_back


def test_guard_keeps_cg_below_adam_trend():
    # A stalled CG (rate 0) far below the loss Adam's trend reaches (1000 / 1100) loses no window.
    guard = armed_guard(patience=1)
    guard.start(TREND, loss=1e-6, samples=1000)

    verdict = guard.update(loss=1e-6, samples=2100)

    assert verdict.cg_rate == 0.0
    assert verdict.adam_rate > 0.0
    assert not verdict.swap_back
    assert guard.state_dict()["failures"] == 0


def test_guard_margin_scales_adam_rate():
    # CG at about twice Adam's rate still loses against a margin of 3.
    guard = armed_guard(patience=1, margin=3.0)

    verdict = guard.update(loss=winning_loss(1.0), samples=2100)

    assert verdict.swap_back


def test_guard_window_longer_than_step():
    guard = armed_guard(patience=1)
    guard.update(loss=0.99, samples=2050)

    verdict = guard.update(loss=math.exp(-0.05), samples=2100)

    # The window closed at 2100 samples, measured from the mark at 2000, not from 2050.
    assert verdict.cg_rate == pytest.approx(5e-4, rel=1e-9)
    assert verdict.swap_back


@pytest.mark.parametrize(
    "trend", [None, AdamTrend(0.0, 0.0, 3)], ids=["no trend", "flat trend"]
)
def test_guard_unarmed_never_swaps_back(trend):
    guard = SwapBackGuard(window_samples=10, patience=1)
    guard.start(trend, loss=1.0, samples=0)

    verdict = guard.update(loss=10.0, samples=1000)

    assert not guard.armed
    assert not verdict.swap_back
    assert "not armed" in verdict.message


def test_guard_state_round_trip():
    original = armed_guard(patience=2)
    original.update(loss=losing_loss(1.0), samples=2100)
    restored = SwapBackGuard(window_samples=100, patience=2, margin=1.0)
    restored.load_state_dict(original.state_dict())

    continued = original.update(loss=losing_loss(losing_loss(1.0)), samples=2200)
    resumed = restored.update(loss=losing_loss(losing_loss(1.0)), samples=2200)

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
        ({"swap_retry_factor": 0.5}, "Invalid swap_retry_factor: 0.5"),
        ({"swap_retry_factor": float("inf")}, "Invalid swap_retry_factor: inf"),
        ({"swap_retry_factor": True}, "Invalid swap_retry_factor: True"),
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


#: The losing switch swaps at the end of this epoch, after three Adam checks to fit the trend.
SWAP_EPOCH = 2


def losing_switch(patience: int = 1, retry_factor: float | None = None) -> ConvexitySwitch:
    # A margin of 1e6 makes every CG window a losing one. Plain CG (history_size=0) spends at
    # least two evaluations per step, so every step after the first fills a window.
    return ConvexitySwitch(
        detector=FixedEpochDetector(epoch=SWAP_EPOCH),
        cg_kwargs={"max_iter": 1, "history_size": 0},
        switch_back_patience=patience,
        switch_back_margin=1e6,
        swap_retry_factor=retry_factor,
    )


@pytest.fixture(scope="module")
def swap_back_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    switch = losing_switch()
    at_swap, at_swap_back, steps = AdamAtSwap(SWAP_EPOCH), OptimizerAtSwapBack(switch), OptimizerRecorder()
    logger = TensorBoardLogger(tmp_path_factory.mktemp("swap_back"), name="tb", version=0)
    trainer = make_trainer(max_epochs=MAX_EPOCHS, callbacks=[at_swap, switch, at_swap_back, steps], logger=logger)
    trainer.fit(TinyClassifier())

    guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance=guidance)
    events.Reload()
    return {"switch": switch, "trainer": trainer, "at_swap": at_swap, "at_swap_back": at_swap_back,
            "steps": steps.steps, "events": events}


def test_swap_back_happens_once(swap_back_run):
    switch = swap_back_run["switch"]

    assert switch.switch_epoch == SWAP_EPOCH
    assert [swap["epoch"] for swap in switch.swaps] == [SWAP_EPOCH]
    assert len(switch.switch_backs) == 1
    assert switch.switch_backs[0]["epoch"] == SWAP_EPOCH + 1
    assert switch.switch_backs[0]["step"] == (SWAP_EPOCH + 1) * STEPS_PER_EPOCH + 1
    assert "1 lost window(s) of 1" in switch.switch_backs[0]["reason"]
    assert "Adam's trend (loss ~ S^-" in switch.switch_backs[0]["reason"]
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
    swap_step = (SWAP_EPOCH + 1) * STEPS_PER_EPOCH

    assert [name for step, name in steps if step < swap_step] == ["Adam"] * swap_step
    assert [name for step, name in steps if step == swap_step] == ["ConjugateGradient"]
    after = [name for step, name in steps if step > swap_step]
    assert after == ["Adam"] * (MAX_EPOCHS * STEPS_PER_EPOCH - swap_step - 1)


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
    at_swap = AdamAtSwap(SWAP_EPOCH)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_epochs=SWAP_EPOCH + 2, callbacks=[at_swap, first, checkpoints], enable_checkpointing=True)
    trainer.fit(TinyClassifier())
    assert first.switched and not first.switch_backs

    # The last checkpoint was written after eight CG steps, so it holds CG state and a guard
    # with seven or eight lost windows.
    checkpoint = torch.load(tmp_path / f"epoch={SWAP_EPOCH + 1}.ckpt", weights_only=False)
    saved = next(state for key, state in checkpoint["callbacks"].items() if key.startswith("ConvexitySwitch"))
    assert saved["phase"] == int(Phase.CG)
    assert saved["first_optimizer_state"] is not None
    assert "direction" in checkpoint["optimizer_states"][0]["state"][0]
    # Windows are two passes over the data; the first CG step reuses the guard's starting
    # evaluation and may not fill one, every later step does.
    assert STEPS_PER_EPOCH - 1 <= saved["guard"]["failures"] <= STEPS_PER_EPOCH
    assert_same_state(saved["first_optimizer_state"]["state"], at_swap.state)

    L.seed_everything(0, verbose=False)
    resumed = losing_switch(patience=1)
    at_swap_back = OptimizerAtSwapBack(resumed)
    trainer = make_trainer(tmp_path / "resumed", max_epochs=SWAP_EPOCH + 3, callbacks=[resumed, at_swap_back])
    trainer.fit(TinyClassifier(), ckpt_path=tmp_path / f"epoch={SWAP_EPOCH + 1}.ckpt")

    assert len(resumed.switch_backs) == 1
    assert resumed.switch_backs[0]["step"] == (SWAP_EPOCH + 2) * STEPS_PER_EPOCH + 1
    assert isinstance(at_swap_back.optimizer, torch.optim.Adam)
    assert trainer.optimizers[0] is at_swap_back.optimizer
    assert_same_state(at_swap_back.state, at_swap.state)
    assert resumed.phase == Phase.ADAM


def test_swap_back_with_iterable_dataset():
    # An IterableDataset has no length, so the guard's window is the CG batch.
    L.seed_everything(0, verbose=False)
    switch = ConvexitySwitch(
        detector=FixedEpochDetector(epoch=SWAP_EPOCH),
        cg_batch_size=128,
        cg_kwargs={"max_iter": 1},
        switch_back_patience=1,
        switch_back_margin=1e6,
    )
    trainer = make_trainer(max_epochs=SWAP_EPOCH + 2, callbacks=[switch])
    trainer.fit(TinyClassifier(iterable=True))

    assert len(switch.switch_backs) == 1
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)


# ---------------------------------------------------------------------- retry after a swap back


def test_retry_swaps_again_after_factor(tmp_path: Path):
    L.seed_everything(0, verbose=False)
    switch = losing_switch(patience=1, retry_factor=2.0)
    steps = OptimizerRecorder()
    trainer = make_trainer(tmp_path, max_epochs=12, callbacks=[switch, steps])
    trainer.fit(TinyClassifier())

    swaps, backs = switch.swaps, switch.switch_backs
    assert len(swaps) >= 2
    assert len(backs) >= 1
    # Each retry comes at the first check with at least twice the sample gradients of the swap back.
    for back, retry in zip(backs, swaps[1:]):
        assert retry["samples"] >= 2 * back["samples"]
        assert retry["samples"] - SAMPLES < 2 * back["samples"]
        assert retry["reason"].startswith("Retry:")
    assert swaps[0]["epoch"] == SWAP_EPOCH
    assert "ConjugateGradient" in [name for step, name in steps.steps if step >= swaps[1]["step"]]


def test_no_retry_when_factor_is_none(swap_back_run):
    switch = swap_back_run["switch"]

    assert len(switch.swaps) == 1
    assert isinstance(swap_back_run["trainer"].optimizers[0], torch.optim.Adam)


def test_retry_falls_back_to_earlier_exponent():
    # A rising Adam loss after the swap back gives a flat fit; the earlier exponent replaces it,
    # anchored at the current loss and sample count.
    from lightning_twophase.tensorboard import CheckPoint

    switch = ConvexitySwitch()
    switch.history = [CheckPoint(step=i, epoch=i, loss=0.5 + 0.01 * i, grad_norm=1.0, phase=0, samples=100 * (i + 1)) for i in range(6)]
    switch.swaps = [{"trend": [1.0, 1.5]}, {"trend": None}]
    switch.sample_gradients = 1000

    trend = switch._adam_trend(0.25)

    assert trend.exponent == 1.5
    assert trend.loss_at(1000) == pytest.approx(0.25, rel=1e-12)


def test_first_swap_keeps_flat_fit():
    # Without an earlier swap there is nothing to fall back to: the flat fit leaves the guard off.
    from lightning_twophase.tensorboard import CheckPoint

    switch = ConvexitySwitch()
    switch.history = [CheckPoint(step=i, epoch=i, loss=0.5 + 0.01 * i, grad_norm=1.0, phase=0, samples=100 * (i + 1)) for i in range(6)]
    switch.swaps = [{"trend": None}]
    switch.sample_gradients = 700

    trend = switch._adam_trend(0.25)

    assert trend is not None
    assert trend.exponent == 0.0

"""FixedEpochDetector: swap at a given epoch, by name and as an instance, alone and in a Trainer."""

from __future__ import annotations

import pytest
import torch

from helpers import TinyClassifier, make_trainer
from lightning_twophase import ConvexitySwitch
from lightning_twophase.detection import DETECTORS, DecisionReason, FixedEpochDetector, IntervalStatistics, make_detector
from lightning_twophase.optim import ConjugateGradient


def _stats(epoch: int, norm: float = 1.0, loss: float = 1.0) -> IntervalStatistics:
    return IntervalStatistics(epoch=epoch, step=10 * (epoch + 1), loss=loss, grad_norm_batch_mean=norm, grad_norm_of_mean=norm, batches=10)


def test_swaps_exactly_at_epoch():
    detector = FixedEpochDetector(epoch=3)
    decisions = [detector.update(_stats(epoch, norm=1.0 + epoch)) for epoch in range(5)]

    assert [d.swap for d in decisions] == [False, False, False, True, True]
    assert decisions[0].reason == DecisionReason.WARMUP
    assert decisions[3].reason == DecisionReason.SWAP


def test_ignores_falling_norm_before_epoch():
    detector = FixedEpochDetector(epoch=2)

    assert not detector.update(_stats(0, norm=10.0)).swap
    assert not detector.update(_stats(1, norm=0.1)).swap
    assert detector.running_max == 10.0


def test_non_finite_statistics_skipped():
    detector = FixedEpochDetector(epoch=0)
    decision = detector.update(_stats(5, norm=float("nan")))

    assert not decision.swap
    assert decision.reason == DecisionReason.NON_FINITE


def test_state_round_trip():
    detector = FixedEpochDetector(epoch=4)
    detector.update(_stats(0, norm=7.0))
    restored = FixedEpochDetector(epoch=4)
    restored.load_state_dict(detector.state_dict())

    assert restored.running_max == 7.0


def test_registered_under_name():
    detector = make_detector("fixed_epoch", ratio=0.5, patience=2, statistic="grad_norm_batch_mean")

    assert DETECTORS["fixed_epoch"] is FixedEpochDetector
    assert isinstance(detector, FixedEpochDetector)
    assert detector.statistic == "grad_norm_batch_mean"


@pytest.mark.parametrize("epoch", [-1, 1.5, True])
def test_invalid_epoch_rejected(epoch):
    with pytest.raises(ValueError, match="Invalid epoch"):
        FixedEpochDetector(epoch=epoch)


def test_invalid_statistic_rejected():
    with pytest.raises(ValueError, match="Invalid statistic"):
        FixedEpochDetector(epoch=1, statistic="loss")


def test_trainer_swaps_at_fixed_epoch():
    torch.manual_seed(0)
    switch = ConvexitySwitch(detector=FixedEpochDetector(epoch=2), cg_kwargs={"max_iter": 1}, switch_back_patience=None)
    trainer = make_trainer(max_epochs=4, callbacks=[switch])
    trainer.fit(TinyClassifier(batch_size=64))

    assert switch.switched
    assert switch.switch_epoch == 2
    assert isinstance(trainer.optimizers[0], ConjugateGradient)

"""Unit tests of ``PeakRatioDetector``, fed hand-written interval statistics."""

from __future__ import annotations

import copy
import math

import pytest

from lightning_twophase.detection import DecisionReason, IntervalStatistics, PeakRatioDetector, make_detector


def stats(norm: float, step: int = 0, loss: float = 1.0, batch_norm: float | None = None) -> IntervalStatistics:
    """Return one interval whose two gradient-norm statistics are ``norm``, unless ``batch_norm`` is given."""
    return IntervalStatistics(
        epoch=step,
        step=step,
        loss=loss,
        grad_norm_batch_mean=norm if batch_norm is None else batch_norm,
        grad_norm_of_mean=norm,
        batches=8,
    )


def feed(detector: PeakRatioDetector, norms: list[float]) -> list:
    """Feed one check per norm and return the decisions."""
    return [detector.update(stats(norm, step=index)) for index, norm in enumerate(norms)]


def test_peak_then_fall_swaps():
    detector = PeakRatioDetector(ratio=0.9)

    decisions = feed(detector, [1.0, 2.0, 1.9, 1.7])

    assert [d.reason for d in decisions] == [
        DecisionReason.RISING,
        DecisionReason.RISING,
        DecisionReason.ABOVE_THRESHOLD,
        DecisionReason.SWAP,
    ]
    assert [d.swap for d in decisions] == [False, False, False, True]
    assert detector.running_max == 2.0
    assert detector.threshold == pytest.approx(1.8)


def test_threshold_is_strict():
    # 0.5 * 2.0 = 1.0 exactly: "below the threshold" means strictly less.
    detector = PeakRatioDetector(ratio=0.5)

    decisions = feed(detector, [2.0, 1.0, 0.999])

    assert decisions[1].reason == DecisionReason.ABOVE_THRESHOLD
    assert decisions[2].swap


def test_rising_never_swaps():
    detector = PeakRatioDetector(ratio=0.9)

    decisions = feed(detector, [0.1 * (k + 1) for k in range(50)])

    assert not any(d.swap for d in decisions)
    assert all(d.reason == DecisionReason.RISING for d in decisions)
    assert detector.running_max == pytest.approx(5.0)


def test_first_check_never_swaps():
    # A single low check has no earlier peak to fall from.
    detector = PeakRatioDetector(ratio=0.9)

    decision = detector.update(stats(1e-6))

    assert not decision.swap
    assert decision.reason == DecisionReason.RISING


def test_patience_delays_swap():
    detector = PeakRatioDetector(ratio=0.9, patience=2)

    decisions = feed(detector, [2.0, 1.0, 1.0, 1.0])

    assert [d.reason for d in decisions[1:]] == [
        DecisionReason.WAITING_PATIENCE,
        DecisionReason.WAITING_PATIENCE,
        DecisionReason.SWAP,
    ]
    assert "patience 2" in decisions[1].message


def test_patience_resets_above_threshold():
    detector = PeakRatioDetector(ratio=0.9, patience=1)

    decisions = feed(detector, [2.0, 1.0, 1.95, 1.0, 1.0])

    assert decisions[2].reason == DecisionReason.ABOVE_THRESHOLD
    assert decisions[3].reason == DecisionReason.WAITING_PATIENCE
    assert decisions[4].swap


def test_new_peak_resets_patience():
    detector = PeakRatioDetector(ratio=0.9, patience=1)

    decisions = feed(detector, [2.0, 1.0, 3.0, 2.0, 2.0])

    assert decisions[2].reason == DecisionReason.RISING
    assert decisions[3].reason == DecisionReason.WAITING_PATIENCE
    assert decisions[4].swap
    assert detector.running_max == 3.0


def test_warmup_blocks_early_swap():
    detector = PeakRatioDetector(ratio=0.9, min_checks=4)

    decisions = feed(detector, [2.0, 1.0, 1.0, 1.0])

    assert [d.reason for d in decisions[1:3]] == [DecisionReason.WARMUP, DecisionReason.WARMUP]
    assert not any(d.swap for d in decisions[:3])
    assert decisions[3].swap


@pytest.mark.parametrize(
    "bad",
    [
        stats(math.nan),
        stats(math.inf),
        stats(1.0, loss=math.nan),
        stats(1.0, loss=-math.inf),
        stats(1.0, batch_norm=math.nan),
    ],
    ids=["nan_norm", "inf_norm", "nan_loss", "neg_inf_loss", "nan_batch_norm"],
)
def test_non_finite_skipped(bad: IntervalStatistics):
    detector = PeakRatioDetector(ratio=0.9)
    feed(detector, [2.0])
    before = copy.deepcopy(detector.state_dict())

    decision = detector.update(bad)

    assert not decision.swap
    assert decision.reason == DecisionReason.NON_FINITE
    assert detector.state_dict() == before
    assert detector.update(stats(1.0, step=5)).swap


def test_statistic_selects_field():
    detector = PeakRatioDetector(ratio=0.9, statistic="grad_norm_batch_mean")

    first = detector.update(stats(1.0, batch_norm=5.0))
    second = detector.update(stats(10.0, batch_norm=1.0))

    assert first.reason == DecisionReason.RISING
    assert detector.running_max == 5.0
    assert second.swap


def test_state_dict_round_trip_continues():
    norms = [1.0, 3.0, 2.9, 2.8, 2.6, 2.0, 1.5]
    reference = PeakRatioDetector(ratio=0.9, patience=2, min_checks=3)
    expected = feed(reference, norms)

    first = PeakRatioDetector(ratio=0.9, patience=2, min_checks=3)
    feed(first, norms[:3])
    saved = copy.deepcopy(first.state_dict())
    resumed = PeakRatioDetector(ratio=0.9, patience=2, min_checks=3)
    resumed.load_state_dict(saved)
    continued = [resumed.update(stats(norm, step=3 + k)) for k, norm in enumerate(norms[3:])]

    assert [(d.swap, d.reason) for d in continued] == [(d.swap, d.reason) for d in expected[3:]]
    assert resumed.state_dict() == reference.state_dict()
    assert any(d.swap for d in continued)


def test_state_dict_is_plain_python():
    detector = PeakRatioDetector()
    feed(detector, [1.0, 2.0])

    state = detector.state_dict()

    assert state == {"checks": 2, "running_max": 2.0, "peak_check": 2, "below_count": 0}


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_invalid_ratio_rejected(ratio: float):
    with pytest.raises(ValueError, match=rf"Invalid ratio: {ratio}.*strictly between 0 and 1"):
        PeakRatioDetector(ratio=ratio)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": -1}, "Invalid patience: -1"),
        ({"min_checks": -2}, "Invalid min_checks: -2"),
        ({"statistic": "loss"}, "Invalid statistic: 'loss'. Expected one of grad_norm_of_mean"),
    ],
)
def test_invalid_arguments_rejected(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        PeakRatioDetector(**kwargs)


def test_make_detector_by_name():
    detector = make_detector("peak_ratio", ratio=0.8, patience=3, statistic="grad_norm_batch_mean")

    assert isinstance(detector, PeakRatioDetector)
    assert detector.ratio == 0.8
    assert detector.patience == 3
    assert detector.statistic == "grad_norm_batch_mean"


def test_make_detector_rejects_unknown():
    with pytest.raises(ValueError, match="Invalid detector: 'nope'. Expected one of peak_ratio"):
        make_detector("nope")
    with pytest.raises(TypeError, match="Invalid detector: 3"):
        make_detector(3)

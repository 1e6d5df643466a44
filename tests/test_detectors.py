"""Unit tests of the evidence-based detectors: LogSlopeDetector, CurvatureDetector, CostAwareDetector."""

from __future__ import annotations

import math

import pytest

from lightning_twophase.detection import DETECTORS, DecisionReason, IntervalStatistics, make_detector
from lightning_twophase.detectors import CostAwareDetector, CurvatureDetector, LogSlopeDetector, fit_log_slope


def stats(
    norm: float,
    loss: float = 1.0,
    step: int = 0,
    samples: int = 100,
    curvature: float | None = None,
    trial_rate: float | None = None,
) -> IntervalStatistics:
    """Return one interval whose two gradient-norm statistics are ``norm``."""
    return IntervalStatistics(
        epoch=step,
        step=step,
        loss=loss,
        grad_norm_batch_mean=norm,
        grad_norm_of_mean=norm,
        batches=4,
        samples=samples,
        curvature=curvature,
        trial_rate=trial_rate,
    )


# ---------------------------------------------------------------------- fit_log_slope


def test_fit_exact_power_law():
    losses = [2.0, 1.0, 0.5, 0.1, 0.01]
    norms = [3.0 * loss**0.5 for loss in losses]

    slope, r_squared = fit_log_slope(losses, norms)

    assert slope == pytest.approx(0.5, abs=1e-12)
    assert r_squared == pytest.approx(1.0, abs=1e-12)


def test_fit_hand_computed_scatter():
    # log L = 0, 1, 2 and log s = 0, 2, 1: mean 1 and 1, Sxx = 2, Sxy = 1, Syy = 2.
    losses = [1.0, math.e, math.e**2]
    norms = [1.0, math.e**2, math.e]

    slope, r_squared = fit_log_slope(losses, norms)

    assert slope == pytest.approx(0.5, abs=1e-12)
    assert r_squared == pytest.approx(0.25, abs=1e-12)


def test_fit_negative_slope_when_norm_rises():
    losses = [1.0, 0.8, 0.6, 0.4]
    norms = [1.0, 1.5, 2.0, 2.5]

    slope, r_squared = fit_log_slope(losses, norms)

    assert slope < 0.0
    assert r_squared > 0.9


def test_fit_too_few_points():
    slope, r_squared = fit_log_slope([1.0, 0.5], [1.0, 0.7])

    assert math.isnan(slope)
    assert r_squared == 0.0


def test_fit_no_loss_spread():
    slope, r_squared = fit_log_slope([0.5, 0.5, 0.5], [1.0, 2.0, 3.0])

    assert math.isnan(slope)
    assert r_squared == 0.0


def test_fit_constant_norm():
    slope, r_squared = fit_log_slope([1.0, 0.5, 0.25], [2.0, 2.0, 2.0])

    assert slope == pytest.approx(0.0, abs=1e-15)
    assert r_squared == 0.0


# ---------------------------------------------------------------------- LogSlopeDetector

#: Five checks where the loss falls while the norm rises (non-convex), peaking at loss 0.5 and
#: norm 2, then a Polyak-Lojasiewicz tail with norm = 2 * sqrt(loss / 0.5), which passes through the peak.
RISE = [(1.0, 1.0), (0.8, 1.3), (0.65, 1.6), (0.55, 1.8), (0.5, 2.0)]
TAIL = [(loss, 2.0 * math.sqrt(loss / 0.5)) for loss in (0.4, 0.3, 0.22, 0.16, 0.12, 0.09, 0.07, 0.05, 0.04)]


def feed(detector, points: list[tuple[float, float]], start: int = 0) -> list:
    """Feed one check per ``(loss, norm)`` point and return the decisions."""
    return [detector.update(stats(norm, loss=loss, step=start + k)) for k, (loss, norm) in enumerate(points)]


def first_swap(decisions: list) -> int | None:
    return next((index for index, decision in enumerate(decisions) if decision.swap), None)


def test_log_slope_no_swap_while_rising():
    detector = LogSlopeDetector(window=3, patience=0)

    decisions = feed(detector, RISE)

    assert not any(d.swap for d in decisions)
    assert all(d.reason == DecisionReason.RISING for d in decisions)


def test_log_slope_swaps_on_power_law_tail():
    detector = LogSlopeDetector(window=3, patience=0, min_r_squared=0.95)

    decisions = feed(detector, RISE + TAIL)

    # With window 3 the fit first covers only peak-and-tail points two checks after the peak
    # (index 6: the peak, 0.4 and 0.3). Index 5 still mixes in a rising point, 0.55 -> 1.8.
    assert first_swap(decisions) == 6
    assert decisions[5].reason == DecisionReason.NO_EVIDENCE
    assert "slope 0.5" in decisions[6].message


def test_log_slope_patience_delays_swap():
    eager = first_swap(feed(LogSlopeDetector(window=3, patience=0, min_r_squared=0.95), RISE + TAIL))
    patient = first_swap(feed(LogSlopeDetector(window=3, patience=2, min_r_squared=0.95), RISE + TAIL))

    assert patient == eager + 2


def test_log_slope_patience_waits_with_reason():
    detector = LogSlopeDetector(window=3, patience=2, min_r_squared=0.95)

    decisions = feed(detector, RISE + TAIL)

    assert [d.reason for d in decisions[6:9]] == [
        DecisionReason.WAITING_PATIENCE,
        DecisionReason.WAITING_PATIENCE,
        DecisionReason.SWAP,
    ]


def test_log_slope_warmup_holds_swap():
    detector = LogSlopeDetector(window=3, patience=0, min_r_squared=0.95, min_checks=10)

    decisions = feed(detector, RISE + TAIL)

    assert decisions[6].reason == DecisionReason.WARMUP
    assert first_swap(decisions) == 9


def test_log_slope_state_round_trip():
    points = RISE + TAIL
    original = LogSlopeDetector(window=4, patience=1, min_r_squared=0.95)
    feed(original, points[:6])

    restored = LogSlopeDetector(window=4, patience=1, min_r_squared=0.95)
    restored.load_state_dict(original.state_dict())
    continued = feed(original, points[6:], start=6)
    resumed = feed(restored, points[6:], start=6)

    assert [(d.swap, d.reason, d.message) for d in resumed] == [(d.swap, d.reason, d.message) for d in continued]
    assert any(d.swap for d in resumed)
    assert restored.running_max == original.running_max


def test_log_slope_skips_non_finite():
    detector = LogSlopeDetector()

    decision = detector.update(stats(float("nan")))

    assert not decision.swap
    assert decision.reason == DecisionReason.NON_FINITE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 2}, "Invalid window: 2"),
        ({"window": True}, "Invalid window: True"),
        ({"min_slope": -0.1}, r"Invalid slope range: \[-0.1, 2.0\]"),
        ({"min_slope": 1.0, "max_slope": 0.5}, r"Invalid slope range: \[1.0, 0.5\]"),
        ({"min_r_squared": 1.5}, "Invalid min_r_squared: 1.5"),
        ({"patience": -1}, "Invalid patience: -1"),
        ({"statistic": "loss"}, "Invalid statistic: 'loss'"),
        ({"min_checks": -2}, "Invalid min_checks: -2"),
    ],
)
def test_log_slope_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LogSlopeDetector(**kwargs)


def test_detectors_registered_by_name():
    assert DETECTORS["log_slope"] is LogSlopeDetector
    assert DETECTORS["curvature"] is CurvatureDetector
    assert DETECTORS["cost_aware"] is CostAwareDetector


@pytest.mark.parametrize("name", ["log_slope", "curvature", "cost_aware"])
def test_make_detector_passes_shared_arguments(name):
    detector = make_detector(name, ratio=0.5, patience=3, statistic="grad_norm_batch_mean")

    assert isinstance(detector, DETECTORS[name])
    assert detector.patience == 3
    assert detector.statistic == "grad_norm_batch_mean"


# ---------------------------------------------------------------------- CurvatureDetector


def test_curvature_needs_curvature_flag():
    assert CurvatureDetector.needs_curvature
    assert not LogSlopeDetector.needs_curvature


def test_curvature_none_never_swaps():
    detector = CurvatureDetector(patience=0)

    decisions = [detector.update(stats(norm)) for norm in (1.0, 2.0, 1.5, 1.0, 0.5)]

    assert not any(d.swap for d in decisions)
    assert decisions[-1].reason == DecisionReason.NO_EVIDENCE


def test_curvature_swaps_after_patience_plus_one():
    detector = CurvatureDetector(patience=2)
    detector.update(stats(1.0, curvature=-1.0))
    detector.update(stats(2.0, curvature=-1.0))

    decisions = [detector.update(stats(norm, curvature=0.3)) for norm in (1.8, 1.6, 1.4)]

    assert [d.swap for d in decisions] == [False, False, True]
    assert decisions[0].reason == DecisionReason.WAITING_PATIENCE
    assert "0.3" in decisions[2].message


def test_curvature_before_peak_not_counted():
    detector = CurvatureDetector(patience=1)
    rising = [detector.update(stats(norm, curvature=1.0)) for norm in (1.0, 2.0, 3.0)]

    first_after_peak = detector.update(stats(2.5, curvature=1.0))
    second_after_peak = detector.update(stats(2.0, curvature=1.0))

    assert all(d.reason == DecisionReason.RISING for d in rising)
    assert not first_after_peak.swap
    assert second_after_peak.swap


def test_curvature_negative_resets_streak():
    detector = CurvatureDetector(patience=2)
    detector.update(stats(2.0, curvature=None))
    curvatures = [0.5, 0.5, -0.1, 0.5, 0.5, 0.5]

    decisions = [detector.update(stats(1.0, curvature=value)) for value in curvatures]

    assert [d.swap for d in decisions] == [False, False, False, False, False, True]
    assert decisions[2].reason == DecisionReason.NO_EVIDENCE


def test_curvature_missing_value_resets_streak():
    detector = CurvatureDetector(patience=1)
    detector.update(stats(2.0))

    decisions = [detector.update(stats(1.0, curvature=value)) for value in (0.5, None, 0.5, 0.5)]

    assert [d.swap for d in decisions] == [False, False, False, True]


# ---------------------------------------------------------------------- CostAwareDetector


def cost_aware_check(detector: CostAwareDetector, record: IntervalStatistics, trial_rate: float | None):
    """Run one check as the callback does: ask for a trial, then update with its rate."""
    requested = detector.wants_trial(record)
    if requested:
        record = IntervalStatistics(**{**vars(record), "trial_rate": trial_rate})
    return requested, detector.update(record)


def test_adam_rate_hand_computed():
    # Losses 1, e^-1, e^-3 after 100 sample gradients each. Over 3 intervals the log loss fell by 3
    # in 200 samples, because the first point only anchors the window. Over 1 interval it fell by 2 in 100.
    wide = CostAwareDetector(window=3)
    narrow = CostAwareDetector(window=1)
    for loss in (1.0, math.exp(-1.0), math.exp(-3.0)):
        wide.update(stats(1.0, loss=loss, samples=100))
        narrow.update(stats(1.0, loss=loss, samples=100))

    assert wide.adam_rate() == pytest.approx(3.0 / 200.0, rel=1e-12)
    assert narrow.adam_rate() == pytest.approx(2.0 / 100.0, rel=1e-12)


def test_adam_rate_needs_two_points():
    detector = CostAwareDetector()
    assert detector.adam_rate() is None

    detector.update(stats(1.0, loss=0.5))

    assert detector.adam_rate() is None


def test_trial_only_after_peak_and_every_n():
    detector = CostAwareDetector(trial_every=3, margin=1e9)
    requested = [cost_aware_check(detector, stats(norm), trial_rate=0.0)[0] for norm in (1.0, 2.0, 3.0)]
    requested += [cost_aware_check(detector, stats(2.0), trial_rate=0.0)[0] for _ in range(7)]

    assert requested == [False, False, False, True, False, False, True, False, False, True]


def test_cost_aware_swaps_at_margin():
    def run(trial_rate: float) -> list:
        detector = CostAwareDetector(window=2, margin=2.0, trial_every=1, patience=0)
        # Adam's rate: the log loss falls by 2 in 200 sample gradients, 0.01 per sample.
        for norm, loss in ((1.0, 1.0), (2.0, math.exp(-1.0))):
            cost_aware_check(detector, stats(norm, loss=loss), trial_rate)
        return [cost_aware_check(detector, stats(1.5, loss=math.exp(-2.0)), trial_rate)]

    (requested_low, losing), = run(0.0199)
    (requested_high, winning), = run(0.0201)

    assert requested_low
    assert requested_high
    assert not losing.swap
    assert losing.reason == DecisionReason.NO_EVIDENCE
    assert winning.swap
    assert "0.0201" in winning.message


def test_cost_aware_patience_counts_trials():
    detector = CostAwareDetector(window=1, margin=1.0, trial_every=2, patience=1)
    cost_aware_check(detector, stats(2.0, loss=1.0), trial_rate=1.0)

    checks = [cost_aware_check(detector, stats(1.0, loss=0.9), trial_rate=1.0) for _ in range(4)]

    assert [requested for requested, _ in checks] == [True, False, True, False]
    assert [d.swap for _, d in checks] == [False, False, True, True]
    assert checks[1][1].reason == DecisionReason.WAITING_PATIENCE


def test_cost_aware_losing_trial_resets():
    detector = CostAwareDetector(window=1, margin=1.0, trial_every=1, patience=1)
    cost_aware_check(detector, stats(2.0, loss=1.0), trial_rate=1.0)
    rates = [1.0, -1.0, 1.0, 1.0]

    decisions = [cost_aware_check(detector, stats(1.0, loss=0.9), trial_rate=rate)[1] for rate in rates]

    assert [d.swap for d in decisions] == [False, False, False, True]


def test_cost_aware_state_round_trip():
    original = CostAwareDetector(window=2, trial_every=2, patience=1)
    for norm, loss in ((1.0, 1.0), (2.0, 0.8), (1.5, 0.6)):
        cost_aware_check(original, stats(norm, loss=loss), trial_rate=1.0)
    restored = CostAwareDetector(window=2, trial_every=2, patience=1)
    restored.load_state_dict(original.state_dict())

    continued = [cost_aware_check(original, stats(1.0, loss=0.5), trial_rate=1.0) for _ in range(3)]
    resumed = [cost_aware_check(restored, stats(1.0, loss=0.5), trial_rate=1.0) for _ in range(3)]

    assert [(w, d.swap, d.message) for w, d in resumed] == [(w, d.swap, d.message) for w, d in continued]
    assert restored.adam_rate() == original.adam_rate()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "Invalid window: 0"),
        ({"trial_iterations": 0}, "Invalid trial_iterations: 0"),
        ({"trial_every": 1.5}, "Invalid trial_every: 1.5"),
        ({"margin": 0.0}, "Invalid margin: 0.0"),
        ({"patience": -1}, "Invalid patience: -1"),
    ],
)
def test_cost_aware_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CostAwareDetector(**kwargs)


def test_callback_default_detector_is_log_slope():
    from lightning_twophase import ConvexitySwitch

    assert isinstance(ConvexitySwitch().detector, LogSlopeDetector)

"""Line searches on closed-form 1-D models."""

import math

import pytest

from lightning_twophase.optim.line_search import (
    cubic_minimizer,
    hager_zhang,
    strong_wolfe,
    strong_wolfe_holds,
)


class Quadratic:
    """phi(a) = (a - 2)^2 with minimizer 2; counts calls."""

    def __init__(self, minimizer=2.0):
        self.minimizer = minimizer
        self.calls = 0

    def __call__(self, step):
        self.calls += 1
        return (step - self.minimizer) ** 2, 2.0 * (step - self.minimizer)


def quartic(step):
    """phi(a) = a^4 - 3 a^2 - a, non-convex, with slope -1 at 0."""
    return step**4 - 3.0 * step**2 - step, 4.0 * step**3 - 6.0 * step - 1.0


def test_cubic_minimizer_exact_on_quadratic():
    model = Quadratic()
    value_a, slope_a = model(0.0)
    value_b, slope_b = model(5.0)
    assert cubic_minimizer(0.0, value_a, slope_a, 5.0, value_b, slope_b) == pytest.approx(2.0)


def test_cubic_minimizer_coinciding_points():
    assert cubic_minimizer(1.0, 1.0, -1.0, 1.0, 1.0, -1.0) is None


def test_cubic_minimizer_negative_discriminant():
    # Both slopes negative and steepening: the cubic has no local minimizer.
    assert cubic_minimizer(0.0, 0.0, -1.0, 1.0, -10.0, -30.0) is None


@pytest.mark.parametrize("initial_step", [0.01, 1.0, 2.0, 50.0, 1e6])
def test_strong_wolfe_quadratic(initial_step):
    model = Quadratic()
    value0, slope0 = model(0.0)
    result = strong_wolfe(model, value0, slope0, initial_step, c1=1e-4, c2=0.1)

    assert result.success
    assert strong_wolfe_holds(result.value, result.derivative, result.step, value0, slope0, 1e-4, 0.1)
    assert result.evaluations == model.calls - 1


def test_strong_wolfe_quartic():
    value0, slope0 = quartic(0.0)
    result = strong_wolfe(quartic, value0, slope0, 0.1, c1=1e-4, c2=0.1)
    assert result.success
    assert abs(result.derivative) <= 0.1 * abs(slope0)
    assert result.value < value0


def test_strong_wolfe_budget_exhausted():
    model = Quadratic(minimizer=1e6)
    value0, slope0 = model(0.0)
    result = strong_wolfe(model, value0, slope0, 1e-6, max_evaluations=3)
    assert not result.success
    assert result.evaluations == 3
    assert result.step > 0.0
    assert result.value < value0


def test_strong_wolfe_non_finite_shrinks():
    def model(step):
        if step > 3.0:
            return math.nan, math.nan
        return (step - 2.0) ** 2, 2.0 * (step - 2.0)

    result = strong_wolfe(model, 4.0, -4.0, 100.0)
    assert result.success
    assert result.step <= 3.0
    assert math.isfinite(result.value)


def test_strong_wolfe_never_finite():
    def model(step):
        return math.inf, math.nan

    result = strong_wolfe(model, 4.0, -4.0, 1.0, max_evaluations=10)
    assert not result.success
    assert result.step == 0.0
    assert result.value == 4.0


def test_strong_wolfe_float32_coinciding_steps():
    # A flat model: every trial has the start's value and a tiny slope, so the bracket collapses.
    def model(step):
        return 1.0, -1e-30

    result = strong_wolfe(model, 1.0, -1.0, 1.0, max_evaluations=50, step_tolerance=1.2e-7)
    assert result.evaluations <= 50
    assert math.isfinite(result.step)


def test_strong_wolfe_rejects_ascent():
    with pytest.raises(ValueError, match="Invalid derivative0"):
        strong_wolfe(Quadratic(), 4.0, 1.0, 1.0)


def test_strong_wolfe_rejects_bad_initial_step():
    with pytest.raises(ValueError, match="Invalid initial_step"):
        strong_wolfe(Quadratic(), 4.0, -4.0, 0.0)


@pytest.mark.parametrize("initial_step", [0.01, 1.0, 50.0])
def test_hager_zhang_quadratic(initial_step):
    model = Quadratic()
    value0, slope0 = model(0.0)
    result = hager_zhang(model, value0, slope0, initial_step)

    assert result.success
    assert result.derivative >= 0.9 * slope0
    assert result.value <= value0 + 1e-6 * abs(value0)


def test_hager_zhang_non_finite_shrinks():
    def model(step):
        if step > 3.0:
            return math.inf, math.inf
        return (step - 2.0) ** 2, 2.0 * (step - 2.0)

    result = hager_zhang(model, 4.0, -4.0, 100.0)
    assert result.success
    assert result.step <= 3.0

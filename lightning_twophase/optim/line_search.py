"""Line searches along a descent direction, written as pure functions of a 1-D model.

A model ``phi(step) -> (value, derivative)`` returns :math:`\\phi(\\alpha) = f(x + \\alpha d)` and
:math:`\\phi'(\\alpha) = \\nabla f(x + \\alpha d)^T d`. Each call costs one function and gradient
evaluation, so the searches count calls and stop at a budget.

A trial whose value or derivative is not finite is rejected: the search shrinks the step toward the
largest finite step it has seen and never returns a non-finite point.

References:
    J. Nocedal and S. J. Wright, Numerical Optimization, 2nd ed., Springer 2006, Algorithms 3.5
    and 3.6 (strong Wolfe bracketing and zoom) and eq. 3.59 (cubic interpolation).
    W. W. Hager and H. Zhang, "A new conjugate gradient method with guaranteed descent and an
    efficient line search", SIAM J. Optim. 16(1):170-192, 2005 (approximate Wolfe conditions and
    the secant-squared search).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "LineSearchResult",
    "cubic_minimizer",
    "hager_zhang",
    "strong_wolfe",
    "strong_wolfe_holds",
    "sufficient_decrease_holds",
]

Model = Callable[[float], tuple[float, float]]

# A zoom step lands at least this fraction of the interval width away from both ends, so every
# zoom step shrinks the bracket by at least that fraction even when the cubic model is poor.
_INTERPOLATION_MARGIN = 0.1

# Extrapolation in the bracketing phase adds between 0.01 and 10 times the last increment to the step.
_MIN_EXPANSION = 0.01
_MAX_EXPANSION = 10.0


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of one line search.

    Attributes:
        step: the accepted step; on failure the best finite step with sufficient decrease, or 0.
        value: :math:`\\phi` at ``step``.
        derivative: :math:`\\phi'` at ``step``.
        evaluations: calls of the model made by this search.
        success: whether ``step`` satisfies the search's acceptance conditions.
        reason: a short human-readable explanation of how the search ended.
    """

    step: float
    value: float
    derivative: float
    evaluations: int
    success: bool
    reason: str


@dataclass(frozen=True)
class _Point:
    step: float
    value: float
    derivative: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value) and math.isfinite(self.derivative)


class _BudgetExhausted(Exception):
    pass


class _IntervalCollapsed(Exception):
    pass


class _Accepted(Exception):
    def __init__(self, point: _Point) -> None:
        super().__init__()
        self.point = point


def sufficient_decrease_holds(value: float, step: float, value0: float, derivative0: float, c1: float) -> bool:
    """Check the Armijo condition :math:`\\phi(\\alpha) \\le \\phi(0) + c_1 \\alpha \\phi'(0)`."""
    return value <= value0 + c1 * step * derivative0


def strong_wolfe_holds(
    value: float, derivative: float, step: float, value0: float, derivative0: float, c1: float, c2: float
) -> bool:
    """Check the strong Wolfe conditions: sufficient decrease and :math:`|\\phi'(\\alpha)| \\le c_2 |\\phi'(0)|`."""
    curvature = abs(derivative) <= -c2 * derivative0
    return curvature and sufficient_decrease_holds(value, step, value0, derivative0, c1)


def cubic_minimizer(a: float, value_a: float, slope_a: float, b: float, value_b: float, slope_b: float) -> float | None:
    """Return the minimizer of the cubic through two points with their slopes, or None.

    Nocedal and Wright, eq. 3.59. None means that the cubic has no finite minimizer: the points
    coincide, the discriminant is negative, or a denominator vanishes (float32 steps that round to
    the same value made torch's strong Wolfe search divide by zero here).
    """
    if a == b:
        return None

    d1 = slope_a + slope_b - 3.0 * (value_a - value_b) / (a - b)
    discriminant = d1 * d1 - slope_a * slope_b
    if not math.isfinite(discriminant) or discriminant < 0.0:
        return None

    d2 = math.copysign(math.sqrt(discriminant), b - a)
    denominator = slope_b - slope_a + 2.0 * d2
    if denominator == 0.0:
        return None

    minimizer = b - (b - a) * (slope_b + d2 - d1) / denominator
    return minimizer if math.isfinite(minimizer) else None


class _Trials:
    """Evaluates the model, counts calls and remembers the best point with sufficient decrease."""

    def __init__(self, model: Model, value0: float, derivative0: float, c1: float, max_evaluations: int) -> None:
        self.model = model
        self.start = _Point(0.0, value0, derivative0)
        self.c1 = c1
        self.max_evaluations = max_evaluations
        self.evaluations = 0
        self.best = self.start
        self.largest_finite = self.start

    def evaluate(self, step: float) -> _Point:
        if self.evaluations >= self.max_evaluations:
            raise _BudgetExhausted

        value, derivative = self.model(step)
        self.evaluations += 1
        point = _Point(step, float(value), float(derivative))

        if point.finite:
            self._remember(point)
        return point

    def _remember(self, point: _Point) -> None:
        if point.step > self.largest_finite.step:
            self.largest_finite = point

        decreases = sufficient_decrease_holds(point.value, point.step, self.start.value, self.start.derivative, self.c1)
        if decreases and point.value < self.best.value:
            self.best = point

    def success(self, point: _Point, reason: str) -> LineSearchResult:
        return LineSearchResult(point.step, point.value, point.derivative, self.evaluations, True, reason)

    def failure(self, reason: str) -> LineSearchResult:
        best = self.best
        return LineSearchResult(best.step, best.value, best.derivative, self.evaluations, False, reason)


def _validate_search(derivative0: float, initial_step: float, max_evaluations: int) -> None:
    if not derivative0 < 0.0:
        raise ValueError(f"Invalid derivative0: {derivative0}. The direction must be a descent direction (< 0).")
    if not (initial_step > 0.0 and math.isfinite(initial_step)):
        raise ValueError(f"Invalid initial_step: {initial_step}. Expected a finite value > 0.")
    if max_evaluations < 1:
        raise ValueError(f"Invalid max_evaluations: {max_evaluations}. Expected an integer >= 1.")


def _check_width(low: float, high: float, step_tolerance: float) -> None:
    if abs(high - low) <= step_tolerance * max(abs(low), abs(high)):
        raise _IntervalCollapsed


def _shrink_toward_finite(trials: _Trials, rejected_step: float, step_tolerance: float) -> float:
    """Halve the distance from the largest finite step to a step with a non-finite trial."""
    finite_step = trials.largest_finite.step
    _check_width(finite_step, rejected_step, step_tolerance)
    return finite_step + 0.5 * (rejected_step - finite_step)


def _zoom_step(low: _Point, high: _Point) -> float:
    """Choose a trial inside the bracket: the cubic minimizer when it is safely inside, else the midpoint."""
    left, right = sorted((low.step, high.step))
    margin = _INTERPOLATION_MARGIN * (right - left)

    candidate = None
    if high.finite:
        candidate = cubic_minimizer(low.step, low.value, low.derivative, high.step, high.value, high.derivative)

    if candidate is None or not left + margin <= candidate <= right - margin:
        return 0.5 * (left + right)
    return candidate


def _extrapolation_step(previous: _Point, current: _Point, non_finite_step: float) -> float:
    """Choose a larger trial step during bracketing, staying below any step known to be non-finite."""
    increment = current.step - previous.step
    smallest = current.step + _MIN_EXPANSION * increment
    largest = current.step + _MAX_EXPANSION * increment

    candidate = cubic_minimizer(
        previous.step, previous.value, previous.derivative, current.step, current.value, current.derivative
    )
    if candidate is None:
        candidate = largest
    step = min(max(candidate, smallest), largest)

    if math.isfinite(non_finite_step):
        step = min(step, 0.5 * (current.step + non_finite_step))
    return step


def _zoom(trials: _Trials, low: _Point, high: _Point, c1: float, c2: float, step_tolerance: float) -> LineSearchResult:
    """Shrink a bracket that contains strong Wolfe points until a trial satisfies them (Algorithm 3.6)."""
    start = trials.start

    while True:
        _check_width(low.step, high.step, step_tolerance)
        trial = trials.evaluate(_zoom_step(low, high))

        rejected = not trial.finite or not sufficient_decrease_holds(
            trial.value, trial.step, start.value, start.derivative, c1
        )
        if rejected or trial.value >= low.value:
            high = trial
            continue

        if abs(trial.derivative) <= -c2 * start.derivative:
            return trials.success(trial, "strong Wolfe conditions hold")

        if trial.derivative * (high.step - low.step) >= 0.0:
            high = low
        low = trial


def _bracket(trials: _Trials, initial_step: float, c1: float, c2: float, step_tolerance: float) -> LineSearchResult:
    """Increase the step until it brackets strong Wolfe points, then zoom (Algorithm 3.5)."""
    start = trials.start
    previous = start
    non_finite_step = math.inf
    step = initial_step

    while True:
        current = trials.evaluate(step)
        if not current.finite:
            non_finite_step = step
            step = _shrink_toward_finite(trials, step, step_tolerance)
            continue

        decreases = sufficient_decrease_holds(current.value, current.step, start.value, start.derivative, c1)
        if not decreases or (previous is not start and current.value >= previous.value):
            return _zoom(trials, previous, current, c1, c2, step_tolerance)

        if abs(current.derivative) <= -c2 * start.derivative:
            return trials.success(current, "strong Wolfe conditions hold")

        if current.derivative >= 0.0:
            return _zoom(trials, current, previous, c1, c2, step_tolerance)

        # No longer step can be tested beyond a non-finite trial, so sufficient decrease alone is accepted.
        if math.isfinite(non_finite_step):
            return trials.success(current, "sufficient decrease below a step with a non-finite value")

        step = _extrapolation_step(previous, current, non_finite_step)
        previous = current


def strong_wolfe(
    model: Model,
    value0: float,
    derivative0: float,
    initial_step: float,
    *,
    c1: float = 1e-4,
    c2: float = 0.1,
    max_evaluations: int = 20,
    step_tolerance: float = 1e-12,
) -> LineSearchResult:
    """Find a step that satisfies the strong Wolfe conditions.

    .. math::

        \\phi(\\alpha) \\le \\phi(0) + c_1 \\alpha \\phi'(0), \\qquad |\\phi'(\\alpha)| \\le c_2 |\\phi'(0)|.

    The search grows the step until it brackets an acceptable interval, then shrinks the bracket
    with safeguarded cubic interpolation, falling back to bisection whenever the cubic has no
    minimizer well inside the bracket. After a non-finite trial, a smaller step with sufficient
    decrease and a negative slope is accepted without the curvature condition.

    Args:
        model: the 1-D function ``step -> (value, derivative)``.
        value0: :math:`\\phi(0)`.
        derivative0: :math:`\\phi'(0)`, which must be negative.
        initial_step: the first trial step, > 0.
        c1: sufficient-decrease constant.
        c2: curvature constant, ``c1 < c2 < 1``.
        max_evaluations: calls of ``model`` allowed.
        step_tolerance: the search fails once the bracket is narrower than this fraction of its
            larger end, because the parameters no longer change in floating point.

    Returns:
        The accepted step, or on failure the best step with sufficient decrease (0 if none).

    Raises:
        ValueError: if ``derivative0 >= 0``, ``initial_step <= 0`` or ``max_evaluations < 1``.
    """
    _validate_search(derivative0, initial_step, max_evaluations)
    trials = _Trials(model, value0, derivative0, c1, max_evaluations)

    try:
        return _bracket(trials, initial_step, c1, c2, step_tolerance)
    except _BudgetExhausted:
        return trials.failure("evaluation budget exhausted")
    except _IntervalCollapsed:
        return trials.failure("bracket narrower than the step tolerance")


class _ApproximateWolfeSearch:
    """Hager and Zhang's bracketing, update and secant-squared steps over shared trials.

    Any evaluated trial that satisfies the Wolfe or the approximate Wolfe conditions ends the
    search by raising ``_Accepted``.
    """

    def __init__(self, trials: _Trials, delta: float, sigma: float, epsilon: float, theta: float, step_tolerance: float):
        self.trials = trials
        self.delta = delta
        self.sigma = sigma
        self.theta = theta
        self.step_tolerance = step_tolerance
        self.threshold = trials.start.value + epsilon * abs(trials.start.value)

    def evaluate(self, step: float) -> _Point:
        point = self.trials.evaluate(step)
        if point.finite and self._acceptable(point):
            raise _Accepted(point)
        return point

    def _acceptable(self, point: _Point) -> bool:
        start = self.trials.start
        curvature = point.derivative >= self.sigma * start.derivative
        wolfe = sufficient_decrease_holds(point.value, point.step, start.value, start.derivative, self.delta)
        approximate = (
            point.derivative <= (2.0 * self.delta - 1.0) * start.derivative and point.value <= self.threshold
        )
        return curvature and (wolfe or approximate)

    def _low_enough(self, point: _Point) -> bool:
        return point.finite and point.value <= self.threshold

    def bracket(self, step: float, expansion: float) -> tuple[_Point, _Point]:
        """Expand the step until the slope turns non-negative or the value rises above the threshold."""
        low = self.trials.start
        while True:
            point = self.evaluate(step)
            if not point.finite:
                step = _shrink_toward_finite(self.trials, step, self.step_tolerance)
                continue

            if point.derivative >= 0.0:
                return low, point
            if point.value > self.threshold:
                return self.bisect(self.trials.start, point)

            low = point
            step = expansion * step

    def bisect(self, low: _Point, high: _Point) -> tuple[_Point, _Point]:
        """Shrink [low, high] (slope of low < 0, value of high too high) until the slope turns non-negative."""
        while True:
            _check_width(low.step, high.step, self.step_tolerance)
            point = self.evaluate((1.0 - self.theta) * low.step + self.theta * high.step)
            if point.finite and point.derivative >= 0.0:
                return low, point
            if self._low_enough(point):
                low = point
            else:
                high = point

    def update(self, low: _Point, high: _Point, step: float) -> tuple[_Point, _Point]:
        """Replace one end of the bracket by a trial at ``step`` when ``step`` lies inside it."""
        if not low.step < step < high.step:
            return low, high

        point = self.evaluate(step)
        if point.finite and point.derivative >= 0.0:
            return low, point
        if self._low_enough(point):
            return point, high
        return self.bisect(low, point)

    def secant_squared(self, low: _Point, high: _Point) -> tuple[_Point, _Point]:
        """Take a secant step and, when it replaced one end, a second secant step on that side."""
        step = _secant(low, high)
        new_low, new_high = self.update(low, high, step)

        if new_high.step == step:
            return self.update(new_low, new_high, _secant(high, new_high))
        if new_low.step == step:
            return self.update(new_low, new_high, _secant(low, new_low))
        return new_low, new_high


def _secant(a: _Point, b: _Point) -> float:
    """Return the zero of the line through the slopes at ``a`` and ``b`` (NaN when it is undefined)."""
    denominator = b.derivative - a.derivative
    if denominator == 0.0 or not (a.finite and b.finite):
        return math.nan
    return (a.step * b.derivative - b.step * a.derivative) / denominator


def hager_zhang(
    model: Model,
    value0: float,
    derivative0: float,
    initial_step: float,
    *,
    delta: float = 0.1,
    sigma: float = 0.9,
    epsilon: float = 1e-6,
    theta: float = 0.5,
    gamma: float = 0.66,
    expansion: float = 5.0,
    max_evaluations: int = 20,
    step_tolerance: float = 1e-12,
) -> LineSearchResult:
    """Find a step that satisfies the Wolfe or the approximate Wolfe conditions of Hager and Zhang.

    .. math::

        \\text{Wolfe:}\\quad \\phi(\\alpha) \\le \\phi(0) + \\delta \\alpha \\phi'(0), \\quad
        \\phi'(\\alpha) \\ge \\sigma \\phi'(0);

        \\text{approximate Wolfe:}\\quad (2\\delta - 1)\\phi'(0) \\ge \\phi'(\\alpha) \\ge \\sigma \\phi'(0),
        \\quad \\phi(\\alpha) \\le \\phi(0) + \\epsilon |\\phi(0)|.

    The approximate conditions test only slopes, which stay accurate near a minimizer where
    differences of function values drown in rounding. The search brackets a point with a
    non-negative slope, then shrinks the bracket with two secant steps per round, bisecting when a
    round shrinks the bracket by less than the factor ``gamma``.

    NOTE: CG_DESCENT switches to the approximate conditions only once the function values stall,
    and it chooses its first trial by a quadratic fit. This search always accepts approximate
    Wolfe points and takes ``initial_step`` as given. In ``benchmarks/cg_vs_scipy.py`` it needs 2.7 to
    6.2 times more evaluations than ``strong_wolfe``.

    Args:
        model: the 1-D function ``step -> (value, derivative)``.
        value0: :math:`\\phi(0)`.
        derivative0: :math:`\\phi'(0)`, which must be negative.
        initial_step: the first trial step, > 0.
        delta: sufficient-decrease constant, ``0 < delta < 0.5``.
        sigma: curvature constant, ``delta <= sigma < 1``.
        epsilon: relative tolerance on the value for the approximate conditions.
        theta: bisection point within the bracket.
        gamma: required shrink factor of the bracket per secant-squared round.
        expansion: growth factor of the step while bracketing.
        max_evaluations: calls of ``model`` allowed.
        step_tolerance: the search fails once the bracket is narrower than this fraction of its
            larger end.

    Returns:
        The accepted step, or on failure the best step with sufficient decrease (0 if none).

    Raises:
        ValueError: if ``derivative0 >= 0``, ``initial_step <= 0`` or ``max_evaluations < 1``.
    """
    _validate_search(derivative0, initial_step, max_evaluations)
    trials = _Trials(model, value0, derivative0, delta, max_evaluations)
    search = _ApproximateWolfeSearch(trials, delta, sigma, epsilon, theta, step_tolerance)

    try:
        low, high = search.bracket(initial_step, expansion)
        while True:
            _check_width(low.step, high.step, step_tolerance)
            width = high.step - low.step
            low, high = search.secant_squared(low, high)
            if high.step - low.step > gamma * width:
                low, high = search.update(low, high, 0.5 * (low.step + high.step))
    except _Accepted as accepted:
        return trials.success(accepted.point, "Wolfe or approximate Wolfe conditions hold")
    except _BudgetExhausted:
        return trials.failure("evaluation budget exhausted")
    except _IntervalCollapsed:
        return trials.failure("bracket narrower than the step tolerance")

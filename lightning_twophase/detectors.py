r"""Swap detectors that look for evidence of convexity, or for CG being cheaper, before swapping.

The rule of Hrycej et al. (arXiv:2510.25366, 2025), implemented as
:class:`~lightning_twophase.detection.PeakRatioDetector`, fires as soon as the gradient norm has
fallen 10% below its peak, which can be long before CG beats mini-batch Adam.
The detectors here wait for stronger evidence:

* :class:`LogSlopeDetector`: in a Polyak-Lojasiewicz region the gradient norm falls with the
  loss, :math:`\lVert g \rVert^2 \approx 2\mu (L - L^*)`, so a fit of :math:`\log \lVert g \rVert`
  against :math:`\log L` has a stable positive slope (1/2 when :math:`L^* \approx 0`).
* :class:`CurvatureDetector`: the secant curvature along the recent mean update stays positive.
* :class:`CostAwareDetector`: a short CG trial decreases the log loss faster per sample gradient
  than Adam did over the recent intervals.

All three share the post-peak condition of the paper's rule, a warm-up, and a patience counter,
and keep their history in plain Python values.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from lightning_twophase.detection import (
    DETECTORS,
    STATISTICS,
    Decision,
    DecisionReason,
    IntervalStatistics,
    SwapDetector,
)

__all__ = ["CostAwareDetector", "CurvatureDetector", "LogSlopeDetector", "fit_log_slope"]


def fit_log_slope(losses: list[float], norms: list[float]) -> tuple[float, float]:
    r"""Fit :math:`\log s = a \log L + b` by least squares; return the slope :math:`a` and :math:`R^2`.

    Returns ``(nan, 0.0)`` when fewer than three points or no spread in :math:`\log L`.
    """
    if len(losses) < 3:
        return math.nan, 0.0
    xs = [math.log(v) for v in losses]
    ys = [math.log(v) for v in norms]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    if sxx <= 0.0:
        return math.nan, 0.0

    slope = sxy / sxx
    r_squared = (sxy * sxy) / (sxx * syy) if syy > 0.0 else 0.0
    return slope, r_squared


def _check_common(patience: int, statistic: str, min_checks: int) -> None:
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"Invalid patience: {patience!r}. Use 0 or a positive number of checks.")
    if statistic not in STATISTICS:
        raise ValueError(f"Invalid statistic: {statistic!r}. Expected one of {', '.join(STATISTICS)}.")
    if isinstance(min_checks, bool) or not isinstance(min_checks, int) or min_checks < 0:
        raise ValueError(f"Invalid min_checks: {min_checks!r}. Use 0 or a positive number of checks.")


class _EvidenceDetector(SwapDetector):
    """Shared bookkeeping: running maximum, post-peak flag, warm-up and patience.

    Subclasses implement :meth:`_evidence`, which returns ``(holds, message)`` for one check;
    ``holds`` is ``None`` when the check brought no new evidence, which leaves the streak as it was.
    """

    def __init__(self, patience: int, statistic: str, min_checks: int) -> None:
        _check_common(patience, statistic, min_checks)
        self.patience = patience
        self.statistic = statistic
        self.min_checks = min_checks
        self._checks = 0
        self._running_max: float | None = None
        self._peaked = False
        self._streak = 0

    @property
    def running_max(self) -> float | None:
        return self._running_max

    def update(self, stats: IntervalStatistics) -> Decision:
        if not stats.is_finite():
            return Decision(False, DecisionReason.NON_FINITE, f"Skipped non-finite statistics at step {stats.step}.")

        self._checks += 1
        value = stats.value(self.statistic)
        if self._running_max is None or value >= self._running_max:
            self._running_max = value
        else:
            self._peaked = True

        holds, message = self._evidence(stats)
        if holds is not None:
            self._streak = self._streak + 1 if (holds and self._peaked) else 0
        return self._decide(message)

    def _decide(self, message: str) -> Decision:
        if not self._peaked:
            return Decision(False, DecisionReason.RISING, f"{self.statistic} has not peaked yet; {message}")
        if self._streak == 0:
            return Decision(False, DecisionReason.NO_EVIDENCE, message)
        if self._checks < self.min_checks:
            return Decision(False, DecisionReason.WARMUP, f"Warm-up: check {self._checks} of {self.min_checks}.")
        if self._streak <= self.patience:
            return Decision(
                False,
                DecisionReason.WAITING_PATIENCE,
                f"{message} Held for {self._streak} check(s), patience {self.patience}.",
            )
        return Decision(True, DecisionReason.SWAP, message)

    def _evidence(self, stats: IntervalStatistics) -> tuple[bool | None, str]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "checks": self._checks,
            "running_max": self._running_max,
            "peaked": self._peaked,
            "streak": self._streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._checks = state.get("checks", 0)
        self._running_max = state.get("running_max")
        self._peaked = state.get("peaked", False)
        self._streak = state.get("streak", 0)


class LogSlopeDetector(_EvidenceDetector):
    r"""Swap once :math:`\log \lVert g \rVert` falls linearly in :math:`\log L` with a positive slope.

    Under the Polyak-Lojasiewicz inequality :math:`\lVert \nabla L \rVert^2 \ge 2\mu (L - L^*)`,
    and near a minimum where the bound is nearly tight, :math:`\log \lVert g \rVert \approx
    \tfrac12 \log (L - L^*) + \text{const}`. While the landscape is non-convex the norm rises as
    the loss falls, so the slope is negative. The detector fits the slope over the last
    ``window`` checks and counts a check as evidence when
    ``min_slope <= slope <= max_slope`` and the fit's :math:`R^2 \ge` ``min_r_squared``.

    Args:
        window: Checks in the fit (at least 3).
        min_slope: Smallest accepted slope.
        max_slope: Largest accepted slope.
        min_r_squared: Smallest accepted coefficient of determination of the fit.
        patience: Extra consecutive checks with evidence before the swap.
        statistic: Gradient-norm statistic, one of :data:`~lightning_twophase.detection.STATISTICS`.
        min_checks: Warm-up in checks.
        ratio: Accepted for ``make_detector`` and not used.
    """

    def __init__(
        self,
        window: int = 5,
        min_slope: float = 0.25,
        max_slope: float = 2.0,
        min_r_squared: float = 0.8,
        patience: int = 1,
        statistic: str = "grad_norm_of_mean",
        min_checks: int = 0,
        ratio: float = 0.9,
    ) -> None:
        super().__init__(patience, statistic, min_checks)
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise ValueError(f"Invalid window: {window!r}. Use an int >= 3 checks.")
        if not 0.0 < min_slope < max_slope:
            raise ValueError(f"Invalid slope range: [{min_slope}, {max_slope}]. Use 0 < min_slope < max_slope.")
        if not 0.0 <= min_r_squared <= 1.0:
            raise ValueError(f"Invalid min_r_squared: {min_r_squared}. Use a value in [0, 1].")
        self.window = window
        self.min_slope = min_slope
        self.max_slope = max_slope
        self.min_r_squared = min_r_squared
        self._points: deque[tuple[float, float]] = deque(maxlen=window)

    def _evidence(self, stats: IntervalStatistics) -> tuple[bool | None, str]:
        value = stats.value(self.statistic)
        if stats.loss > 0.0 and value > 0.0:
            self._points.append((stats.loss, value))
        slope, r_squared = fit_log_slope([p[0] for p in self._points], [p[1] for p in self._points])
        holds = self.min_slope <= slope <= self.max_slope and r_squared >= self.min_r_squared
        return holds, f"log-log slope {slope:.3g} (R^2 {r_squared:.2f}) over {len(self._points)} checks."

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "points": list(self._points)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._points = deque((tuple(p) for p in state.get("points", [])), maxlen=self.window)


class CurvatureDetector(_EvidenceDetector):
    r"""Swap once the secant curvature along the mean update stays positive and the norm has peaked.

    With :math:`\bar g_k` the mean gradient of interval :math:`k` and :math:`\bar\theta_k` the
    mean parameters, the accumulator measures

    .. math::

        c_k = \frac{(\bar g_k - \bar g_{k-1})^\top (\bar\theta_k - \bar\theta_{k-1})}
                   {\lVert \bar\theta_k - \bar\theta_{k-1} \rVert^2},

    a finite-difference estimate of the curvature along the path. A negative :math:`c_k` is
    direct evidence of non-convexity along Adam's path. The detector requires
    :math:`c_k > 0` for ``patience + 1`` consecutive checks after the gradient-norm peak.

    Memory: the accumulator keeps two extra parameter-sized buffers (the sum of parameters and
    the previous mean gradient and parameters), four in all.

    Args:
        patience: Extra consecutive checks of positive curvature before the swap.
        statistic: Gradient-norm statistic used for the peak condition.
        min_checks: Warm-up in checks.
        ratio: Accepted for ``make_detector`` and not used.
    """

    needs_curvature = True

    def __init__(
        self,
        patience: int = 2,
        statistic: str = "grad_norm_of_mean",
        min_checks: int = 0,
        ratio: float = 0.9,
    ) -> None:
        super().__init__(patience, statistic, min_checks)

    def _evidence(self, stats: IntervalStatistics) -> tuple[bool | None, str]:
        curvature = stats.curvature
        if curvature is None or not math.isfinite(curvature):
            return False, "no curvature measurement yet."
        return curvature > 0.0, f"secant curvature {curvature:.3g}."


class CostAwareDetector(_EvidenceDetector):
    r"""Swap once a short CG trial lowers the log loss faster per sample gradient than Adam did.

    Adam's recent rate over the last ``window`` intervals, each with mean loss :math:`L_j` and
    :math:`S_j` sample gradients, is

    .. math::

        r_{\text{Adam}} = \frac{\log L_{k-w} - \log L_k}{\sum_{j=k-w+1}^{k} S_j}.

    At a check after the gradient-norm peak, the callback runs ``trial_iterations`` CG
    iterations on the CG batch from a copy of the parameters, measures
    :math:`r_{\text{CG}} = (\log F_0 - \log F_t) / S_{\text{trial}}`, restores the parameters,
    and counts :math:`S_{\text{trial}}` in the budget. The check is evidence when
    :math:`r_{\text{CG}} \ge` ``margin`` :math:`\cdot\, r_{\text{Adam}}`. Trials run at most every
    ``trial_every`` checks, because each costs about ``1.3 * trial_iterations + 1`` passes over
    the CG batch.

    Args:
        window: Intervals in Adam's rate.
        margin: Factor by which CG must beat Adam's rate.
        trial_iterations: CG iterations per trial.
        trial_every: Checks between trials.
        patience: Extra consecutive winning trials before the swap.
        statistic: Gradient-norm statistic used for the peak condition.
        min_checks: Warm-up in checks.
        ratio: Accepted for ``make_detector`` and not used.
    """

    def __init__(
        self,
        window: int = 3,
        margin: float = 1.0,
        trial_iterations: int = 5,
        trial_every: int = 5,
        patience: int = 0,
        statistic: str = "grad_norm_of_mean",
        min_checks: int = 0,
        ratio: float = 0.9,
    ) -> None:
        super().__init__(patience, statistic, min_checks)
        for name, value in (("window", window), ("trial_iterations", trial_iterations), ("trial_every", trial_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}. Use an int >= 1.")
        if not margin > 0.0:
            raise ValueError(f"Invalid margin: {margin!r}. Use a positive factor such as 1.0.")
        self.window = window
        self.margin = margin
        self.trial_iterations = trial_iterations
        self.trial_every = trial_every
        self._losses: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._since_trial = trial_every

    def adam_rate(self) -> float | None:
        """Return Adam's recent log-loss decrease per sample gradient, or ``None`` without history."""
        if len(self._losses) < 2:
            return None
        samples = sum(s for _, s in list(self._losses)[1:])
        first, last = self._losses[0][0], self._losses[-1][0]
        if samples <= 0 or first <= 0.0 or last <= 0.0:
            return None
        return (math.log(first) - math.log(last)) / samples

    def wants_trial(self, stats: IntervalStatistics) -> bool:
        value = stats.value(self.statistic)
        peaked = self._peaked or (self._running_max is not None and value < self._running_max)
        return peaked and self._since_trial + 1 >= self.trial_every and self._checks + 1 >= self.min_checks

    def _evidence(self, stats: IntervalStatistics) -> tuple[bool | None, str]:
        self._losses.append((stats.loss, stats.samples))
        adam = self.adam_rate()
        if stats.trial_rate is None:
            self._since_trial += 1
            # Between trials the last verdict remains, so patience counts trials, not checks.
            return None, "no CG trial at this check."

        self._since_trial = 0
        if adam is None:
            return False, f"CG trial rate {stats.trial_rate:.3g} per sample; no Adam rate yet."
        holds = stats.trial_rate >= self.margin * adam
        return holds, f"CG trial rate {stats.trial_rate:.3g} vs Adam rate {adam:.3g} per sample gradient."

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "losses": list(self._losses), "since_trial": self._since_trial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._losses = deque((tuple(p) for p in state.get("losses", [])), maxlen=self.window + 1)
        self._since_trial = state.get("since_trial", self.trial_every)


DETECTORS.update({"log_slope": LogSlopeDetector, "curvature": CurvatureDetector, "cost_aware": CostAwareDetector})

r"""Swap-back safeguard: return to Adam when CG lowers the loss more slowly than Adam would.

Adam's training loss on these problems falls roughly as a power law in the sample gradients
spent, :math:`L_A(S) = c\, S^{-p}`. At the swap the guard fits :math:`\log L = \log c - p \log S`
by least squares to the Adam-phase checks of the second half of the Adam phase. From the fit,
Adam's rate of log-loss decrease per sample gradient at a loss level :math:`L` is

.. math::

    r_A(L) = \frac{p}{S_A(L)}, \qquad S_A(L) = \left(\frac{c}{L}\right)^{1/p},

where :math:`S_A(L)` is the sample count at which Adam's trend reaches :math:`L`. The rate is
read at the loss CG has reached, so a CG phase that has gained on Adam is compared with the
slower rate Adam would have at that lower loss, and a CG phase that stalls is compared with the
faster rate Adam had there.

In the CG phase the guard measures CG's own rate
:math:`r_{CG} = (\log L_{\text{start}} - \log L_{\text{end}}) / (S_{\text{end}} - S_{\text{start}})`
over windows of at least ``window_samples`` sample gradients. A window is lost when both

* CG is slower: :math:`r_{CG} <` ``margin`` :math:`\cdot\, r_A(\sqrt{L_{\text{start}} L_{\text{end}}})`, and
* CG is behind: :math:`L_{\text{end}} > L_A(S_{\text{end}})`, the loss Adam's trend reaches
  with the same sample gradients,

and ``patience`` consecutive lost windows request the swap back. The second condition keeps CG
when it has stalled far below Adam's trend, for example at the float32 rounding floor, where
the power law would promise Adam a progress it has never shown.

Comparing rates, not losses, makes the decision forward-looking: samples already spent in the CG
phase are sunk, and the question at each window is which optimizer lowers the loss faster from
here. CG converges linearly (a constant rate) once it is in a convex basin, while Adam's rate
falls as :math:`1/S`, so CG that keeps its rate overtakes Adam even when it starts behind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from lightning_twophase.trial import log_loss_rate

__all__ = ["AdamTrend", "SwapBackGuard", "SwapBackVerdict", "fit_adam_trend"]

#: Upper bound on the fitted exponent; a steeper fit comes from a few noisy checks.
MAX_EXPONENT = 20.0


@dataclass(frozen=True)
class AdamTrend:
    r"""Power law :math:`L_A(S) = e^{a} S^{-p}` fitted to Adam's checks.

    Attributes:
        log_scale: :math:`a = \log c`.
        exponent: :math:`p \ge 0`; 0 means Adam's loss was not falling.
        points: Checks in the fit.
    """

    log_scale: float
    exponent: float
    points: int

    def samples_at(self, loss: float) -> float:
        """Return :math:`S_A(L)`, the sample gradients at which the trend reaches ``loss``."""
        return math.exp((self.log_scale - math.log(loss)) / self.exponent)

    def loss_at(self, samples: float) -> float:
        """Return :math:`L_A(S)`, the trend's loss after ``samples`` sample gradients."""
        return math.exp(self.log_scale - self.exponent * math.log(samples))

    def rate_at(self, loss: float) -> float:
        """Return Adam's log-loss decrease per sample gradient at ``loss`` (0 for a flat trend)."""
        if self.exponent <= 0.0 or not loss > 0.0:
            return 0.0
        return self.exponent / self.samples_at(loss)


def fit_adam_trend(points: list[tuple[float, int]], min_points: int = 2) -> AdamTrend | None:
    """Fit the power law to the (loss, samples) checks of the second half of the Adam phase.

    When the second half contains fewer than ``min_points`` checks, the last ``min_points`` are
    used, so a swap after the second check still gets a trend. Checks with a non-positive or
    non-finite loss, or no samples yet, are skipped. Returns ``None`` with fewer than
    ``min_points`` usable checks or no spread in the sample counts.
    """
    usable = [(loss, samples) for loss, samples in points if samples > 0 and loss > 0.0 and math.isfinite(loss)]
    if not usable:
        return None
    half = usable[-1][1] / 2.0
    tail = [point for point in usable if point[1] >= half]
    if len(tail) < min_points:
        tail = usable[-min_points:]
    if len(tail) < min_points:
        return None

    xs = [math.log(samples) for _, samples in tail]
    ys = [math.log(loss) for loss, _ in tail]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx <= 0.0:
        return None

    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    exponent = min(max(-slope, 0.0), MAX_EXPONENT)
    return AdamTrend(log_scale=mean_y + exponent * mean_x, exponent=exponent, points=len(tail))


@dataclass(frozen=True)
class SwapBackVerdict:
    """Result of one guard update.

    Attributes:
        swap_back: Whether to return to Adam now.
        cg_rate: CG's rate over the window just closed, or NaN when no window closed.
        adam_rate: Adam's trend rate at the window's loss level, or NaN when no window closed.
        adam_loss: The loss of Adam's trend at the window's end, or NaN when no window closed.
        lost_windows: Consecutive lost windows so far.
        message: One sentence for logs and the TensorBoard text entry.
    """

    swap_back: bool
    cg_rate: float
    adam_rate: float
    message: str
    adam_loss: float = math.nan
    lost_windows: int = 0


@dataclass
class _GuardState:
    log_scale: float | None = None
    exponent: float | None = None
    mark_loss: float | None = None
    mark_samples: int = 0
    failures: int = 0


class SwapBackGuard:
    """Watches CG's progress per sample gradient after the swap.

    Args:
        window_samples: Smallest number of sample gradients in one comparison window; the
            training-set size is a natural choice.
        patience: Consecutive lost windows before the swap back.
        margin: CG loses a window when its rate is below ``margin`` times Adam's trend rate.

    Raises:
        ValueError: On a non-positive window, patience or margin.
    """

    def __init__(self, window_samples: int, patience: int = 2, margin: float = 0.25) -> None:
        if window_samples < 1:
            raise ValueError(f"Invalid window_samples: {window_samples}. Use a positive number of samples.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Invalid switch_back_patience: {patience!r}. Use an int >= 1, or None to disable.")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 < margin < math.inf:
            raise ValueError(
                f"Invalid switch_back_margin: {margin!r}. Use a finite positive number such as 0.25 (the default)."
            )
        self.window_samples = window_samples
        self.patience = patience
        self.margin = margin
        self._state = _GuardState()

    def start(self, trend: AdamTrend | None, loss: float, samples: int) -> None:
        """Arm the guard at the swap with Adam's trend and CG's starting loss and sample count."""
        self._state = _GuardState(
            log_scale=None if trend is None else trend.log_scale,
            exponent=None if trend is None else trend.exponent,
            mark_loss=loss,
            mark_samples=samples,
        )

    @property
    def trend(self) -> AdamTrend | None:
        """Adam's fitted trend, or ``None`` when the guard is not armed."""
        state = self._state
        if state.exponent is None or state.log_scale is None:
            return None
        return AdamTrend(state.log_scale, state.exponent, points=0)

    @property
    def armed(self) -> bool:
        """Whether the guard has a falling Adam trend and a finite starting loss to compare with."""
        trend = self.trend
        mark = self._state.mark_loss
        return trend is not None and trend.exponent > 0.0 and mark is not None and math.isfinite(mark) and mark > 0.0

    def update(self, loss: float, samples: int) -> SwapBackVerdict:
        """Record CG's loss after ``samples`` sample gradients in all and decide."""
        state = self._state
        if not self.armed:
            return SwapBackVerdict(False, math.nan, math.nan, "Guard not armed: no falling Adam trend at the swap.")
        if samples - state.mark_samples < self.window_samples:
            return SwapBackVerdict(False, math.nan, math.nan, "Window still open.", lost_windows=state.failures)

        cg_rate = log_loss_rate(state.mark_loss, loss, samples - state.mark_samples)
        level = math.sqrt(state.mark_loss * loss) if loss > 0.0 and math.isfinite(loss) else state.mark_loss
        adam_rate = self.trend.rate_at(level)
        adam_loss = self.trend.loss_at(samples)
        slower = not (cg_rate >= self.margin * adam_rate)
        behind = not (loss <= adam_loss)
        state.failures = state.failures + 1 if (slower and behind) else 0
        state.mark_loss, state.mark_samples = loss, samples

        message = (
            f"CG lowered the log loss by {cg_rate:.3g} per sample gradient to {loss:.3g}; Adam's trend"
            f" (loss ~ S^-{state.exponent:.3g}) gives {adam_rate:.3g} at loss {level:.3g} and reaches"
            f" {adam_loss:.3g} with the same sample gradients; {state.failures} lost window(s) of {self.patience}."
        )
        return SwapBackVerdict(state.failures >= self.patience, cg_rate, adam_rate, message, adam_loss, state.failures)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(_GuardState)}
        self._state = _GuardState(**{key: value for key, value in state.items() if key in known})

r"""Swap-back safeguard: return to Adam when CG makes less progress per sample than Adam did.

At the swap the guard stores Adam's recent rate of log-loss decrease per sample gradient,

.. math::

    r_{\text{Adam}} = \frac{\log L_{k-w} - \log L_k}{S_k - S_{k-w}},

from the last :math:`w` checks of the Adam phase. In the CG phase it measures the same rate
over windows of at least ``window_samples`` sample gradients. When CG's rate stays below
``margin`` :math:`\cdot\, r_{\text{Adam}}` for ``patience`` consecutive windows, it requests
the swap back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lightning_twophase.trial import log_loss_rate

__all__ = ["SwapBackGuard", "SwapBackVerdict", "adam_rate_from_history"]


def adam_rate_from_history(points: list[tuple[float, int]], window: int = 3) -> float | None:
    """Return Adam's log-loss rate per sample gradient over the last ``window`` (loss, samples) points."""
    usable = [(loss, samples) for loss, samples in points if loss > 0.0 and math.isfinite(loss)]
    if len(usable) < 2:
        return None
    first = usable[max(0, len(usable) - 1 - window)]
    last = usable[-1]
    rate = log_loss_rate(first[0], last[0], last[1] - first[1])
    return None if math.isnan(rate) else rate


@dataclass(frozen=True)
class SwapBackVerdict:
    """Result of one guard update.

    Attributes:
        swap_back: Whether to return to Adam now.
        cg_rate: CG's rate over the window just closed, or NaN when no window closed.
        message: One sentence for logs and the TensorBoard text entry.
    """

    swap_back: bool
    cg_rate: float
    message: str


@dataclass
class _GuardState:
    adam_rate: float | None = None
    mark_loss: float | None = None
    mark_samples: int = 0
    failures: int = 0


class SwapBackGuard:
    """Watches CG's progress per sample gradient after the swap.

    Args:
        window_samples: Smallest number of sample gradients in one comparison window; the
            training-set size is a natural choice.
        patience: Consecutive losing windows before the swap back.
        margin: CG loses a window when its rate is below ``margin`` times Adam's rate.

    Raises:
        ValueError: On a non-positive window, patience or margin.
    """

    def __init__(self, window_samples: int, patience: int = 3, margin: float = 1.0) -> None:
        if window_samples < 1:
            raise ValueError(f"Invalid window_samples: {window_samples}. Use a positive number of samples.")
        if patience < 1:
            raise ValueError(f"Invalid switch_back_patience: {patience}. Use an int >= 1.")
        if not margin > 0.0:
            raise ValueError(f"Invalid switch_back_margin: {margin}. Use a positive factor such as 1.0.")
        self.window_samples = window_samples
        self.patience = patience
        self.margin = margin
        self._state = _GuardState()

    def start(self, adam_rate: float | None, loss: float, samples: int) -> None:
        """Arm the guard at the swap with Adam's rate and the current loss and sample count."""
        self._state = _GuardState(adam_rate=adam_rate, mark_loss=loss, mark_samples=samples)

    @property
    def armed(self) -> bool:
        """Whether the guard has a usable Adam rate to compare with."""
        return self._state.adam_rate is not None and self._state.adam_rate > 0.0

    # NOTE: Adam's rate just before the swap is usually higher than what Adam sustains later, so
    # on the digits benchmark this guard swapped back from runs that CG went on to win 76-316x.
    def update(self, loss: float, samples: int) -> SwapBackVerdict:
        """Record CG's loss after ``samples`` sample gradients in all and decide."""
        state = self._state
        if not self.armed or state.mark_loss is None:
            return SwapBackVerdict(False, math.nan, "Guard not armed: no positive Adam rate at the swap.")
        if samples - state.mark_samples < self.window_samples:
            return SwapBackVerdict(False, math.nan, "Window still open.")

        rate = log_loss_rate(state.mark_loss, loss, samples - state.mark_samples)
        losing = not (rate >= self.margin * state.adam_rate)
        state.failures = state.failures + 1 if losing else 0
        state.mark_loss, state.mark_samples = loss, samples
        message = (
            f"CG rate {rate:.3g} vs Adam rate {state.adam_rate:.3g} per sample gradient;"
            f" {state.failures} losing window(s) of {self.patience}."
        )
        return SwapBackVerdict(state.failures >= self.patience, rate, message)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = _GuardState(**state)

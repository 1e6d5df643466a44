"""Swap-point detectors: interval statistics in, a swap decision with its reason out.

A detector receives one :class:`IntervalStatistics` record per check interval (an epoch or a
fixed number of optimizer steps) and decides whether the Adam phase should end. Detectors
are pure Python objects with no Lightning or tensor state, so they can be unit-tested
without a ``Trainer`` and round-trip through a checkpoint as plain dictionaries.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Decision",
    "DecisionReason",
    "IntervalStatistics",
    "PeakRatioDetector",
    "SwapDetector",
    "FixedEpochDetector",
    "DETECTORS",
    "STATISTICS",
    "make_detector",
]

#: Names of the gradient-norm statistics a detector can watch.
STATISTICS = ("grad_norm_of_mean", "grad_norm_batch_mean")


@dataclass(frozen=True)
class IntervalStatistics:
    """Statistics of one check interval, reduced over all ranks.

    Attributes:
        epoch: Epoch in which the interval ended.
        step: Global optimizer step at the end of the interval.
        loss: Mean training loss over the interval's batches.
        grad_norm_batch_mean: Mean over batches of the per-batch total gradient L2 norm.
        grad_norm_of_mean: L2 norm of the gradient averaged over the interval's batches. Averaging
            cancels most mini-batch noise, which inflates per-batch norms by about
            ``sqrt(trace(Cov) / batch_size)``.
        batches: Number of optimizer steps that contributed.
        samples: Sample gradients spent in the interval, over all ranks.
        curvature: Secant curvature along the interval's mean update,
            :math:`(\\bar g_k - \\bar g_{k-1})^\\top \\Delta\\theta / \\lVert \\Delta\\theta \\rVert^2` with
            :math:`\\bar g_k` the interval's mean gradient and :math:`\\Delta\\theta` the change of the
            interval's mean parameters, in loss units per squared parameter units; ``None`` unless
            the detector requests it.
        trial_rate: Decrease of the log loss per sample gradient in a short CG trial run at the
            end of the interval; ``None`` unless the detector asked for a trial.
    """

    epoch: int
    step: int
    loss: float
    grad_norm_batch_mean: float
    grad_norm_of_mean: float
    batches: int
    samples: int = 0
    curvature: float | None = None
    trial_rate: float | None = None

    def value(self, statistic: str) -> float:
        """Return the gradient-norm statistic named ``statistic``."""
        return float(getattr(self, statistic))

    def is_finite(self) -> bool:
        """Return whether the loss and both gradient norms are finite."""
        return all(math.isfinite(v) for v in (self.loss, self.grad_norm_batch_mean, self.grad_norm_of_mean))


class DecisionReason(enum.Enum):
    """Reason for a detector's decision to swap or to wait."""

    WARMUP = "warm-up"
    RISING = "rising"
    ABOVE_THRESHOLD = "above threshold"
    WAITING_PATIENCE = "below threshold, waiting for patience"
    NON_FINITE = "non-finite statistics skipped"
    NO_EVIDENCE = "no evidence of convexity yet"
    SWAP = "swap"


@dataclass(frozen=True)
class Decision:
    """Outcome of one detector update.

    Attributes:
        swap: Whether the Adam phase should end now.
        reason: Machine-readable reason.
        message: One sentence for logs and the TensorBoard text entry.
    """

    swap: bool
    reason: DecisionReason
    message: str


class SwapDetector(ABC):
    """Interface of a swap-point detector.

    Subclasses implement :meth:`update` and keep all history in plain Python values so
    that :meth:`state_dict` is JSON- and ``torch.save``-friendly.
    """

    #: Which gradient-norm statistic of :class:`IntervalStatistics` the detector reads.
    statistic: str = "grad_norm_of_mean"

    #: Whether :class:`IntervalStatistics.curvature` must be measured (costs two extra
    #: parameter-sized buffers in the accumulator).
    needs_curvature: bool = False

    @abstractmethod
    def update(self, stats: IntervalStatistics) -> Decision:
        """Consume one interval's statistics and decide whether to swap."""

    def wants_trial(self, stats: IntervalStatistics) -> bool:
        """Return whether the caller should run a CG trial and fill ``stats.trial_rate``."""
        return False

    @property
    def threshold(self) -> float | None:
        """Current swap threshold on the watched statistic, or ``None`` when undefined."""
        return None

    @property
    def running_max(self) -> float | None:
        """Running maximum of the watched statistic, or ``None`` before the first check."""
        return None

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Return the detector's history as plain Python values."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history written by :meth:`state_dict`."""


@dataclass
class _PeakRatioState:
    checks: int = 0
    running_max: float | None = None
    peak_check: int | None = None
    below_count: int = 0


class PeakRatioDetector(SwapDetector):
    r"""Swap once the gradient norm has peaked and fallen to ``ratio`` times its maximum.

    With :math:`s_k` the watched gradient-norm statistic at check :math:`k` and
    :math:`M_k = \max_{j \le k} s_j` its running maximum, the detector requests the swap at
    the first check :math:`k \ge` ``min_checks`` where

    .. math::

        s_k < \rho \, M_k \quad\text{and}\quad M_k \text{ was reached at a check } j < k,

    held for ``patience + 1`` consecutive checks. This is the rule of Hrycej, Bermeitinger,
    Pavone, Wiegand and Handschuh, "A Convexity-dependent Two-Phase Training Algorithm for
    Deep Neural Networks" (arXiv:2510.25366, 2025), with :math:`\rho = 0.9`: the norm
    rises while the landscape is non-convex, peaks, and falls once it is convex.

    Args:
        ratio: :math:`\rho`, in (0, 1).
        min_checks: Warm-up: no swap before this many checks have been seen.
        patience: Extra consecutive checks below the threshold required before the swap.
        statistic: One of :data:`STATISTICS`.

    Raises:
        ValueError: On a ratio outside (0, 1), a negative warm-up or patience, or an
            unknown statistic.
    """

    def __init__(
        self,
        ratio: float = 0.9,
        min_checks: int = 0,
        patience: int = 0,
        statistic: str = "grad_norm_of_mean",
    ) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"Invalid ratio: {ratio}. Use a value strictly between 0 and 1, such as 0.9.")
        if min_checks < 0:
            raise ValueError(f"Invalid min_checks: {min_checks}. Use 0 or a positive number of checks.")
        if patience < 0:
            raise ValueError(f"Invalid patience: {patience}. Use 0 or a positive number of checks.")
        if statistic not in STATISTICS:
            raise ValueError(f"Invalid statistic: {statistic!r}. Expected one of {', '.join(STATISTICS)}.")

        self.ratio = ratio
        self.min_checks = min_checks
        self.patience = patience
        self.statistic = statistic
        self._state = _PeakRatioState()

    @property
    def threshold(self) -> float | None:
        if self._state.running_max is None:
            return None
        return self.ratio * self._state.running_max

    @property
    def running_max(self) -> float | None:
        return self._state.running_max

    def update(self, stats: IntervalStatistics) -> Decision:
        if not stats.is_finite():
            return Decision(False, DecisionReason.NON_FINITE, f"Skipped non-finite statistics at step {stats.step}.")

        state = self._state
        value = stats.value(self.statistic)
        state.checks += 1

        if state.running_max is None or value >= state.running_max:
            state.running_max = value
            state.peak_check = state.checks
            state.below_count = 0
            return Decision(False, DecisionReason.RISING, f"{self.statistic}={value:.4g} is a new maximum.")

        return self._decide_below_peak(value)

    def _decide_below_peak(self, value: float) -> Decision:
        state = self._state
        threshold = self.ratio * state.running_max

        if value >= threshold:
            state.below_count = 0
            return Decision(
                False, DecisionReason.ABOVE_THRESHOLD, f"{self.statistic}={value:.4g} >= threshold {threshold:.4g}."
            )

        state.below_count += 1
        if state.checks < self.min_checks:
            return Decision(False, DecisionReason.WARMUP, f"Warm-up: check {state.checks} of {self.min_checks}.")

        if state.below_count <= self.patience:
            return Decision(
                False,
                DecisionReason.WAITING_PATIENCE,
                f"{self.statistic}={value:.4g} < threshold {threshold:.4g} for {state.below_count} check(s),"
                f" patience {self.patience}.",
            )

        return Decision(
            True,
            DecisionReason.SWAP,
            f"{self.statistic}={value:.4g} fell below {self.ratio:g} x its maximum {state.running_max:.4g}.",
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = _PeakRatioState(**state)


class FixedEpochDetector(SwapDetector):
    """Swap at the end of a given epoch, whatever the gradient norm does (an ablation baseline).

    The detector requests the swap at the first check whose interval ended in epoch
    ``epoch`` or later, counting epochs from 0 as Lightning does, so
    ``ConvexitySwitch.switch_epoch`` equals ``epoch`` when checks run once per epoch. It
    still tracks the running maximum of the watched statistic, so the norm-versus-loss
    panels stay comparable with :class:`PeakRatioDetector`.

    Args:
        epoch: Epoch (0-based) at whose end the swap happens; ``>= 0``.
        ratio: Accepted for the shared ``make_detector`` arguments and not used.
        patience: Accepted for the shared ``make_detector`` arguments and not used.
        statistic: One of :data:`STATISTICS`.

    Raises:
        ValueError: On a negative or non-integer ``epoch`` or an unknown statistic.
    """

    def __init__(
        self,
        epoch: int = 10,
        ratio: float = 0.9,
        patience: int = 0,
        statistic: str = "grad_norm_of_mean",
    ) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Invalid epoch: {epoch!r}. Use an int >= 0, the epoch at whose end to swap.")
        if statistic not in STATISTICS:
            raise ValueError(f"Invalid statistic: {statistic!r}. Expected one of {', '.join(STATISTICS)}.")

        self.epoch = epoch
        self.statistic = statistic
        self._running_max: float | None = None

    @property
    def running_max(self) -> float | None:
        return self._running_max

    def update(self, stats: IntervalStatistics) -> Decision:
        if not stats.is_finite():
            return Decision(False, DecisionReason.NON_FINITE, f"Skipped non-finite statistics at step {stats.step}.")

        value = stats.value(self.statistic)
        if self._running_max is None or value > self._running_max:
            self._running_max = value

        if stats.epoch < self.epoch:
            return Decision(False, DecisionReason.WARMUP, f"Epoch {stats.epoch} is before the fixed swap epoch {self.epoch}.")
        return Decision(True, DecisionReason.SWAP, f"Reached the fixed swap epoch {self.epoch}.")

    def state_dict(self) -> dict[str, Any]:
        return {"running_max": self._running_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._running_max = state.get("running_max")


#: Detectors selectable by name in ``ConvexitySwitch(detector=...)``. A named
#: ``"fixed_epoch"`` detector swaps at its default epoch, so pass a
#: ``FixedEpochDetector(epoch=...)`` instance to choose another.
DETECTORS: dict[str, type[SwapDetector]] = {"peak_ratio": PeakRatioDetector, "fixed_epoch": FixedEpochDetector}


def make_detector(
    detector: str | SwapDetector,
    ratio: float = 0.9,
    patience: int = 0,
    statistic: str = "grad_norm_of_mean",
) -> SwapDetector:
    """Return ``detector`` itself, or build the named detector from the shared arguments.

    Raises:
        ValueError: On an unknown name or invalid arguments.
        TypeError: When ``detector`` is neither a name nor a :class:`SwapDetector`.
    """
    if isinstance(detector, SwapDetector):
        return detector
    import lightning_twophase.detectors  # noqa: F401  (registers the evidence-based detectors)
    if not isinstance(detector, str):
        raise TypeError(
            f"Invalid detector: {detector!r}. Pass a name ({', '.join(DETECTORS)}) or a SwapDetector instance."
        )
    if detector not in DETECTORS:
        raise ValueError(f"Invalid detector: {detector!r}. Expected one of {', '.join(DETECTORS)}.")
    return DETECTORS[detector](ratio=ratio, patience=patience, statistic=statistic)

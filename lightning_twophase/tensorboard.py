"""TensorBoard panels of the two-phase run: custom-scalars layout, norm-versus-loss figure, swap text.

Scalars go through the Trainer's loggers, so ``CSVLogger`` works too. The panels here need a
``SummaryWriter`` and are written only from rank zero when a ``TensorBoardLogger`` is attached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "CheckPoint",
    "LAYOUT_TITLE",
    "TAG",
    "custom_scalars_layout",
    "draw_norm_vs_loss",
    "render_norm_vs_loss",
    "switch_text",
]

LAYOUT_TITLE = "Two-phase"


class TAG:
    """Tag names written by :class:`~lightning_twophase.ConvexitySwitch`."""

    LOSS = "twophase/loss"
    GRAD_NORM = "twophase/grad_norm"
    GRAD_NORM_BATCH_MEAN = "twophase/grad_norm_batch_mean"
    GRAD_NORM_OF_MEAN = "twophase/grad_norm_of_mean"
    GRAD_NORM_MAX = "twophase/grad_norm_max"
    THRESHOLD = "twophase/threshold"
    PHASE = "twophase/phase"
    SAMPLES = "twophase/samples"
    CG_STEP_SIZE = "twophase/cg/step_size"
    CG_EVALUATIONS = "twophase/cg/evaluations"
    CG_BETA = "twophase/cg/beta"
    CG_CURVATURE = "twophase/cg/curvature"
    CG_RESTARTED = "twophase/cg/restarted"
    CG_BATCH_SIZE = "twophase/cg/batch_size"
    FIGURE = "twophase/grad_norm_vs_loss"
    SWITCH = "twophase/switch"
    SWITCH_BACK = "twophase/switch_back"
    GUARD_CG_RATE = "twophase/guard/cg_rate"
    GUARD_ADAM_RATE = "twophase/guard/adam_rate"
    GUARD_ADAM_LOSS = "twophase/guard/adam_trend_loss"
    GUARD_LOST_WINDOWS = "twophase/guard/lost_windows"


@dataclass(frozen=True)
class CheckPoint:
    """One point of the gradient-norm-versus-loss curve.

    Attributes:
        step: Global step.
        epoch: Epoch.
        loss: Loss (mini-batch mean in the Adam phase, CG-batch objective in the CG phase).
        grad_norm: Watched gradient-norm statistic.
        phase: 0 for Adam, 1 for CG.
        samples: Sample gradients spent up to this point, over all ranks.
    """

    step: int
    epoch: int
    loss: float
    grad_norm: float
    phase: int
    samples: int = 0


def custom_scalars_layout() -> dict:
    """Return the "Two-phase" custom-scalars layout.

    Tag entries are regular expressions anchored at the end, so a logger prefix such as
    ``TensorBoardLogger(prefix="run1")``, which writes ``run1-twophase/loss``, still matches.
    """

    def pattern(tag: str) -> str:
        return f"(.*-)?{tag}$"

    return {
        LAYOUT_TITLE: {
            "Loss": ["Multiline", [pattern(TAG.LOSS)]],
            "Gradient norm and threshold": [
                "Multiline",
                [pattern(TAG.GRAD_NORM), pattern(TAG.GRAD_NORM_MAX), pattern(TAG.THRESHOLD)],
            ],
            "Phase (0 Adam, 1 CG)": ["Multiline", [pattern(TAG.PHASE)]],
            "CG step size and curvature": ["Multiline", [pattern(TAG.CG_STEP_SIZE), pattern(TAG.CG_CURVATURE)]],
            "Swap-back guard: log-loss rate per sample gradient": [
                "Multiline",
                [pattern(TAG.GUARD_CG_RATE), pattern(TAG.GUARD_ADAM_RATE)],
            ],
        }
    }


def render_norm_vs_loss(
    points: Sequence[CheckPoint],
    switch: CheckPoint | None = None,
    threshold: float | None = None,
    switch_backs: Sequence[CheckPoint] = (),
) -> Figure:
    """Plot the gradient norm against the loss on log axes, coloured by phase.

    The loss usually falls monotonically, so reading the curve from right to left follows
    training: the norm rises while the landscape is non-convex, peaks, then falls.
    """
    figure, axes = plt.subplots(figsize=(6.0, 4.5), dpi=100)
    draw_norm_vs_loss(axes, points, switch, threshold, switch_backs)
    figure.tight_layout()
    return figure


def draw_norm_vs_loss(
    axes: Axes,
    points: Sequence[CheckPoint],
    switch: CheckPoint | None = None,
    threshold: float | None = None,
    switch_backs: Sequence[CheckPoint] = (),
) -> None:
    """Draw the curve of :func:`render_norm_vs_loss` into existing axes.

    Points with a non-positive loss or gradient norm are left out, because both axes are
    logarithmic.
    """
    for phase, colour, label in ((0, "tab:blue", "Adam"), (1, "tab:orange", "CG")):
        chosen = [p for p in points if p.phase == phase and p.loss > 0 and p.grad_norm > 0]
        if chosen:
            axes.plot([p.loss for p in chosen], [p.grad_norm for p in chosen], "o-", ms=3, lw=0.8, color=colour, label=label)

    if threshold is not None and threshold > 0:
        axes.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"threshold {threshold:.3g}")
    if switch is not None and switch.loss > 0 and switch.grad_norm > 0:
        axes.plot([switch.loss], [switch.grad_norm], "*", ms=14, color="red", label=f"swap (epoch {switch.epoch})")
    for back in switch_backs:
        axes.plot([back.loss], [back.grad_norm], "X", ms=10, color="black", label=f"swap back (epoch {back.epoch})")

    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.invert_xaxis()
    axes.set_xlabel("training loss (decreasing to the right)")
    axes.set_ylabel("gradient norm")
    axes.set_title("Gradient norm versus loss")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best", fontsize=8)


def switch_text(point: CheckPoint, running_max: float | None, reason: str, statistic: str) -> str:
    """Return the Markdown text entry that records the swap."""
    maximum = f"{running_max:.6g}" if running_max is not None else "n/a"
    return (
        f"**Swapped Adam for CG** at epoch {point.epoch}, global step {point.step}.\n\n"
        f"| quantity | value |\n|---|---|\n"
        f"| statistic | `{statistic}` |\n"
        f"| gradient norm at swap | {point.grad_norm:.6g} |\n"
        f"| running maximum | {maximum} |\n"
        f"| loss at swap | {point.loss:.6g} |\n\n"
        f"Reason: {reason}"
    )


def close(figure: Figure) -> None:
    """Release a figure's memory after it was written."""
    plt.close(figure)

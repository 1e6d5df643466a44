"""Logging of ``ConvexitySwitch``: scalar dictionaries for any logger and TensorBoard panels.

Scalars go through every logger of the trainer, so ``CSVLogger`` gets them too. The panels
(custom-scalars layout, norm-versus-loss image, swap texts) need a ``SummaryWriter`` and are
written only from global rank zero with a ``TensorBoardLogger`` attached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_twophase import tensorboard as panels
from lightning_twophase.detection import IntervalStatistics, SwapDetector
from lightning_twophase.safeguard import SwapBackVerdict
from lightning_twophase.tensorboard import TAG, CheckPoint

__all__ = ["PanelWriter", "cg_step_metrics", "check_metrics", "guard_window_metrics", "log_metrics"]


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at the current global step."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def check_metrics(stats: IntervalStatistics, detector: SwapDetector, samples: int) -> dict[str, float]:
    """Return the scalars of one Adam-phase check."""
    metrics = {
        TAG.LOSS: stats.loss,
        TAG.GRAD_NORM: stats.value(detector.statistic),
        TAG.GRAD_NORM_BATCH_MEAN: stats.grad_norm_batch_mean,
        TAG.GRAD_NORM_OF_MEAN: stats.grad_norm_of_mean,
        TAG.PHASE: 0.0,
        TAG.SAMPLES: float(samples),
    }
    if detector.running_max is not None:
        metrics[TAG.GRAD_NORM_MAX] = detector.running_max
    if detector.threshold is not None:
        metrics[TAG.THRESHOLD] = detector.threshold
    return metrics


def guard_window_metrics(verdict: SwapBackVerdict) -> dict[str, float]:
    """Return the scalars of one closed swap-back guard window (rates per sample gradient)."""
    return {
        TAG.GUARD_CG_RATE: verdict.cg_rate,
        TAG.GUARD_ADAM_RATE: verdict.adam_rate,
        TAG.GUARD_ADAM_LOSS: verdict.adam_loss,
        TAG.GUARD_LOST_WINDOWS: float(verdict.lost_windows),
    }


def cg_step_metrics(stats: Any, last_loss: float | None, samples: int) -> dict[str, float]:
    """Return the scalars of one CG-phase step.

    Args:
        stats: The optimizer's ``last_stats`` (a ``CGStepStats``), or ``None`` for optimizers
            without statistics, such as ``torch.optim.LBFGS``.
        last_loss: Loss of the objective's latest evaluation, used when ``stats`` is ``None``.
        samples: Sample gradients spent so far, over all ranks.
    """
    metrics = {TAG.PHASE: 1.0, TAG.SAMPLES: float(samples)}
    if last_loss is not None:
        metrics[TAG.LOSS] = last_loss
    if stats is not None:
        metrics.update({
            TAG.LOSS: float(stats.loss),
            TAG.CG_STEP_SIZE: float(stats.step_size),
            TAG.CG_EVALUATIONS: float(stats.evaluations),
            TAG.CG_BETA: float(stats.beta),
            TAG.CG_CURVATURE: float(stats.curvature),
            TAG.CG_RESTARTED: float(stats.restarted),
        })
    return metrics


class PanelWriter:
    """Writes the TensorBoard panels of one run; every method is a no-op off rank zero."""

    def __init__(self) -> None:
        self._layout_written = False

    @staticmethod
    def writer(trainer: pl.Trainer) -> Any:
        """Return the first ``TensorBoardLogger``'s ``SummaryWriter`` on rank zero, else ``None``."""
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def layout(self, trainer: pl.Trainer) -> None:
        """Write the "Two-phase" custom-scalars layout once per run."""
        writer = self.writer(trainer)
        if writer is not None and not self._layout_written:
            writer.add_custom_scalars(panels.custom_scalars_layout())
            self._layout_written = True

    def figure(
        self,
        trainer: pl.Trainer,
        history: Sequence[CheckPoint],
        switch: CheckPoint | None,
        threshold: float | None,
        switch_backs: Sequence[CheckPoint] = (),
    ) -> None:
        """Write the gradient-norm-versus-loss image at the current step."""
        writer = self.writer(trainer)
        if writer is None or not history:
            return
        figure = panels.render_norm_vs_loss(history, switch, threshold, switch_backs)
        writer.add_figure(TAG.FIGURE, figure, global_step=trainer.global_step, close=True)

    def text(self, trainer: pl.Trainer, tag: str, text: str) -> None:
        """Write a Markdown text entry at the current step."""
        writer = self.writer(trainer)
        if writer is not None:
            writer.add_text(tag, text, global_step=trainer.global_step)

    def flush(self, trainer: pl.Trainer) -> None:
        """Flush the event file, so the swap is visible before the writer's timer fires."""
        writer = self.writer(trainer)
        if writer is not None:
            writer.flush()

"""``ConvexitySwitch``: train with Adam, detect the convex region, continue with conjugate gradient."""

from __future__ import annotations

import copy
import math
import enum
from dataclasses import replace
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_twophase import tensorboard as panels
from lightning_twophase.batch_policy import DynamicBatchPolicy
from lightning_twophase.checks import (
    check_cg_dataset,
    check_fit_start,
    check_retry_factor,
    check_setup,
    first_train_loader,
    resolve_cg_dtype,
    validate_arguments,
    validate_second_phase,
)
from lightning_twophase.detection import Decision, DecisionReason, IntervalStatistics, SwapDetector, make_detector
from lightning_twophase.lightning_plumbing import build_objective, convert_model_dtype
from lightning_twophase.run_log import PanelWriter, cg_step_metrics, check_metrics, guard_window_metrics, log_metrics
from lightning_twophase.safeguard import AdamTrend, SwapBackGuard, fit_adam_trend
from lightning_twophase.trial import run_cg_trial
from lightning_twophase.statistics import IntervalAccumulator, total_grad_norm
from lightning_twophase.swap import (
    ADAM_FAMILY,
    FirstPhase,
    OptimizerFactory,
    build_second_phase_optimizer,
    dropped_settings,
    install_optimizer,
    route_step_to,
)
from lightning_twophase.tensorboard import TAG, CheckPoint

__all__ = ["ConvexitySwitch", "Phase"]


class Phase(enum.IntEnum):
    """Training phase, as logged in ``twophase/phase``."""

    ADAM = 0
    CG = 1


#: Default keyword arguments of the CG optimizer built at the swap.
DEFAULT_CG_KWARGS: dict[str, Any] = {"max_iter": 2, "history_size": 10}

#: The swap-back guard compares rates over windows of at least this many passes over the
#: training set (or the CG batch), which averages out the step-to-step spread of CG's progress.
GUARD_WINDOW_PASSES = 2


class ConvexitySwitch(Callback):
    r"""Swap the configured Adam optimizer for conjugate gradient once the landscape turns convex.

    The callback watches the training loss and the total gradient norm
    :math:`\lVert g \rVert_2` over all parameters (read in ``on_before_optimizer_step``, after
    AMP unscaling, with multi-tensor kernels and no host synchronisation per step). At the end
    of every check interval (an epoch by default) it reduces the interval's statistics over
    all ranks and passes them to a detector. Hrycej et al., "A Convexity-dependent Two-Phase
    Training Algorithm for Deep Neural Networks" (arXiv:2510.25366, 2025), swap once the
    gradient norm has peaked and fallen below ``ratio`` times its running maximum
    (``detector="peak_ratio"``). The default, ``detector="log_slope"``
    (:class:`~lightning_twophase.detectors.LogSlopeDetector`), waits until
    :math:`\log \lVert g \rVert` falls linearly in :math:`\log L` with a positive slope, as
    in a Polyak-Lojasiewicz region. On the package's reproduction benchmark it was never worse
    than the 0.9 rule and lost less to Adam (``docs/benchmarks.md``).

    At the swap the optimizer that Lightning steps is replaced by
    :class:`~lightning_twophase.ConjugateGradient` over the same parameters and groups, and
    its schedulers are dropped. From then on every training step runs CG iterations on one
    deterministic objective: the mean loss over a fixed CG batch of ``cg_batch_size`` samples
    (the whole training set by default), accumulated over micro-batches of the user's batch
    size. Line searches on a changing mini-batch fail, so the mini-batch never enters the CG update.

    Cost of the CG phase: every training step runs ``max_iter`` CG iterations, each of one to a
    few evaluations of the CG batch (about two on the benchmark's digits models), so one
    CG-phase epoch costs roughly ``num_training_batches * 2 * max_iter * cg_batch_size``
    sample gradients, against ``num_training_batches * batch_size`` for an Adam epoch. The
    ``twophase/samples`` scalar tracks the running total; size ``max_epochs`` or
    ``max_steps`` with it.

    Args:
        ratio: Swap when the watched statistic falls below ``ratio`` times its running
            maximum; in (0, 1).
        detector: A name from ``detection.DETECTORS`` (``"peak_ratio"``, ``"log_slope"``,
            ``"curvature"``, ``"cost_aware"``, ``"fixed_epoch"``) or a
            :class:`~lightning_twophase.detection.SwapDetector` instance (then ``ratio``,
            ``patience`` and ``statistic`` are the detector's own).
        statistic: ``"grad_norm_of_mean"`` (the norm of the gradient averaged over the
            interval, which cancels mini-batch noise) or ``"grad_norm_batch_mean"`` (the mean
            per-batch norm).
        min_epochs: Warm-up: no swap before this many epochs have completed.
        min_steps: Warm-up: no swap before this many optimizer steps.
        patience: Extra consecutive checks below the threshold before the swap.
        check_every_n_steps: Check every this many optimizer steps instead of every epoch.
        monitor: Name of a logged metric to use as the loss instead of the loss that
            ``training_step`` returns.
        cg_batch_size: Samples in the fixed CG batch; ``None`` uses the whole training set
            (required to be an int for an ``IterableDataset``).
        cg_micro_batch_size: Micro-batch size of the CG objective; ``None`` uses the
            training DataLoader's ``batch_size``.
        cg_kwargs: Keyword arguments of :class:`~lightning_twophase.ConjugateGradient`,
            merged over ``{"max_iter": 2, "history_size": 10}``: two iterations per training
            step, with the quasi-Newton preconditioner of the last 10 steps.
            ``{"history_size": 0}`` gives plain CG, which stores 21 parameter-sized buffers fewer.
        optimizer_factory: Builds another closure-based optimizer (for example
            ``lambda groups: torch.optim.LBFGS(groups, line_search_fn="strong_wolfe")``) from
            the parameter groups; replaces ``cg_kwargs``.
        cg_dtype: ``torch.float64`` converts the model and inputs to double precision for the
            CG phase (single-device strategies only). The strings ``"float64"`` and
            ``"float32"`` are accepted for YAML configurations.
        figure_every_n_checks: Refresh the norm-versus-loss image every this many checks.
        seed: Seed of the random subset when ``cg_batch_size`` is smaller than the data.
        switch_back_patience: Swap back to the kept Adam optimizer after this many consecutive
            windows (each at least two training sets of sample gradients) in which CG lowers the
            log loss per sample gradient more slowly than ``switch_back_margin`` times the rate
            of Adam's power-law trend, fitted before the swap, at the same loss, and stays above
            that trend (see :mod:`lightning_twophase.safeguard`); ``None`` disables the guard.
        switch_back_margin: CG loses a window when its rate is below this factor times Adam's.
            The default 0.25 tolerates part of CG's slow start: its first windows after a swap
            ran 1.5 to 26 times below Adam's trend rate on the benchmark's MNIST-1D VGG.
        swap_retry_factor: After a swap back, the callback swaps to CG again, without asking
            the detector, at the first check where the sample gradients spent have reached
            this factor times those at the swap back. ``None`` keeps Adam for the rest of the run.
        cg_batch_policy: A :class:`~lightning_twophase.batch_policy.DynamicBatchPolicy` that
            starts the CG batch at its ``initial_size`` and grows it by a variance test;
            replaces ``cg_batch_size``.

    Attributes:
        switched: Whether training is in the CG phase now.
        switch_epoch: Epoch (counted from 0) at whose end the last swap to CG happened, or ``None``.
        switch_step: Global step of the last swap, or ``None``.
        switch_reason: The detector's message at the last swap, or the retry's reason.
        swaps: One dict per swap to CG (epoch, step, samples, reason); ``switch_epoch``,
            ``switch_step`` and ``switch_reason`` describe the last of them.
        switch_backs: One dict per swap back to Adam (epoch, step, samples, reason, loss, grad_norm).
        history: :class:`~lightning_twophase.tensorboard.CheckPoint` records: one per Adam-phase
            check and one per CG step that lowered the loss.
        sample_gradients: Samples passed forward and backward so far, over all ranks, including
            line-search evaluations and CG trials.
        cg_batch_size_used: Current CG batch size under ``cg_batch_policy``.

    Raises:
        ValueError: On invalid arguments, at construction.

    Example::

        import lightning as L
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning_twophase import ConvexitySwitch

        switch = ConvexitySwitch()
        trainer = L.Trainer(max_epochs=60, callbacks=[switch], logger=TensorBoardLogger("logs"))
        trainer.fit(model, datamodule)
        print(switch.switched, switch.switch_epoch, type(trainer.optimizers[0]).__name__)
    """

    def __init__(
        self,
        ratio: float = 0.9,
        detector: str | SwapDetector = "log_slope",
        statistic: str = "grad_norm_of_mean",
        min_epochs: int = 1,
        min_steps: int = 0,
        patience: int = 0,
        check_every_n_steps: int | None = None,
        monitor: str | None = None,
        cg_batch_size: int | None = None,
        cg_micro_batch_size: int | None = None,
        cg_kwargs: dict[str, Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        cg_dtype: torch.dtype | str | None = None,
        figure_every_n_checks: int = 5,
        seed: int = 0,
        switch_back_patience: int | None = 2,
        switch_back_margin: float = 0.25,
        swap_retry_factor: float | None = 2.0,
        cg_batch_policy: DynamicBatchPolicy | None = None,
    ) -> None:
        cg_dtype = resolve_cg_dtype(cg_dtype)
        validate_arguments(
            ratio=ratio,
            min_epochs=min_epochs,
            min_steps=min_steps,
            check_every_n_steps=check_every_n_steps,
            cg_batch_size=cg_batch_size,
            cg_micro_batch_size=cg_micro_batch_size,
            cg_dtype=cg_dtype,
            figure_every_n_checks=figure_every_n_checks,
        )

        self.detector = make_detector(detector, ratio=ratio, patience=patience, statistic=statistic)
        self.min_epochs = min_epochs
        self.min_steps = min_steps
        self.check_every_n_steps = check_every_n_steps
        self.monitor = monitor

        self.cg_batch_size = cg_batch_size
        self.cg_micro_batch_size = cg_micro_batch_size
        self.cg_kwargs = {**DEFAULT_CG_KWARGS, **(cg_kwargs or {})}
        self.optimizer_factory = optimizer_factory
        self.cg_dtype = cg_dtype
        self.figure_every_n_checks = figure_every_n_checks
        self.seed = seed

        self.switch_back_patience = switch_back_patience
        self.switch_back_margin = switch_back_margin
        self.swap_retry_factor = swap_retry_factor
        self.cg_batch_policy = cg_batch_policy

        # Validates patience and margin now; the window is set at the swap.
        SwapBackGuard(1, 1 if switch_back_patience is None else switch_back_patience, switch_back_margin)
        check_retry_factor(swap_retry_factor)
        validate_second_phase(self.cg_kwargs, optimizer_factory, monitor)
        self._initial_detector_state = copy.deepcopy(self.detector.state_dict())
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Forget everything a previous ``fit`` recorded. A resumed fit reloads it afterwards."""
        self.detector.load_state_dict(copy.deepcopy(self._initial_detector_state))
        self.phase = Phase.ADAM
        self.switch_epoch: int | None = None
        self.switch_step: int | None = None
        self.switch_reason: str | None = None
        self.sample_gradients = 0
        self.history: list[CheckPoint] = []
        self.last_decision: Decision | None = None
        self.swaps: list[dict[str, Any]] = []
        self.switch_backs: list[dict[str, Any]] = []
        self.cg_batch_size_used: int | None = None

        self._guard: SwapBackGuard | None = None
        self._first_phase: FirstPhase | None = None
        self._pending_first_optimizer_state: dict[str, Any] | None = None
        self._pending_guard_state: dict[str, Any] | None = None
        self._pending_cache_current = False
        self._interval_start_samples = 0
        self._cg_steps = 0

        self._accumulator: IntervalAccumulator | None = None
        self._pending_accumulator_state: dict[str, Any] | None = None
        self._objective = None
        self._panels = PanelWriter()
        self._announced_convergence = False

    # ------------------------------------------------------------------ public state

    @property
    def switched(self) -> bool:
        """Whether the swap to the second phase has happened."""
        return self.phase == Phase.CG

    @property
    def state_key(self) -> str:
        return self._generate_state_key(statistic=self.detector.statistic)

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_setup(trainer, pl_module, cg_dtype=self.cg_dtype)
            # Lightning restores callback state after `setup`, so a resumed fit gets its state
            # back while a second fit with the same callback starts from scratch.
            self._reset_run_state()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit_start(trainer, adam_family=ADAM_FAMILY, expect_first_phase=self.phase == Phase.ADAM)
        self._accumulator = IntervalAccumulator(
            trainer.strategy.root_device, track_curvature=self.detector.needs_curvature
        )
        if self._pending_accumulator_state is not None:
            self._accumulator.load_state_dict(self._pending_accumulator_state, self._parameters(trainer))
            self._pending_accumulator_state = None

        if self.phase == Phase.CG:
            # Resuming in the CG phase: rebuild CG now, because Lightning loads the saved
            # optimizer state after on_fit_start into whatever `strategy.optimizers` holds.
            self._keep_first_phase(trainer)
            self._install_second_phase(trainer, pl_module, announce=False)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_cg_dataset(trainer, self.cg_batch_size, has_batch_policy=self.cg_batch_policy is not None)
        self._write_layout(trainer)
        if self.phase == Phase.CG and self._objective is None:
            self._build_objective(trainer)
            self._objective.uncounted_evaluations = int(self._pending_cache_current)
        self._pending_cache_current = False
        if self.phase == Phase.CG and self._pending_guard_state is not None and self.switch_back_patience is not None:
            self._arm_guard(trainer, evaluate=False)
            self._guard.load_state_dict(self._pending_guard_state)
            self._pending_guard_state = None

    # ------------------------------------------------------------------ Adam phase

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.phase == Phase.ADAM and self._accumulator is not None:
            self._accumulator.update_gradients(self._parameters(trainer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._show_phase(trainer)
        self.sample_gradients += extract_batch_size(batch) * trainer.world_size
        if self.phase == Phase.CG:
            self._log_cg_step(trainer)
            self._record_cg_point(trainer)
            self._cg_steps += 1
            self._maybe_grow_cg_batch(trainer, pl_module)
            self._maybe_swap_back(trainer, pl_module)
            return

        loss = self._batch_loss(trainer, outputs)
        if loss is not None and self._accumulator is not None:
            self._accumulator.update_loss(loss)

        n = self.check_every_n_steps
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if n is not None and stepped and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._check(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase == Phase.ADAM and self.check_every_n_steps is None:
            self._check(trainer, pl_module)
        elif self.phase == Phase.CG and trainer.current_epoch % self.figure_every_n_checks == 0:
            self._write_figure(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_figure(trainer)
        self._flush(trainer)

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        accumulator = self._accumulator.state_dict() if self._accumulator is not None else {"batches": 0}
        return {
            "phase": int(self.phase),
            "switch_epoch": self.switch_epoch,
            "switch_step": self.switch_step,
            "switch_reason": self.switch_reason,
            "sample_gradients": self.sample_gradients,
            "detector": self.detector.state_dict(),
            "history": [vars(point) for point in self.history],
            "accumulator": accumulator,
            "cg_dtype": str(self.cg_dtype) if self.cg_dtype is not None else None,
            "swaps": list(self.swaps),
            "switch_backs": list(self.switch_backs),
            "guard": self._guard.state_dict() if self._guard is not None else None,
            "first_optimizer_state": self._first_optimizer_state(),
            "cg_batch_size_used": self.cg_batch_size_used,
            "interval_start_samples": self._interval_start_samples,
            "cg_steps": self._cg_steps,
            "objective_cache_current": self._objective is not None and self._objective.cache_is_current(),
        }

    def _first_optimizer_state(self) -> dict[str, Any] | None:
        # Only needed to swap back after a resume; costs Adam's two moment buffers per parameter.
        if self.phase != Phase.CG or self._guard is None or self._first_phase is None:
            return None
        return self._first_phase.optimizer.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = Phase(state_dict.get("phase", 0))
        self.switch_epoch = state_dict.get("switch_epoch")
        self.switch_step = state_dict.get("switch_step")
        self.switch_reason = state_dict.get("switch_reason")
        self.sample_gradients = state_dict.get("sample_gradients", 0)
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.history = [CheckPoint(**point) for point in state_dict.get("history", [])]
        self._pending_accumulator_state = state_dict.get("accumulator")
        self.swaps = list(state_dict.get("swaps", []))
        self.switch_backs = list(state_dict.get("switch_backs", []))
        self._pending_guard_state = state_dict.get("guard")
        self._pending_first_optimizer_state = state_dict.get("first_optimizer_state")
        self.cg_batch_size_used = state_dict.get("cg_batch_size_used")
        self._interval_start_samples = state_dict.get("interval_start_samples", 0)
        self._cg_steps = state_dict.get("cg_steps", 0)
        self._pending_cache_current = bool(state_dict.get("objective_cache_current", False))

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has already copied the saved weights into the module in its own dtype. A
        # checkpoint written in a float64 CG phase must be reloaded after converting the module,
        # or resuming would round the weights to float32.
        states = checkpoint.get("callbacks", {})
        own = states.get(self.state_key, {})
        if own.get("phase") == int(Phase.CG) and self.cg_dtype is not None:
            convert_model_dtype(trainer, pl_module, self.cg_dtype)
            pl_module.load_state_dict(checkpoint["state_dict"], strict=pl_module.strict_loading)

    # ------------------------------------------------------------------ the decision

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accumulator = self._accumulator
        if accumulator is None or accumulator.empty:
            return
        stats = accumulator.compute(trainer.current_epoch, trainer.global_step)
        accumulator.reset()
        stats = replace(stats, samples=self.sample_gradients - self._interval_start_samples)
        if self._swaps_allowed() and self.detector.wants_trial(stats):
            stats = replace(stats, trial_rate=self._run_trial(trainer, pl_module))
        self._interval_start_samples = self.sample_gradients

        decision = self._decide(trainer, stats)
        self.last_decision = decision
        if decision.reason == DecisionReason.NON_FINITE:
            rank_zero_warn(f"ConvexitySwitch: {decision.message} The detector ignored this check.")
        else:
            self.history.append(self._point(stats, Phase.ADAM))

        self._log_check(trainer, stats)
        if self._retry_due():
            self._swap(trainer, pl_module, self._retry_decision())
        elif decision.swap and self._swaps_allowed():
            self._swap(trainer, pl_module, decision)
        elif len(self.history) % self.figure_every_n_checks == 0:
            self._write_figure(trainer)

    def _decide(self, trainer: pl.Trainer, stats: IntervalStatistics) -> Decision:
        decision = self.detector.update(stats)
        warm = trainer.current_epoch + 1 >= self.min_epochs and trainer.global_step >= self.min_steps
        if decision.swap and not warm:
            return Decision(
                False,
                DecisionReason.WARMUP,
                f"Warm-up until epoch {self.min_epochs} and step {self.min_steps}: {decision.message}",
            )
        return decision

    def _point(self, stats: IntervalStatistics, phase: Phase) -> CheckPoint:
        return CheckPoint(
            step=stats.step,
            epoch=stats.epoch,
            loss=stats.loss,
            grad_norm=stats.value(self.detector.statistic),
            phase=int(phase),
            samples=self.sample_gradients,
        )

    def _swaps_allowed(self) -> bool:
        # The detector decides the first swap only; after a swap back, _retry_due does.
        return not self.switch_backs

    def _retry_due(self) -> bool:
        # After a swap back, the detector had found its evidence and CG then lost on speed at
        # that loss level. Adam's rate falls as training goes on while CG's does not, so the
        # callback retries without asking the detector again. The wait grows geometrically,
        # which bounds the sample gradients that repeated failures can cost.
        if not self.switch_backs or self.swap_retry_factor is None:
            return False
        return self.sample_gradients >= self.swap_retry_factor * self.switch_backs[-1].get("samples", 0)

    def _retry_decision(self) -> Decision:
        back = self.switch_backs[-1]
        message = (
            f"Retry: {self.sample_gradients} sample gradients, {self.swap_retry_factor:g} times the"
            f" {back.get('samples', 0)} at the swap back in epoch {back['epoch']}."
        )
        return Decision(True, DecisionReason.SWAP, message)

    def _run_trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        if self._objective is None:
            self._build_objective(trainer)
        result = run_cg_trial(
            self._parameters(trainer),
            list(pl_module.buffers()),
            self._objective,
            samples_spent=lambda: self.sample_gradients,
            iterations=getattr(self.detector, "trial_iterations", 5),
            cg_kwargs=self.cg_kwargs,
        )
        return result.rate

    # ------------------------------------------------------------------ the swap

    def _swap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: Decision) -> None:
        self.switch_epoch = trainer.current_epoch
        self.switch_step = trainer.global_step
        self.switch_reason = decision.message
        self.swaps.append({
            "epoch": self.switch_epoch,
            "step": self.switch_step,
            "samples": self.sample_gradients,
            "reason": decision.message,
        })
        self.phase = Phase.CG
        self._warn_dropped(trainer)
        self._keep_first_phase(trainer)
        self._install_second_phase(trainer, pl_module, announce=True)
        if self._objective is None or self.cg_batch_policy is not None:
            self._build_objective(trainer)
        self._arm_guard(trainer)
        if self._accumulator is not None:
            self._accumulator.release()
        self._write_switch_text(trainer)
        self._write_figure(trainer)
        self._flush(trainer)

    def _install_second_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule, announce: bool) -> None:
        if self.cg_dtype is not None:
            convert_model_dtype(trainer, pl_module, self.cg_dtype)

        first = trainer.optimizers[0]
        second = build_second_phase_optimizer(first, self.optimizer_factory, self.cg_kwargs)
        install_optimizer(trainer, second)
        route_step_to(second, self._evaluate_objective)
        if trainer.accumulate_grad_batches != 1:
            trainer.accumulate_grad_batches = 1

        if announce:
            rank_zero_info(
                f"ConvexitySwitch: swapped {type(first).__name__} for {type(second).__name__} at epoch"
                f" {self.switch_epoch}, step {self.switch_step}. {self.switch_reason}"
            )

    def _keep_first_phase(self, trainer: pl.Trainer) -> None:
        self._first_phase = FirstPhase.capture(trainer, self._pending_first_optimizer_state)
        self._pending_first_optimizer_state = None

    def _arm_guard(self, trainer: pl.Trainer, evaluate: bool = True) -> None:
        if self.switch_back_patience is None:
            return
        dataset = first_train_loader(trainer.train_dataloader).dataset
        # An IterableDataset has no length, so its CG batch (cg_batch_size, required there) sets the window.
        size = len(dataset) if hasattr(dataset, "__len__") else (self.cg_batch_size or 1)
        window = max(1, GUARD_WINDOW_PASSES * size)
        self._guard = SwapBackGuard(window, self.switch_back_patience, self.switch_back_margin)
        if not evaluate:
            return

        # CG's first step starts at this point, and the objective's cache hands it this very
        # evaluation, so reading the starting loss costs no extra sample gradients.
        loss = float(self._evaluate_objective())
        trend = self._adam_trend(loss)
        self.swaps[-1]["trend"] = None if trend is None else [trend.log_scale, trend.exponent]
        self._guard.start(trend, loss, self.sample_gradients)
        if not self._guard.armed:
            rank_zero_warn(
                "ConvexitySwitch: the swap-back guard is off for this swap, because the Adam phase had fewer than"
                " two checks, or a loss that did not fall, to fit its trend. Raise min_epochs to keep it."
            )

    def _adam_trend(self, loss: float) -> AdamTrend | None:
        """Fit Adam's trend to the recent Adam checks; at a retry, fall back to an earlier exponent.

        After a swap back, the fit uses only the Adam checks since then. When they do not give
        a falling trend (too few, or too noisy), the fit uses the exponent of an earlier swap's
        trend instead, anchored so that the trend passes through ``loss`` at the current sample count.
        """
        adam_points = [(p.loss, p.samples) for p in self.history if p.phase == int(Phase.ADAM)]
        trend = fit_adam_trend(adam_points)
        if trend is not None and trend.exponent > 0.0:
            return trend

        usable = loss > 0.0 and math.isfinite(loss) and self.sample_gradients > 0
        for swap in reversed(self.swaps[:-1]):
            earlier = swap.get("trend")
            if usable and earlier is not None and earlier[1] > 0.0:
                exponent = earlier[1]
                log_scale = math.log(loss) + exponent * math.log(self.sample_gradients)
                return AdamTrend(log_scale=log_scale, exponent=exponent, points=0)
        return trend

    def _maybe_swap_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._guard is None or self._objective is None or self._objective.last_loss is None:
            return
        stats = getattr(trainer.optimizers[0], "last_stats", None)
        if stats is not None and stats.reason.value == "converged_grad":
            # CG reached the gradient tolerance the user set, so its zero rate is no reason to
            # leave it. A stop on tolerance_change is a stall, which the guard does judge.
            return

        verdict = self._guard.update(self._objective.last_loss, self.sample_gradients)
        if not math.isnan(verdict.cg_rate):
            # A NaN rate means the window is still open.
            self._log_metrics(trainer, guard_window_metrics(verdict))
        if verdict.swap_back:
            self._swap_back(trainer, pl_module, verdict.message)

    def _swap_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        first = self._first_phase
        if first is None:
            rank_zero_warn(f"ConvexitySwitch: cannot swap back to Adam, its state was not kept. {reason}")
            self._guard = None
            return

        stats = getattr(trainer.optimizers[0], "last_stats", None)
        first.restore(trainer, pl_module)

        self.phase = Phase.ADAM
        self.switch_backs.append({
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "samples": self.sample_gradients,
            "reason": reason,
            "loss": self._objective.last_loss if self._objective is not None else None,
            "grad_norm": getattr(stats, "grad_norm", None),
        })
        self._guard = None
        self._first_phase = None
        self._interval_start_samples = self.sample_gradients
        self._log_metrics(trainer, {TAG.PHASE: float(Phase.ADAM)})
        rank_zero_info(
            f"ConvexitySwitch: swapped back to {type(first.optimizer).__name__} at epoch {trainer.current_epoch},"
            f" step {trainer.global_step}. {reason}"
        )
        self._write_switch_back_text(trainer, reason)
        self._flush(trainer)

    def _maybe_grow_cg_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        policy = self.cg_batch_policy
        if policy is None or self._objective is None or self._cg_steps % policy.test_every != 0:
            return
        dataset_size = len(first_train_loader(trainer.train_dataloader).dataset)
        current = self.cg_batch_size_used or dataset_size
        if current >= dataset_size:
            return

        estimate = self._objective.gradient_variance(world_size=trainer.world_size)
        size = policy.next_size(estimate, dataset_size)
        self._log_metrics(trainer, {TAG.CG_BATCH_SIZE: float(size)})
        if size > current:
            self.cg_batch_size_used = size
            self._build_objective(trainer)
            # The objective changed, so a CG direction built on the old one is meaningless.
            second = build_second_phase_optimizer(trainer.optimizers[0], self.optimizer_factory, self.cg_kwargs)
            install_optimizer(trainer, second)
            route_step_to(second, self._evaluate_objective)

    def _evaluate_objective(self) -> Tensor:
        if self._objective is None:
            raise RuntimeError("ConvexitySwitch: the CG objective was evaluated before the training data was ready.")
        return self._objective()

    def _build_objective(self, trainer: pl.Trainer) -> None:
        world = trainer.world_size

        def count(local_samples: int) -> None:
            self.sample_gradients += local_samples * world

        size = self.cg_batch_size
        if self.cg_batch_policy is not None:
            size = self.cg_batch_size_used or self.cg_batch_policy.initial_size
            size = min(size, len(first_train_loader(trainer.train_dataloader).dataset))
        self._objective = build_objective(
            trainer,
            cg_batch_size=size,
            micro_batch_size=self.cg_micro_batch_size,
            seed=self.seed,
            count_samples=count,
        )
        self.cg_batch_size_used = size

    def _warn_dropped(self, trainer: pl.Trainer) -> None:
        dropout = [
            name
            for name, module in trainer.lightning_module.named_modules()
            if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0
        ]
        if dropout:
            rank_zero_warn(
                f"ConvexitySwitch: dropout in {', '.join(dropout[:3])} makes every CG-batch evaluation random, so"
                " line searches compare different functions and CG stalls. Set the dropout probability to 0"
                " for the CG phase (for example in a callback at the swap) or train without dropout."
            )
        first = trainer.optimizers[0]
        schedulers = [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs]
        if schedulers:
            rank_zero_warn(
                f"ConvexitySwitch: the learning-rate schedulers {', '.join(schedulers)} are dropped at the swap,"
                " because CG chooses its step length by line search. Adam keeps them if the guard swaps back."
            )
        for setting in dropped_settings(first):
            rank_zero_warn(
                f"ConvexitySwitch: the CG phase minimises the training loss without {setting};"
                " add the penalty to the loss in training_step if it must stay."
            )
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"ConvexitySwitch: gradient_clip_val={trainer.gradient_clip_val} is not applied in the CG phase,"
                " because clipping changes the gradient but not the loss and breaks the line search."
            )
        if trainer.accumulate_grad_batches != 1:
            rank_zero_warn(
                f"ConvexitySwitch: accumulate_grad_batches={trainer.accumulate_grad_batches} is set to 1 for the"
                " CG phase, because every CG step accumulates the whole CG batch itself."
            )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _parameters(trainer: pl.Trainer) -> list[Tensor]:
        return [p for group in trainer.optimizers[0].param_groups for p in group["params"]]

    def _batch_loss(self, trainer: pl.Trainer, outputs: Any) -> Tensor | None:
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                available = ", ".join(sorted(trainer.callback_metrics)) or "none"
                raise ValueError(
                    f"Invalid monitor: {self.monitor!r} was not logged in this training step. Available metrics:"
                    f" {available}. Log it every step with self.log({self.monitor!r}, ..., on_step=True)"
                    " or pass monitor=None."
                )
            return value
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return None
        return loss * trainer.accumulate_grad_batches

    def _record_cg_point(self, trainer: pl.Trainer) -> None:
        """Add the CG step's loss and gradient norm to the history unless CG has stopped moving."""
        stats = getattr(trainer.optimizers[0], "last_stats", None)
        if stats is None:
            return
        norm = getattr(stats, "grad_norm", None)
        if norm is None:
            grads = [p.grad for p in self._parameters(trainer) if p.grad is not None]
            norm = float(total_grad_norm(grads)) if grads else float("nan")
        last = self.history[-1] if self.history else None
        if last is not None and last.phase == int(Phase.CG) and last.loss == float(stats.loss):
            return
        point = CheckPoint(
            trainer.global_step, trainer.current_epoch, float(stats.loss), norm, int(Phase.CG), self.sample_gradients
        )
        self.history.append(point)
        self._log_metrics(trainer, {TAG.GRAD_NORM: norm})

    # ------------------------------------------------------------------ logging

    def _log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        log_metrics(trainer, metrics)

    def _log_check(self, trainer: pl.Trainer, stats: IntervalStatistics) -> None:
        log_metrics(trainer, check_metrics(stats, self.detector, self.sample_gradients))

    def _log_cg_step(self, trainer: pl.Trainer) -> None:
        stats = getattr(trainer.optimizers[0], "last_stats", None)
        last_loss = self._objective.last_loss if self._objective is not None else None
        log_metrics(trainer, cg_step_metrics(stats, last_loss, self.sample_gradients))

        converged = stats is not None and stats.reason.value in ("converged_grad", "converged_change")
        if converged and not self._announced_convergence:
            rank_zero_info(
                f"ConvexitySwitch: CG converged at step {trainer.global_step} ({stats.message}, loss"
                f" {stats.loss:.3e}); further steps leave the weights unchanged. Stop training, or lower"
                " tolerance_grad/tolerance_change in cg_kwargs."
            )
        self._announced_convergence = self._announced_convergence or converged

    def _write_layout(self, trainer: pl.Trainer) -> None:
        self._panels.layout(trainer)

    def _write_figure(self, trainer: pl.Trainer) -> None:
        backs = [
            CheckPoint(back["step"], back["epoch"], back["loss"], back["grad_norm"], int(Phase.CG))
            for back in self.switch_backs
            if back.get("loss") is not None and back.get("grad_norm") is not None
        ]
        self._panels.figure(trainer, self.history, self._switch_point(), self.detector.threshold, backs)

    def _switch_point(self) -> CheckPoint | None:
        if self.switch_step is None:
            return None
        adam = [p for p in self.history if p.phase == int(Phase.ADAM) and p.step <= self.switch_step]
        return adam[-1] if adam else None

    def _write_switch_text(self, trainer: pl.Trainer) -> None:
        point = self._switch_point()
        if point is None:
            return
        text = panels.switch_text(point, self.detector.running_max, self.switch_reason or "", self.detector.statistic)
        self._panels.text(trainer, TAG.SWITCH, text)

    def _write_switch_back_text(self, trainer: pl.Trainer, reason: str) -> None:
        text = f"**Swapped back to Adam** at epoch {trainer.current_epoch}, global step {trainer.global_step}.\n\n{reason}"
        self._panels.text(trainer, TAG.SWITCH_BACK, text)

    def _flush(self, trainer: pl.Trainer) -> None:
        self._panels.flush(trainer)

    def _show_phase(self, trainer: pl.Trainer) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and trainer.is_global_zero and bar.is_enabled:
            label = "Adam" if self.phase == Phase.ADAM else "CG"
            # refresh=False leaves redrawing to the bar's own refresh_rate, which the next update honours.
            bar.train_progress_bar.set_description(f"Epoch {trainer.current_epoch} [{label}]", refresh=False)

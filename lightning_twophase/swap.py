"""Building the second-phase optimizer, installing it into a running strategy, and swapping back."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_twophase.optim.cg import ConjugateGradient

__all__ = [
    "ADAM_FAMILY",
    "FirstPhase",
    "OptimizerFactory",
    "build_second_phase_optimizer",
    "adam_preconditioner",
    "dropped_settings",
    "install_optimizer",
    "route_step_to",
]

#: First-phase optimizers the detector was designed for; others get a warning.
ADAM_FAMILY: tuple[type[Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
)

#: Builds a closure-based optimizer from a list of parameter-group dicts.
OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]


def build_second_phase_optimizer(
    first: Optimizer,
    factory: OptimizerFactory | None = None,
    cg_kwargs: dict[str, Any] | None = None,
    preconditioner: list[torch.Tensor] | None = None,
) -> Optimizer:
    """Build the second-phase optimizer over the same parameters and groups as ``first``.

    Only the parameter lists are carried over: the first phase's learning rates, betas and
    weight decay do not apply to a line-search method. ``preconditioner`` is passed to
    ``ConjugateGradient`` and ignored by a ``factory``.
    """
    groups = [{"params": list(group["params"])} for group in first.param_groups]
    if factory is not None:
        return factory(groups)
    return ConjugateGradient(groups, **(cg_kwargs or {}), preconditioner=preconditioner)


def adam_preconditioner(first: Optimizer) -> list[torch.Tensor] | None:
    r"""Return Adam's diagonal scaling :math:`D = 1 / (\sqrt{\hat v} + \epsilon)` per parameter.

    :math:`\hat v = v / (1 - \beta_2^t)` is the bias-corrected second-moment estimate. Parameters
    that Adam never stepped get :math:`D = 1`. Returns ``None`` when ``first`` keeps no second
    moments (it is not from the Adam family, or it never stepped).
    """
    scales, found = [], False
    for group in first.param_groups:
        beta2 = group.get("betas", (0.9, 0.999))[1]
        eps = group.get("eps", 1e-8)
        for param in group["params"]:
            state = first.state.get(param, {})
            second_moment = state.get("exp_avg_sq")
            if second_moment is None:
                scales.append(torch.ones_like(param))
                continue
            found = True
            step = float(state.get("step", 1))
            corrected = second_moment / (1.0 - beta2**step)
            scales.append(1.0 / (corrected.sqrt() + eps))
    return scales if found else None


def dropped_settings(first: Optimizer) -> list[str]:
    """Return human-readable first-phase settings that the second phase does not apply."""
    dropped = []
    for index, group in enumerate(first.param_groups):
        decay = group.get("weight_decay", 0.0)
        if decay:
            dropped.append(f"weight_decay={decay} (parameter group {index})")
    return dropped


def install_optimizer(trainer: Any, optimizer: Optimizer) -> None:
    """Make ``optimizer`` the one Lightning steps, and drop the schedulers of the old one.

    Lightning steps the ``LightningOptimizer`` wrappers that the ``strategy.optimizers``
    setter rebuilds, so assigning to the module is not enough. The check below reads
    ``strategy._lightning_optimizers``, a private list (checked against Lightning 2.6), to
    fail loudly if a future release routes steps elsewhere.

    Raises:
        RuntimeError: When Lightning would still step the old optimizer.
    """
    strategy = trainer.strategy
    strategy.optimizers = [optimizer]
    strategy.lr_scheduler_configs = []

    wrapped = getattr(strategy, "_lightning_optimizers", None)
    stepped = wrapped[0].optimizer if wrapped else None
    if trainer.optimizers[0] is not optimizer or (wrapped is not None and stepped is not optimizer):
        raise RuntimeError(
            "Failed to install the second-phase optimizer: Lightning still steps"
            f" {type(stepped).__name__}. This Lightning version is not supported by ConvexitySwitch."
        )


def route_step_to(optimizer: Optimizer, objective: Callable[[], torch.Tensor]) -> None:
    """Make ``optimizer.step(closure)`` minimise ``objective`` instead of the closure's batch.

    Lightning's automatic optimisation passes a closure that runs ``training_step`` on the
    current mini-batch and expects it to be called. The routed step calls it once (the loop
    reads its output for the progress bar and ``on_train_batch_end``), then takes the
    optimizer's step on ``objective``. The bound ``step`` of this one instance is replaced;
    the class is untouched.
    """
    original_step = optimizer.step

    @functools.wraps(original_step)
    def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if closure is not None:
            closure()
        return original_step(objective, **kwargs)

    optimizer.step = step  # type: ignore[method-assign]


@dataclass
class FirstPhase:
    """The first-phase optimizer and trainer settings, kept at the swap for a later swap back.

    Keeping the optimizer object keeps Adam's moment estimates (two buffers per parameter).

    Attributes:
        optimizer: The optimizer Lightning stepped before the swap.
        schedulers: Its learning-rate scheduler configurations.
        accumulate_grad_batches: The trainer's gradient accumulation before the swap.
        precision_plugin: The strategy's precision plugin before a ``cg_dtype`` conversion.
        dtype: The parameters' dtype before a ``cg_dtype`` conversion.
    """

    optimizer: Optimizer
    schedulers: list[Any]
    accumulate_grad_batches: int
    precision_plugin: Any
    dtype: torch.dtype

    @classmethod
    def capture(cls, trainer: Any, saved_state: dict[str, Any] | None = None) -> FirstPhase:
        """Record the trainer's current optimizer and settings, loading ``saved_state`` into it if given."""
        optimizer = trainer.optimizers[0]
        if saved_state is not None:
            optimizer.load_state_dict(saved_state)
        return cls(
            optimizer=optimizer,
            schedulers=list(trainer.lr_scheduler_configs),
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            precision_plugin=trainer.strategy.precision_plugin,
            dtype=optimizer.param_groups[0]["params"][0].dtype,
        )

    def restore(self, trainer: Any, module: torch.nn.Module) -> None:
        """Make Lightning step the kept optimizer again, with its schedulers and settings."""
        if next(module.parameters()).dtype != self.dtype:
            module.to(self.dtype)
            trainer.strategy.precision_plugin = self.precision_plugin
        install_optimizer(trainer, self.optimizer)
        trainer.strategy.lr_scheduler_configs = self.schedulers
        trainer.accumulate_grad_batches = self.accumulate_grad_batches

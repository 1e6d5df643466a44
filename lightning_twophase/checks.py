"""Early input validation for ``ConvexitySwitch``: arguments, trainer setup and training data.

Each check raises before any parameter is updated, with a message that names the value and
the fix.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import IterableDataset

__all__ = ["check_cg_dataset", "check_fit_start", "check_retry_factor", "check_setup", "resolve_cg_dtype",
           "validate_arguments", "validate_second_phase"]

_SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)


def _check_positive_int(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    minimum = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "an int >= 0" if allow_zero else "an int >= 1"
        if allow_none:
            expected += " or None"
        raise ValueError(f"Invalid {name}: {value!r}. Expected {expected}.")


def check_retry_factor(value: Any) -> None:
    """Validate ``swap_retry_factor``: ``None`` or a finite number >= 1.

    Raises:
        ValueError: On any other value.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value < float("inf"):
        raise ValueError(
            f"Invalid swap_retry_factor: {value!r}. Use a number >= 1 such as 2.0, or None to never swap again."
        )


_CG_DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64}


def resolve_cg_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """Return ``cg_dtype`` as a ``torch.dtype``, accepting the names used in YAML configurations.

    The strings ``"float64"`` and ``"float32"`` (with or without a ``torch.`` prefix) map to
    the dtypes, because LightningCLI and jsonargparse cannot build a ``torch.dtype`` from a name.

    Raises:
        ValueError: For any other string.
    """
    if not isinstance(value, str):
        return value
    dtype = _CG_DTYPE_NAMES.get(value.removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"Invalid cg_dtype: {value!r}. Use 'float64', 'float32', torch.float64, torch.float32 or None.")
    return dtype


def validate_arguments(
    ratio: float,
    min_epochs: int,
    min_steps: int,
    check_every_n_steps: int | None,
    cg_batch_size: int | None,
    cg_micro_batch_size: int | None,
    cg_dtype: torch.dtype | None,
    figure_every_n_checks: int,
) -> None:
    """Validate ``ConvexitySwitch`` arguments that need no trainer.

    Raises:
        ValueError: On the first invalid argument.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"Invalid ratio: {ratio!r}. Use a value strictly between 0 and 1, such as 0.9.")
    _check_positive_int("min_epochs", min_epochs, allow_zero=True)
    _check_positive_int("min_steps", min_steps, allow_zero=True)
    _check_positive_int("check_every_n_steps", check_every_n_steps, allow_none=True)
    _check_positive_int("figure_every_n_checks", figure_every_n_checks)
    if cg_batch_size == "full":
        cg_batch_size = None
    _check_positive_int("cg_batch_size", cg_batch_size, allow_none=True)
    _check_positive_int("cg_micro_batch_size", cg_micro_batch_size, allow_none=True)
    if cg_dtype is not None and cg_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Invalid cg_dtype: {cg_dtype!r}. Use torch.float64, torch.float32 or None.")


def validate_second_phase(cg_kwargs: dict[str, Any], optimizer_factory: Any, monitor: Any) -> None:
    """Validate the second-phase settings at construction, long before the swap uses them.

    ``cg_kwargs`` are tried on a one-element dummy parameter, so every argument error of
    ``ConjugateGradient`` surfaces now, before any training step.

    Raises:
        ValueError: On invalid ``cg_kwargs`` or ``monitor``.
        TypeError: On a non-callable ``optimizer_factory``.
    """
    from lightning_twophase.optim.cg import ConjugateGradient

    if "preconditioner" in cg_kwargs:
        raise ValueError(
            "Invalid cg_kwargs key 'preconditioner': the callback builds ConjugateGradient at the swap from the "
            "model's parameter groups, so a per-parameter preconditioner cannot be given in advance. Remove it, or "
            "pass optimizer_factory=lambda groups: ConjugateGradient(groups, history_size=0, preconditioner=...)."
        )
    try:
        ConjugateGradient([torch.zeros(1, requires_grad=True)], **cg_kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Invalid cg_kwargs: {cg_kwargs!r}. {error}") from error
    if optimizer_factory is not None and not callable(optimizer_factory):
        raise TypeError(
            f"Invalid optimizer_factory: {optimizer_factory!r}. Pass a callable that takes a list of parameter-group"
            " dicts and returns an optimizer, such as lambda groups: torch.optim.LBFGS(groups)."
        )
    if monitor is not None and not isinstance(monitor, str):
        raise ValueError(f"Invalid monitor: {monitor!r}. Pass the name of a logged metric as a string, or None.")


def check_setup(trainer: pl.Trainer, pl_module: pl.LightningModule, cg_dtype: torch.dtype | None) -> None:
    """Reject trainer configurations the CG phase cannot run under.

    Raises:
        ValueError: For manual optimization, a sharding strategy, ``16-mixed`` precision, or
            ``cg_dtype`` under a multi-process strategy.
    """
    if not pl_module.automatic_optimization:
        raise ValueError(
            "Invalid LightningModule: automatic_optimization is False. ConvexitySwitch replaces the optimizer"
            " that Lightning steps, so it needs automatic optimization; remove"
            " `self.automatic_optimization = False` or drop the callback."
        )

    strategy = trainer.strategy
    if not isinstance(strategy, _SUPPORTED_STRATEGIES):
        raise ValueError(
            f"Invalid strategy: {type(strategy).__name__}. ConvexitySwitch keeps whole parameter tensors per rank"
            " and supports single-device and DDP strategies only; use strategy='ddp' or a single device."
        )

    precision = trainer.precision_plugin
    if isinstance(precision, MixedPrecision) and precision.scaler is not None:
        raise ValueError(
            f"Invalid precision: {trainer.precision!r}. Float16 AMP steps the optimizer through a GradScaler"
            " without the closure, which a line search needs. Use precision='bf16-mixed' or '32-true'."
        )

    if cg_dtype is not None and trainer.world_size > 1:
        raise ValueError(
            f"Invalid cg_dtype: {cg_dtype} with {trainer.world_size} processes. Converting a DDP-wrapped model"
            " mid-run is not supported; train with precision='64-true' instead, or pass cg_dtype=None."
        )


def check_fit_start(trainer: pl.Trainer, adam_family: tuple[type, ...], expect_first_phase: bool) -> None:
    """Check the configured optimizers once Lightning has built them.

    Raises:
        ValueError: When more than one optimizer is configured.
    """
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        names = ", ".join(type(o).__name__ for o in optimizers) or "none"
        raise ValueError(
            f"Invalid optimizer configuration: {len(optimizers)} optimizers ({names}). ConvexitySwitch swaps"
            " exactly one optimizer; return a single optimizer from configure_optimizers."
        )
    first = optimizers[0]
    if expect_first_phase and not isinstance(first, adam_family):
        rank_zero_warn(
            f"ConvexitySwitch: the first optimizer is {type(first).__name__}, not from the Adam family. The swap"
            " rule was designed for Adam's trajectory; the detector may swap too early or too late."
        )


def check_cg_dataset(trainer: pl.Trainer, cg_batch_size: int | None, has_batch_policy: bool = False) -> None:
    """Reject CG-batch settings that need the length of an iterable dataset.

    ``cg_batch_size=None`` (the whole set) and a growing CG batch both need the number of
    training samples, which an ``IterableDataset`` does not have.

    Raises:
        ValueError: With the fix, before the first training step.
    """
    loaders = trainer.train_dataloader
    loader = loaders if isinstance(loaders, torch.utils.data.DataLoader) else first_train_loader(loaders)
    if loader is None:
        return
    if isinstance(loader.dataset, IterableDataset) and cg_batch_size is None:
        raise ValueError(
            "Invalid cg_batch_size: None (the whole training set) with an IterableDataset of unknown length."
            " Pass ConvexitySwitch(cg_batch_size=N) with the number of samples per CG evaluation."
        )
    if isinstance(loader.dataset, IterableDataset) and has_batch_policy:
        raise ValueError(
            "Invalid cg_batch_policy with an IterableDataset: a growing CG batch needs the number of training"
            " samples. Pass cg_batch_policy=None and a fixed cg_batch_size instead."
        )


def first_train_loader(loaders: Any) -> torch.utils.data.DataLoader | None:
    if isinstance(loaders, torch.utils.data.DataLoader):
        return loaders
    if isinstance(loaders, dict):
        values = list(loaders.values())
    elif isinstance(loaders, (list, tuple)):
        values = list(loaders)
    else:
        return None
    if len(values) != 1:
        raise ValueError(
            f"Invalid training data: {len(values)} training DataLoaders. ConvexitySwitch builds the CG batch"
            " from one DataLoader; combine your datasets into one."
        )
    return first_train_loader(values[0])

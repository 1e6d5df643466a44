"""The few places where the CG phase must reach into a running ``Trainer``.

Everything that touches Lightning's private API sits here, checked against Lightning 2.6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import DoublePrecision
from lightning.pytorch.trainer import call
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_twophase.checks import first_train_loader
from lightning_twophase.objective import FixedBatchObjective, build_micro_batch_source

__all__ = ["build_objective", "convert_model_dtype"]


def build_objective(
    trainer: pl.Trainer,
    cg_batch_size: int | None,
    micro_batch_size: int | None,
    seed: int,
    count_samples: Callable[[int], None] | None = None,
) -> FixedBatchObjective:
    """Build the fixed-batch CG objective over the trainer's training data.

    ``training_step`` and ``backward`` run through ``lightning.pytorch.trainer.call``'s
    strategy-hook helper (private in Lightning 2.6): it sets the module's current hook name,
    so ``self.log`` inside ``training_step`` is accepted, and the strategy call goes through
    the DDP wrapper, so gradients are averaged over ranks.
    """
    loader = first_train_loader(trainer.train_dataloader)
    sampler_kwargs = trainer.strategy.distributed_sampler_kwargs if trainer.world_size > 1 else {}
    source = build_micro_batch_source(
        loader,
        cg_batch_size=cg_batch_size,
        micro_batch_size=micro_batch_size,
        seed=seed,
        num_replicas=sampler_kwargs.get("num_replicas", 1),
        rank=sampler_kwargs.get("rank", 0),
    )
    _agree_on_micro_batch_count(trainer, source)
    optimizer_ref = trainer.optimizers

    def prepare_batch(batch: Any) -> Any:
        batch = trainer.precision_plugin.convert_input(batch)
        return trainer.strategy.batch_to_device(batch)

    def training_step(batch: Any, index: int) -> Any:
        return call._call_strategy_hook(trainer, "training_step", batch, index)

    def backward(loss: Tensor) -> None:
        call._call_strategy_hook(trainer, "backward", loss, optimizer_ref[0])

    def zero_grad() -> None:
        trainer.optimizers[0].zero_grad(set_to_none=True)

    def reduce_mean(value: Tensor) -> Tensor:
        if trainer.world_size == 1:
            return value
        return trainer.strategy.reduce(value, reduce_op="mean")

    return FixedBatchObjective(
        source,
        prepare_batch=prepare_batch,
        training_step=training_step,
        backward=backward,
        zero_grad=zero_grad,
        reduce_mean=reduce_mean,
        no_sync=_no_sync_factory(trainer),
        count_samples=count_samples,
        params=lambda: [p for group in trainer.optimizers[0].param_groups for p in group["params"]],
    )


def _no_sync_factory(trainer: pl.Trainer) -> Callable[[], contextlib.AbstractContextManager] | None:
    model = trainer.strategy.model
    if isinstance(model, DistributedDataParallel):
        return model.no_sync
    return None


def _agree_on_micro_batch_count(trainer: pl.Trainer, source: Any) -> None:
    # Every backward under DDP is a collective, so all ranks must run the same number of
    # micro-batches. Map-style shards are equal by construction; cached iterable shards may not be.
    if trainer.world_size == 1 or source.cached is None or not dist.is_initialized():
        return
    count = torch.tensor([len(source.cached)], device=trainer.strategy.root_device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    keep = int(count.item())
    source.cached = source.cached[:keep]
    source.sizes = source.sizes[:keep]
    source.total = sum(source.sizes)


def convert_model_dtype(trainer: pl.Trainer, pl_module: pl.LightningModule, dtype: torch.dtype) -> None:
    """Convert the module to ``dtype`` and make the trainer feed inputs in that dtype.

    For ``torch.float64`` the strategy's precision plugin becomes Lightning's
    ``DoublePrecision`` (the plugin behind ``precision="64-true"``), which converts every
    floating-point batch before ``training_step`` and ``validation_step``. Parameters are
    converted in place, so optimizers keep referencing the same tensors.
    """
    # The plugin is set even when the parameters already have ``dtype`` (for example a module
    # the user converted), because only the plugin converts the inputs.
    if next(pl_module.parameters()).dtype != dtype:
        pl_module.to(dtype)
    if dtype == torch.float64 and not isinstance(trainer.strategy.precision_plugin, DoublePrecision):
        trainer.strategy.precision_plugin = DoublePrecision()

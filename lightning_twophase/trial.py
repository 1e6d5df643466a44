r"""Short CG trials from a copy of the parameters, for cost-aware swap decisions.

A trial runs a few CG iterations on the CG-batch objective, measures how fast the log loss
falls per sample gradient, then puts the parameters, module buffers and the global random
generators (CPU and the parameters' CUDA devices) back exactly. The
samples it spends are counted by the objective like any other evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_twophase.optim.cg import ConjugateGradient

__all__ = ["TrialResult", "log_loss_rate", "run_cg_trial"]


def log_loss_rate(loss_before: float, loss_after: float, samples: int) -> float:
    r"""Return :math:`(\log L_0 - \log L_1) / S`, or NaN when undefined."""
    if samples <= 0 or not (loss_before > 0.0 and loss_after > 0.0):
        return math.nan
    if not (math.isfinite(loss_before) and math.isfinite(loss_after)):
        return math.nan
    return (math.log(loss_before) - math.log(loss_after)) / samples


@dataclass(frozen=True)
class TrialResult:
    """Outcome of one CG trial.

    Attributes:
        loss_before: CG-batch loss at the starting parameters.
        loss_after: CG-batch loss after the trial's iterations.
        samples: Sample gradients the trial spent, over all ranks.
        rate: :math:`(\\log L_0 - \\log L_1) / S`, per sample gradient.
    """

    loss_before: float
    loss_after: float
    samples: int
    rate: float


def run_cg_trial(
    params: Sequence[Tensor],
    buffers: Sequence[Tensor],
    objective: Callable[[], Tensor],
    samples_spent: Callable[[], int],
    iterations: int,
    cg_kwargs: dict[str, Any] | None = None,
) -> TrialResult:
    """Run ``iterations`` CG iterations on ``objective`` and restore the starting state.

    Args:
        params: Parameters the trial moves (restored afterwards).
        buffers: Module buffers that evaluations may change, such as batch-norm running
            statistics (restored afterwards).
        objective: The CG-batch closure.
        samples_spent: Returns the running count of sample gradients, read before and after.
        iterations: CG iterations of the trial.
        cg_kwargs: Further ``ConjugateGradient`` arguments; ``max_iter`` is overridden.
    """
    params = list(params)
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    start = samples_spent()

    options = {**(cg_kwargs or {}), "max_iter": iterations}
    options.pop("max_eval", None)
    optimizer = ConjugateGradient([{"params": params}], **options)
    # Every DataLoader iteration draws a seed from the global generator, and dropout draws
    # more, so without the fork the trial would change the next epoch's shuffle.
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        loss_before = float(optimizer.step(objective))
    stats = optimizer.last_stats
    loss_after = float(stats.loss) if stats is not None else loss_before
    spent = samples_spent() - start

    with torch.no_grad():
        torch._foreach_copy_(params, saved_params)
        for buffer, saved in zip(buffers, saved_buffers):
            buffer.copy_(saved)
    for param, grad in zip(params, saved_grads):
        param.grad = grad

    return TrialResult(loss_before, loss_after, spent, log_loss_rate(loss_before, loss_after, spent))

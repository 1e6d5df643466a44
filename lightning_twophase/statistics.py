"""On-device accumulation of the loss and gradient-norm statistics of one check interval.

Every optimizer step adds to device tensors only; nothing is read to the host until
:meth:`IntervalAccumulator.compute`, which runs once per check interval. Loss and norm means
are ``torchmetrics`` aggregators, so ``compute`` reduces them over all DDP ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from lightning_twophase.detection import IntervalStatistics

__all__ = ["IntervalAccumulator", "total_grad_norm"]


def total_grad_norm(grads: Sequence[Tensor]) -> Tensor:
    r"""Return :math:`\lVert g \rVert_2` over all tensors in ``grads`` as a device scalar.

    Uses one multi-tensor norm kernel and a stack, with no host synchronisation.
    """
    norms = torch._foreach_norm(list(grads))
    return torch.linalg.vector_norm(torch.stack(norms))


class IntervalAccumulator:
    """Accumulates loss, per-batch gradient norm and the summed gradient of one interval.

    Memory: one buffer the size of the parameters (the summed gradient), plus two scalars
    per aggregator. With ``track_curvature`` three more: the summed parameters and the
    previous interval's mean gradient and mean parameters.

    Args:
        device: Device of the aggregators; use the strategy's root device.
        track_curvature: Also measure the secant curvature between consecutive intervals,
            :math:`(\\bar g_k - \\bar g_{k-1})^\\top \\Delta\\bar\\theta / \\lVert \\Delta\\bar\\theta \\rVert^2`.
    """

    def __init__(self, device: torch.device | str = "cpu", track_curvature: bool = False) -> None:
        self.loss = MeanMetric(nan_strategy="disable").to(device)
        self.grad_norm = MeanMetric(nan_strategy="disable").to(device)
        self.track_curvature = track_curvature
        self._grad_sum: list[Tensor] | None = None
        self._param_sum: list[Tensor] | None = None
        self._previous: tuple[list[Tensor], list[Tensor]] | None = None
        self._indices: list[int] | None = None
        self.batches = 0

    def update_gradients(self, params: Iterable[Tensor]) -> None:
        """Add the current ``.grad`` of ``params`` to the interval (call once per optimizer step)."""
        params = list(params)
        indices = [i for i, p in enumerate(params) if p.grad is not None]
        if not indices:
            return
        grads = [params[i].grad.detach() for i in indices]

        self.grad_norm.update(total_grad_norm(grads))

        missing_param_sum = self.track_curvature and self._param_sum is None
        if self._grad_sum is None or self._indices != indices or missing_param_sum:
            self._start_grad_sum(indices, grads, params)
        else:
            torch._foreach_add_(self._grad_sum, grads)
            if self.track_curvature:
                torch._foreach_add_(self._param_sum, [params[i].detach() for i in indices])
        self.batches += 1

    def _start_grad_sum(self, indices: list[int], grads: list[Tensor], params: list[Tensor]) -> None:
        # A changed set of parameters with gradients restarts the sum, so that every buffer
        # covers the same steps; the step count restarts with it.
        self.batches = 0
        self._indices = indices
        self._grad_sum = [g.clone() for g in grads]
        self._previous = None
        if self.track_curvature:
            self._param_sum = [params[i].detach().clone() for i in indices]

    def update_loss(self, loss: Tensor) -> None:
        """Add one batch's training loss (a device scalar) to the interval."""
        self.loss.update(loss.detach().float())

    @property
    def empty(self) -> bool:
        """Whether no optimizer step has been recorded since the last reset."""
        return self.batches == 0

    def compute(self, epoch: int, step: int) -> IntervalStatistics:
        """Reduce the interval over ranks and read it to the host (one synchronisation)."""
        loss = self.loss.compute()
        batch_norm = self.grad_norm.compute()
        mean_norm = total_grad_norm(self._grad_sum) / max(self.batches, 1)
        values = torch.stack([loss.float(), batch_norm.float(), mean_norm.float().to(loss.device)]).tolist()
        return IntervalStatistics(
            epoch=epoch,
            step=step,
            loss=values[0],
            grad_norm_batch_mean=values[1],
            grad_norm_of_mean=values[2],
            batches=self.batches,
            curvature=self._secant_curvature() if self.track_curvature else None,
        )

    def _secant_curvature(self) -> float | None:
        """Return the secant curvature against the previous interval and remember this one."""
        if self._grad_sum is None or self._param_sum is None or self.batches == 0:
            return None
        mean_grad = torch._foreach_div(self._grad_sum, self.batches)
        mean_param = torch._foreach_div(self._param_sum, self.batches)
        previous, self._previous = self._previous, (mean_grad, mean_param)
        if previous is None:
            return None

        grad_change = torch._foreach_sub(mean_grad, previous[0])
        param_change = torch._foreach_sub(mean_param, previous[1])
        numerator = torch.stack([(a * b).sum() for a, b in zip(grad_change, param_change)]).sum()
        denominator = torch.stack([(b * b).sum() for b in param_change]).sum()
        values = torch.stack([numerator, denominator]).tolist()
        return values[0] / values[1] if values[1] > 0.0 else None

    def reset(self) -> None:
        """Start a new interval; the summed-gradient buffers are kept and zeroed."""
        self.loss.reset()
        self.grad_norm.reset()
        if self._grad_sum is not None:
            torch._foreach_zero_(self._grad_sum)
        if self._param_sum is not None:
            torch._foreach_zero_(self._param_sum)
        self.batches = 0

    def release(self) -> None:
        """Free the summed-gradient buffers (after the swap they are not needed)."""
        self.reset()
        self._grad_sum = None
        self._param_sum = None
        self._previous = None
        self._indices = None

    def state_dict(self) -> dict[str, Any]:
        """Return the partial interval and the buffers, so that a checkpoint resumes exactly.

        The summed-gradient buffers are saved even between intervals (zeroed), because a
        restored accumulator without them would restart its sums and, with
        ``track_curvature``, forget the previous interval's means.
        """
        state: dict[str, Any] = {"batches": self.batches}
        if self._grad_sum is None:
            return state

        state["indices"] = list(self._indices or [])
        state["grad_sum"] = [t.clone() for t in self._grad_sum]
        if self.batches > 0:
            state["loss_sums"] = (self.loss.mean_value.clone(), self.loss.weight.clone())
            state["norm_sums"] = (self.grad_norm.mean_value.clone(), self.grad_norm.weight.clone())
        if self._param_sum is not None:
            state["param_sum"] = [t.clone() for t in self._param_sum]
        if self._previous is not None:
            state["previous"] = tuple([t.clone() for t in part] for part in self._previous)
        return state

    def load_state_dict(self, state: dict[str, Any], params: Sequence[Tensor]) -> None:
        """Restore a partial interval written by :meth:`state_dict` onto ``params``' devices.

        ``params`` must be the same ordered parameter list later passed to
        :meth:`update_gradients`.
        """
        self.release()
        if "grad_sum" not in state:
            return

        params = list(params)
        self._indices = list(state["indices"])
        devices = [params[i].device for i in self._indices]
        self._grad_sum = [t.to(device) for t, device in zip(state["grad_sum"], devices)]
        if "param_sum" in state:
            self._param_sum = [t.to(device) for t, device in zip(state["param_sum"], devices)]
        if "previous" in state:
            grads, values = state["previous"]
            self._previous = ([t.to(d) for t, d in zip(grads, devices)], [t.to(d) for t, d in zip(values, devices)])
        self.batches = state["batches"]
        if self.batches == 0:
            return

        for metric, (weighted_sum, weight) in ((self.loss, state["loss_sums"]), (self.grad_norm, state["norm_sums"])):
            # With nan_strategy="disable", MeanMetric.update replaces any weight by 1 (torchmetrics 1.9),
            # so a weighted update cannot restore the sums. One update marks the metric as updated,
            # then the sums are copied into its states.
            metric.update(torch.zeros((), device=metric.mean_value.device))
            metric.mean_value.copy_(weighted_sum)
            metric.weight.copy_(weight)

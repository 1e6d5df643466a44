r"""Dynamic CG batch size: start below the full training set and grow when noise dominates.

Byrd, Chin, Nocedal and Wu, "Sample size selection in optimization methods for machine
learning", Math. Program. 134:127-155 (2012), accept a sample :math:`S` while its gradient is
a descent direction for the full objective with high probability, which they test through

.. math::

    \frac{\lVert \operatorname{Var}_{i \in S}(\nabla \ell_i) \rVert_1}{|S|}
    \le \theta^2 \, \lVert \nabla F_S \rVert_2^2 ,

with the per-sample gradient variance taken coordinate-wise. When the test fails the sample
grows to :math:`|S| = \lVert \operatorname{Var} \rVert_1 / (\theta^2 \lVert \nabla F_S \rVert^2)`.
Here the variance is estimated from the :math:`J` micro-batch gradients :math:`m_j` of the
CG batch, each a mean over :math:`b_j` samples, around the CG-batch gradient :math:`\bar m`:
:math:`\operatorname{Var}(\nabla \ell_i) \approx \sum_j b_j (m_j - \bar m)^2 / (J - 1)`,
which is unbiased for i.i.d. samples whatever the :math:`b_j`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DynamicBatchPolicy", "VarianceEstimate", "estimate_gradient_variance"]


@dataclass(frozen=True)
class VarianceEstimate:
    """Micro-batch statistics of the CG-batch gradient.

    Attributes:
        variance_l1: :math:`\\lVert \\operatorname{Var}(\\nabla \\ell_i) \\rVert_1`, per-sample variance
            summed over coordinates.
        grad_norm_sq: :math:`\\lVert \\nabla F_S \\rVert_2^2`.
        batch_size: :math:`|S|`.
    """

    variance_l1: float
    grad_norm_sq: float
    batch_size: int


class DynamicBatchPolicy:
    """Grows the CG batch by the variance test of Byrd, Chin, Nocedal and Wu (2012).

    Args:
        initial_size: Samples in the first CG batch.
        theta: :math:`\\theta` of the test, in (0, 1); smaller values grow the batch sooner.
        min_growth: Smallest growth factor applied when the test fails.
        test_every: CG steps between two tests (each test costs one pass over the CG batch).

    Raises:
        ValueError: On invalid arguments.
    """

    def __init__(self, initial_size: int, theta: float = 0.5, min_growth: float = 1.5, test_every: int = 5) -> None:
        if isinstance(initial_size, bool) or not isinstance(initial_size, int) or initial_size < 2:
            raise ValueError(f"Invalid initial_size: {initial_size!r}. Use an int >= 2 samples.")
        if not 0.0 < theta < 1.0:
            raise ValueError(f"Invalid theta: {theta!r}. Use a value strictly between 0 and 1, such as 0.5.")
        if not min_growth > 1.0:
            raise ValueError(f"Invalid min_growth: {min_growth!r}. Use a factor above 1, such as 1.5.")
        if isinstance(test_every, bool) or not isinstance(test_every, int) or test_every < 1:
            raise ValueError(f"Invalid test_every: {test_every!r}. Use an int >= 1 CG steps.")
        self.initial_size = initial_size
        self.theta = theta
        self.min_growth = min_growth
        self.test_every = test_every

    def passes(self, estimate: VarianceEstimate) -> bool:
        """Return whether the current batch passes the variance test."""
        return estimate.variance_l1 / estimate.batch_size <= self.theta**2 * estimate.grad_norm_sq

    def next_size(self, estimate: VarianceEstimate, dataset_size: int) -> int:
        """Return the batch size after a test, capped at ``dataset_size``."""
        if self.passes(estimate):
            return estimate.batch_size
        required = estimate.variance_l1 / max(self.theta**2 * estimate.grad_norm_sq, 1e-300)
        grown = max(required, self.min_growth * estimate.batch_size)
        return int(min(dataset_size, math.ceil(grown)))

    def state_dict(self) -> dict[str, Any]:
        return {}


def estimate_gradient_variance(
    micro_batches: Sequence[Any],
    gradient_of: Callable[[Any], tuple[list[Tensor], int]],
    world_size: int = 1,
) -> VarianceEstimate:
    """Estimate the per-sample gradient variance from one pass over ``micro_batches``.

    Args:
        micro_batches: The CG batch's micro-batches.
        gradient_of: Returns the mean gradient of one micro-batch (a list of tensors, averaged
            over ranks under DDP) and its local sample count.
        world_size: Ranks whose micro-batch gradients DDP averaged; each averaged gradient is
            a mean over ``world_size`` times more samples.

    Uses two parameter-sized buffers (sum and sum of squares).
    """
    total: list[Tensor] | None = None
    squares: list[Tensor] | None = None
    count, samples, sizes = 0, 0, []

    for batch in micro_batches:
        grads, size = gradient_of(batch)
        if total is None:
            total = [g.detach() * size for g in grads]
            squares = [g.detach() * g.detach() * size for g in grads]
        else:
            torch._foreach_add_(total, grads, alpha=size)
            torch._foreach_addcmul_(squares, grads, grads, value=size)
        count += 1
        samples += size
        sizes.append(size)

    if total is None or count < 2:
        raise ValueError(
            f"Invalid CG batch for the variance test: {count} micro-batch(es). Use a CG batch of at least two"
            " micro-batches (initial_size >= 2 * micro-batch size)."
        )
    # Size-weighted: with m the CG-batch gradient, sum_j b_j (m_j - m)^2 = sum_j b_j m_j^2 - samples * m^2
    # has expectation (count - 1) Var(grad l_i) per coordinate, also when the last micro-batch is short.
    mean = torch._foreach_div(total, samples)
    spread = torch._foreach_sub(squares, torch._foreach_mul(torch._foreach_mul(mean, mean), samples))
    variance_sum = torch.stack([s.sum() for s in spread]).sum() / (count - 1)
    grad_norm_sq = torch.stack([(m * m).sum() for m in mean]).sum()

    return VarianceEstimate(
        variance_l1=float(variance_sum.clamp_min(0.0)) * world_size,
        grad_norm_sq=float(grad_norm_sq),
        batch_size=samples * world_size,
    )

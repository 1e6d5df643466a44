r"""The CG-phase objective: the mean loss over a fixed, large batch, accumulated over micro-batches.

A line search compares losses at several points, so the CG phase needs one deterministic
function. With :math:`B` the fixed CG batch, split into micro-batches :math:`B_1, \dots, B_m`
of the user's batch size, and :math:`\ell_i` the mean loss that ``training_step`` returns
on :math:`B_i`, the objective is

.. math::

    F(\theta) = \sum_{i=1}^{m} \frac{|B_i|}{|B|} \, \ell_i(\theta),

and its gradient is accumulated in ``.grad`` by one backward pass per micro-batch, so peak
memory is that of one micro-batch. Under DDP each rank evaluates its shard of :math:`B`,
DDP averages the gradients, and the loss is averaged over ranks inside the closure, so
every rank gets the same value and takes the same line-search branch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset
from torch.utils.data.distributed import DistributedSampler

from lightning_twophase.batch_policy import VarianceEstimate, estimate_gradient_variance

__all__ = ["FixedBatchObjective", "MicroBatchSource", "build_micro_batch_source", "choose_cg_indices"]


def choose_cg_indices(dataset_size: int, cg_batch_size: int | None, seed: int) -> list[int] | None:
    """Return the dataset indices of the CG batch, or ``None`` for the whole training set.

    A subset is drawn without replacement from a generator seeded with ``seed`` and sorted,
    so every rank and every resumed run picks the same samples.
    """
    if cg_batch_size is None or cg_batch_size >= dataset_size:
        return None
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(dataset_size, generator=generator)[:cg_batch_size]
    return sorted(chosen.tolist())


class MicroBatchSource:
    """A re-iterable sequence of micro-batches with their share of the local CG batch.

    Either wraps a ``DataLoader`` in a fixed order (map-style datasets) or a list of
    batches cached on the host (iterable datasets, where only the first ``cg_batch_size``
    samples can be reached).

    Args:
        loader: Loader over the local shard in a fixed order, or ``None``.
        cached: Cached micro-batches, or ``None``.
        sizes: Samples in each micro-batch when known in advance (cached path).
        total: Samples in the local shard of the CG batch.
    """

    def __init__(
        self,
        loader: DataLoader | None = None,
        cached: Sequence[Any] | None = None,
        sizes: Sequence[int] | None = None,
        total: int = 0,
    ) -> None:
        self.loader = loader
        self.cached = list(cached) if cached is not None else None
        self.sizes = list(sizes) if sizes is not None else None
        self.total = total

    def __len__(self) -> int:
        if self.cached is not None:
            return len(self.cached)
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if self.cached is not None:
            return iter(self.cached)
        return iter(self.loader)


def build_micro_batch_source(
    loader: DataLoader,
    cg_batch_size: int | None,
    micro_batch_size: int | None,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
) -> MicroBatchSource:
    """Build the fixed CG batch from the user's training ``loader``.

    Map-style datasets get a new loader over the chosen indices with no shuffling, the user's
    ``collate_fn`` and workers, and a non-shuffling ``DistributedSampler`` when
    ``num_replicas > 1``. Iterable datasets are read once and the first ``cg_batch_size``
    samples are cached on the host.

    Raises:
        ValueError: When an iterable dataset has no ``cg_batch_size``, or a micro-batch size
            cannot be found.
    """
    batch_size = micro_batch_size or loader.batch_size
    if batch_size is None:
        raise ValueError(
            "Invalid micro-batch size: the training DataLoader has no `batch_size` (it uses a batch_sampler)."
            " Pass ConvexitySwitch(cg_micro_batch_size=...) to set it."
        )

    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        if cg_batch_size is None:
            raise ValueError(
                "Invalid cg_batch_size: None (the whole training set) with an IterableDataset of unknown length."
                " Pass ConvexitySwitch(cg_batch_size=N) with the number of samples per CG evaluation."
            )
        return _cache_first_samples(loader, cg_batch_size)

    indices = choose_cg_indices(len(dataset), cg_batch_size, seed)
    subset = dataset if indices is None else Subset(dataset, indices)
    sampler = None
    # NOTE: when the CG batch does not divide by the number of ranks, DistributedSampler repeats
    # a few samples, so they weigh slightly more in the objective.
    if num_replicas > 1:
        sampler = DistributedSampler(subset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
    fixed = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.num_workers > 0,
    )
    total = len(sampler) if sampler is not None else len(subset)
    return MicroBatchSource(loader=fixed, total=total)


def _cache_first_samples(loader: DataLoader, cg_batch_size: int) -> MicroBatchSource:
    from lightning.pytorch.utilities.data import extract_batch_size

    cached, sizes, seen = [], [], 0
    for batch in loader:
        size = extract_batch_size(batch)
        cached.append(batch)
        sizes.append(size)
        seen += size
        if seen >= cg_batch_size:
            break
    return MicroBatchSource(cached=cached, sizes=sizes, total=seen)


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(
        f"Invalid training_step output for the CG phase: {type(output).__name__}."
        " Return the loss tensor or a dict with a 'loss' tensor."
    )


class FixedBatchObjective:
    """Closure for a closure-based optimizer: :math:`F(\\theta)` and its gradient on the CG batch.

    The caller supplies the plumbing as plain callables, so this class stays free of
    Lightning internals and can be tested with a bare ``nn.Module``.

    Args:
        source: The fixed micro-batches.
        prepare_batch: Moves a micro-batch to the device and converts its dtype.
        training_step: Computes the training-step output of a prepared micro-batch and index.
        backward: Back-propagates a scalar loss into ``.grad``.
        zero_grad: Clears the gradients before an evaluation.
        reduce_mean: Averages a scalar over ranks (identity in one process).
        no_sync: Context that defers DDP's gradient all-reduce (entered for all but the last
            micro-batch), or ``None``.
        count_samples: Receives the number of local samples of every evaluation.
        params: Returns the optimised parameters. When given, the objective caches its last
            loss and gradient (one parameter-sized copy) and returns them without evaluating
            when called again at unchanged parameters, which it detects from the parameters'
            in-place version counters and storage addresses. This removes the evaluation that
            a closure-based optimizer spends at the start of every ``step`` on the point where
            its previous step ended.
    """

    def __init__(
        self,
        source: MicroBatchSource,
        prepare_batch: Callable[[Any], Any],
        training_step: Callable[[Any, int], Any],
        backward: Callable[[Tensor], None],
        zero_grad: Callable[[], None],
        reduce_mean: Callable[[Tensor], Tensor] = lambda value: value,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        count_samples: Callable[[int], None] | None = None,
        params: Callable[[], list[Tensor]] | None = None,
    ) -> None:
        self.source = source
        self.prepare_batch = prepare_batch
        self.training_step = training_step
        self.backward = backward
        self.zero_grad = zero_grad
        self.reduce_mean = reduce_mean
        self.no_sync = no_sync
        self.count_samples = count_samples
        self.params = params
        self.evaluations = 0
        self.reused = 0
        #: Evaluations still to run without counting their samples; see :meth:`cache_is_current`.
        self.uncounted_evaluations = 0
        self._cache_key: tuple | None = None
        self._cache: tuple[Tensor, list[Tensor | None]] | None = None

    # NOTE: every evaluation runs the user's training_step, so its self.log calls also record
    # values at line-search trial points. The CG-phase loss to read is twophase/loss.
    @torch.enable_grad()
    def __call__(self) -> Tensor:
        """Evaluate :math:`F` at the current parameters, leaving :math:`\\nabla F` in ``.grad``."""
        cached = self._cached_result()
        if cached is not None:
            return cached

        loss = self._evaluate()
        self._store(loss)
        return loss

    def _evaluate(self) -> Tensor:
        self.zero_grad()
        total = self.source.total
        last = len(self.source) - 1
        loss_sum: Tensor | None = None
        samples = 0

        for index, raw in enumerate(self.source):
            batch = self.prepare_batch(raw)
            context = self.no_sync() if (self.no_sync is not None and index < last) else contextlib.nullcontext()
            with context:
                loss = _loss_of(self.training_step(batch, index))
                size = _batch_size(batch, self.source, index)
                weighted = loss * (size / total)
                self.backward(weighted)
            detached = weighted.detach().to(torch.float64 if loss.dtype == torch.float64 else torch.float32)
            loss_sum = detached if loss_sum is None else loss_sum + detached
            samples += size

        self.evaluations += 1
        if self.uncounted_evaluations > 0:
            self.uncounted_evaluations -= 1
        elif self.count_samples is not None:
            self.count_samples(samples)
        return self.reduce_mean(loss_sum)

    def gradient_variance(self, world_size: int = 1) -> VarianceEstimate:
        """Estimate the per-sample gradient variance of the CG batch from its micro-batches.

        Costs one pass over the CG batch, counted like an evaluation, and leaves ``.grad``
        cleared; the evaluation cache is dropped.
        """
        def gradient_of(raw: Any) -> tuple[list[Tensor], int]:
            self.zero_grad()
            batch = self.prepare_batch(raw)
            with torch.enable_grad():
                self.backward(_loss_of(self.training_step(batch, 0)))
            params = self.params() if self.params is not None else []
            grads = [p.grad.detach() for p in params if p.grad is not None]
            return grads, _size_of(batch)

        estimate = estimate_gradient_variance(list(self.source), gradient_of, world_size)
        self.zero_grad()
        self._cache = None
        self._cache_key = None
        if self.count_samples is not None:
            self.count_samples(estimate.batch_size // max(world_size, 1))
        return estimate

    @property
    def last_loss(self) -> float | None:
        """Loss of the most recent evaluation (reduced over ranks), or ``None`` before the first."""
        if self._cache is None:
            return None
        return float(self._cache[0])

    def cache_is_current(self) -> bool:
        """Return whether a call now would reuse the cached evaluation instead of evaluating.

        The cache is not checkpointed. When a checkpoint was written with a current cache, the
        resumed run sets ``uncounted_evaluations`` to 1 and its repeat of that evaluation costs no
        sample gradients. The sample count times the guard's windows and the retries, so it must
        stay that of the uninterrupted run.
        """
        return self.params is not None and self._cache is not None and self._key(self.params()) == self._cache_key

    def _key(self, params: list[Tensor]) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in params)

    def _cached_result(self) -> Tensor | None:
        if self.params is None or self._cache is None:
            return None
        params = self.params()
        if self._key(params) != self._cache_key:
            return None

        loss, grads = self._cache
        for param, grad in zip(params, grads):
            param.grad = None if grad is None else grad.clone()
        self.reused += 1
        return loss.clone()

    def _store(self, loss: Tensor) -> None:
        if self.params is None:
            return
        params = self.params()
        self._cache = (loss.detach().clone(), [None if p.grad is None else p.grad.detach().clone() for p in params])
        self._cache_key = self._key(params)


def _batch_size(batch: Any, source: MicroBatchSource, index: int) -> int:
    if source.sizes is not None:
        return source.sizes[index]
    from lightning.pytorch.utilities.data import extract_batch_size

    return extract_batch_size(batch)



def _size_of(batch: Any) -> int:
    from lightning.pytorch.utilities.data import extract_batch_size

    return extract_batch_size(batch)

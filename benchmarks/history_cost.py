"""Cost of the quasi-Newton preconditioner of ``ConjugateGradient``: time per iteration and state size.

The model is an MLP 784-1024-1024-10 (1.86 M parameters) and the objective the cross-entropy
on one fixed batch of random data. Two optimizers, ``history_size=0`` and ``history_size=M``,
take turns: from the same weights each runs ``--iterations`` iterations with one evaluation per
line search (``c1`` tiny and ``c2`` near 1, so the first trial step is accepted), ``--repeats``
times. Both therefore run the same number of forward and backward passes, and the difference in
time is the direction update: the two-loop recursion over ``M`` step pairs.

Printed: the median time per iteration of each, their ratio, the extra time per iteration in
milliseconds, and the bytes of optimizer state per parameter byte.

Usage::

    python benchmarks/history_cost.py            # batch 1024, 10 iterations, 7 repeats
    python benchmarks/history_cost.py --quick    # batch 64, 3 iterations, 2 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_twophase import ConjugateGradient


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Return the bytes of all tensors in the optimizer state."""
    total = 0
    for state in optimizer.state.values():
        total += sum(value.numel() * value.element_size() for value in state.values() if isinstance(value, torch.Tensor))
    return total


def time_iterations(history_size: int, batch: tuple[torch.Tensor, torch.Tensor], iterations: int) -> tuple[float, int]:
    """Return the seconds per iteration and the optimizer state in bytes, from fresh weights."""
    model = build_model(seed=0)
    inputs, labels = batch
    # c1 tiny and c2 near 1 accept the first trial step, so each iteration is one evaluation.
    optimizer = ConjugateGradient(
        model.parameters(), max_iter=iterations, history_size=history_size, c1=1e-12, c2=0.999999,
        tolerance_change=0.0, tolerance_grad=0.0, lr=0.01,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    optimizer.step(closure)  # warm-up: the first iteration fills the first pair
    begin = time.perf_counter()
    optimizer.step(closure)
    elapsed = time.perf_counter() - begin
    evaluations = optimizer.last_stats.evaluations
    return elapsed / max(evaluations - 1, 1), state_bytes(optimizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny batch, few iterations (smoke run)")
    parser.add_argument("--history-size", type=int, default=10, help="step pairs of the preconditioned run (default 10)")
    parser.add_argument("--batch", type=int, default=1024, help="samples in the fixed batch (default 1024)")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per timed step call (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="alternating repetitions (default 7)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.iterations, args.repeats = 64, 3, 2

    torch.manual_seed(1)
    batch = (torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,)))
    parameter_bytes = sum(p.numel() * p.element_size() for p in build_model(seed=0).parameters())

    times: dict[int, list[float]] = {0: [], args.history_size: []}
    sizes: dict[int, int] = {}
    for _ in range(args.repeats):
        for size in times:
            seconds, sizes[size] = time_iterations(size, batch, args.iterations)
            times[size].append(seconds)

    plain, with_history = statistics.median(times[0]), statistics.median(times[args.history_size])
    print(f"MLP 784-1024-1024-10, batch {args.batch}, {torch.get_num_threads()} torch thread(s)")
    print(f"history_size=0:  {plain * 1e3:8.2f} ms per iteration, state {sizes[0] / parameter_bytes:.1f} x parameters")
    print(
        f"history_size={args.history_size}: {with_history * 1e3:8.2f} ms per iteration, "
        f"state {sizes[args.history_size] / parameter_bytes:.1f} x parameters"
    )
    print(f"time ratio: {with_history / plain:.3f}; extra per iteration: {(with_history - plain) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

"""Cost of ``ConvexitySwitch`` in the Adam phase: per-step wall time with and without the callback.

The model is an MLP 784-1024-1024-10 (1.86 M parameters) on random data. Two trainers, one
with the callback and one without, train alternately for ``--steps`` steps each, ``--repeats``
times, so that both see the same machine load. The callback's warm-up (``min_epochs``) is
longer than the run, so it stays in the Adam phase: it reads the gradient norm and adds the
gradient to its interval sum on every step, which is the per-step work being measured.

The printed ratios are medians over repetitions of (time per step with the callback) /
(time per step without it), for wall time and for the main thread's CPU time.

Usage::

    python benchmarks/overhead.py            # 15 repetitions of 40 steps each
    python benchmarks/overhead.py --quick    # 3 repetitions of 5 steps
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_twophase import ConvexitySwitch


class WideMLP(L.LightningModule):
    """An MLP 784-1024-1024-10 with ReLU, trained by Adam (learning rate 1e-3)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        return F.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    """Records the wall time and the CPU time of the main thread for every training step, in seconds.

    The CPU time (``time.thread_time``) excludes the time the process waits for a core, so on a
    shared machine it is the steadier of the two.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._begin = (0.0, 0.0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._begin = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.wall.append(time.perf_counter() - self._begin[0])
        self.cpu.append(time.thread_time() - self._begin[1])


def _trainer(steps: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def time_block(with_switch: bool, steps: int, loader: DataLoader) -> tuple[float, float]:
    """Train a fresh model for ``steps`` steps and return the median wall and CPU step times in seconds.

    The first step is dropped, because it includes one-off allocations (Adam state and, with the
    callback, the gradient-sum buffers).
    """
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if with_switch:
        switch = ConvexitySwitch(min_epochs=10**6)
        callbacks = [switch, timer]
    _trainer(steps + 1, callbacks).fit(WideMLP(), loader)
    if with_switch and switch.switched:
        raise RuntimeError("ConvexitySwitch left the Adam phase during the overhead measurement.")
    return statistics.median(timer.wall[1:]), statistics.median(timer.cpu[1:])


def measure(repeats: int, steps: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Return the per-repetition wall-time and CPU-time ratios (with callback) / (without)."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4096, 784, generator=generator), torch.randint(0, 10, (4096,), generator=generator))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)

    wall_ratios, cpu_ratios = [], []
    for repeat in range(repeats):
        # Alternate which variant runs first, so a drift in machine load affects both equally.
        order = (True, False) if repeat % 2 == 0 else (False, True)
        times = {variant: time_block(variant, steps, loader) for variant in order}
        wall_ratios.append(times[True][0] / times[False][0])
        cpu_ratios.append(times[True][1] / times[False][1])
    return wall_ratios, cpu_ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 5 steps (smoke run)")
    parser.add_argument("--repeats", type=int, default=15, help="repetitions of the with/without pair (default 15)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per block (default 40)")
    parser.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 5

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    parameters = sum(p.numel() for p in WideMLP().parameters())
    wall_ratios, cpu_ratios = measure(args.repeats, args.steps, args.batch_size)
    print(f"model parameters: {parameters}")
    print(f"wall-time ratios per repetition: {', '.join(f'{r:.3f}' for r in wall_ratios)}")
    print(f"CPU-time ratios per repetition: {', '.join(f'{r:.3f}' for r in cpu_ratios)}")
    print(f"median CPU step-time ratio with/without ConvexitySwitch: {statistics.median(cpu_ratios):.4f}")
    print(f"median step-time ratio with/without ConvexitySwitch: {statistics.median(wall_ratios):.4f}")


if __name__ == "__main__":
    main()

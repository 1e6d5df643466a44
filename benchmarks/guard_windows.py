"""Per-window rates of the swap-back guard: CG's log-loss rate against Adam's trend rate.

Trains one model of the reproduction benchmark with ``ConvexitySwitch`` (default arguments
unless overridden) and prints one line per closed guard window, read from the scalars the
callback logs. A line gives the step and the sample gradients spent, in epochs of the training
set. Then come CG's loss, CG's rate and Adam's trend rate (log-loss decrease per epoch of
sample gradients), the loss of Adam's trend at the same sample count, and the lost-window
count. Swaps and swaps back follow.

Usage::

    python benchmarks/guard_windows.py --dataset mnist1d --model vgg --epochs 160
    python benchmarks/guard_windows.py --dataset mnist1d --model vit --epochs 50 --margin 0.25
    python benchmarks/guard_windows.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from lightning_twophase import ConvexitySwitch  # noqa: E402
from lightning_twophase.tensorboard import TAG  # noqa: E402
from reproduce import _quiet  # noqa: E402
from tasks import DATASETS, MODELS, build_model, load_task  # noqa: E402

GUARD_TAGS = (TAG.GUARD_CG_RATE, TAG.GUARD_ADAM_RATE, TAG.GUARD_ADAM_LOSS, TAG.GUARD_LOST_WINDOWS)


class GuardLog(Logger):
    """In-memory logger that keeps the guard's scalars and the sample count, keyed by step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = defaultdict(dict)

    @property
    def name(self) -> str:
        return "guard"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        guard_metrics = {key: value for key, value in metrics.items() if key in (*GUARD_TAGS, TAG.SAMPLES, TAG.LOSS)}
        self.rows[step or 0].update(guard_metrics)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    parser.add_argument("--model", default="vgg", choices=MODELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=160, help="Lightning epochs to train (default 160)")
    parser.add_argument("--detector", default="log_slope", help="ConvexitySwitch detector name (default log_slope)")
    parser.add_argument("--margin", type=float, default=0.25, help="switch_back_margin (default 0.25)")
    parser.add_argument("--quick", action="store_true", help="smoke run: digits MLP, 12 epochs, peak_ratio")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.model, args.epochs, args.detector = "digits", "mlp", 12, "peak_ratio"

    _quiet()
    task = load_task(args.dataset)
    size = len(task.train)
    L.seed_everything(args.seed, verbose=False)
    model = build_model(args.model, task, args.seed)
    switch = ConvexitySwitch(detector=args.detector, switch_back_margin=args.margin)
    log = GuardLog()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=log, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[switch],
    )
    trainer.fit(model)

    print("step  sample-epochs  CG loss    CG rate/epoch  Adam rate/epoch  Adam trend loss  lost")
    for step, row in sorted(log.rows.items()):
        if TAG.GUARD_CG_RATE not in row:
            continue
        print(
            f"{step:5d}  {row.get(TAG.SAMPLES, float('nan')) / size:13.1f}  {row.get(TAG.LOSS, float('nan')):.3e}"
            f"  {row[TAG.GUARD_CG_RATE] * size:13.4f}  {row[TAG.GUARD_ADAM_RATE] * size:15.4f}"
            f"  {row[TAG.GUARD_ADAM_LOSS]:15.3e}  {row[TAG.GUARD_LOST_WINDOWS]:4.0f}"
        )
    for swap in switch.swaps:
        print(f"swap at epoch {swap['epoch']} (step {swap['step']}): {swap['reason']}")
    for back in switch.switch_backs:
        print(f"swap back at epoch {back['epoch']} (step {back['step']}): {back['reason']}")


if __name__ == "__main__":
    main()

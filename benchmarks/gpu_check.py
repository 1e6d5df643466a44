"""Check on a CUDA device that the Adam phase of ConvexitySwitch adds no host-device sync per step.

Trains the CNN of ``examples/digits.py`` twice (precision ``32-true`` and ``bf16-mixed``).
During every Adam-phase training step, from ``on_train_batch_start`` until ConvexitySwitch
has run its ``on_train_batch_end``, ``torch.cuda.set_sync_debug_mode("error")`` is on, so any
host-device synchronisation inside that window (``.item()``, ``float(tensor)``,
``.tolist()``, a blocking copy) raises. The window covers the user's ``training_step``, the
backward pass, the callback's gradient-norm accumulation, the Adam step and the callback's
loss accumulation. It leaves out the once-per-epoch check (which reads the statistics to
the host on purpose), validation, and Lightning's own per-step bookkeeping after
``on_train_batch_end`` (the progress-bar conversion of ``self.log(..., prog_bar=True)``
values calls ``.item()`` every step). The guard stays off after the swap, because the CG
line search reads losses to the host by design.

Usage::

    python benchmarks/gpu_check.py                 # both precisions, 30 epochs each
    python benchmarks/gpu_check.py --max-epochs 20

Exits with status 1 and a message when CUDA is unavailable or a sync is found.

NOTE: this script has not been run on a GPU yet. The runtime of well under five minutes on
one recent GPU is an estimate from the CPU timing (8 epochs of both runs in 80 s on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from digits import DigitsCNN, DigitsData  # noqa: E402

from lightning_twophase import ConvexitySwitch  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")


class AdamPhaseSyncGuard(Callback):
    """Turn CUDA sync debugging to ``"error"`` for each training step until the swap.

    Place it after the ``ConvexitySwitch`` in the callback list, so that its
    ``on_train_batch_end`` runs after the switch's and the window covers both of the switch's
    per-step hooks.

    Args:
        switch: The callback whose phase ends the guarded steps.
    """

    def __init__(self, switch: ConvexitySwitch) -> None:
        self.switch = switch
        self.guarded_steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self.switch.switched:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if torch.cuda.get_sync_debug_mode() != 0:
            self.guarded_steps += 1
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        torch.cuda.set_sync_debug_mode("default")


@dataclass(frozen=True)
class Result:
    precision: str
    swap_epoch: int | None
    final_loss: float
    guarded_steps: int
    seconds: float


def run(precision: str, max_epochs: int, seed: int) -> Result:
    """Train the digits CNN on CUDA under ``precision`` with the Adam phase guarded."""
    L.seed_everything(seed, verbose=False)
    switch = ConvexitySwitch(min_epochs=3, cg_micro_batch_size=2048)
    guard = AdamPhaseSyncGuard(switch)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision=precision,
        max_epochs=max_epochs,
        callbacks=[switch, guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )

    start = time.perf_counter()
    trainer.fit(DigitsCNN(), datamodule=DigitsData(seed=seed))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    final_loss = switch.history[-1].loss if switch.history else float("nan")
    return Result(precision, switch.switch_epoch, final_loss, guard.guarded_steps, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=30, help="epochs per run, both phases (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the initial weights")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("CUDA is not available: this check needs an NVIDIA GPU and a CUDA build of PyTorch.", file=sys.stderr)
        return 1

    results = []
    for precision in PRECISIONS:
        try:
            results.append(run(precision, args.max_epochs, args.seed))
        except RuntimeError as error:
            if "synchroniz" not in str(error):
                raise
            traceback.print_exc()
            print(f"Host-device sync found in an Adam-phase step under {precision}; see the traceback.", file=sys.stderr)
            return 1

    unguarded = [result.precision for result in results if result.guarded_steps == 0]
    if unguarded:
        print(f"Check failed: no Adam-phase step was guarded under {', '.join(unguarded)}.", file=sys.stderr)
        return 1

    print(f"No host-device sync in the guarded Adam-phase steps on {torch.cuda.get_device_name()}.")
    print(f"{'precision':<12} {'swap epoch':>10} {'final loss':>12} {'guarded steps':>14} {'seconds':>8}")
    for result in results:
        swap = "none" if result.swap_epoch is None else str(result.swap_epoch)
        print(
            f"{result.precision:<12} {swap:>10} {result.final_loss:>12.3e} {result.guarded_steps:>14d}"
            f" {result.seconds:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

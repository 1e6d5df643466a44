"""Standalone two-phase training run for the DDP tests, on CPU with the gloo backend.

``strategy="ddp"`` starts the other ranks by running this script again with the same
arguments, so it must be a script and not a pytest function. Every rank writes
``rank{N}.json`` into the output directory with its swap step, the SHA-256 digest of
every parameter, the indices of its shard of the CG batch and the final CG-batch loss:

    python tests/ddp_worker.py OUTPUT_DIR --devices 2 --max-epochs 6
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TinyClassifier, digits_dataset, make_trainer  # noqa: E402

from lightning_twophase import ConvexitySwitch  # noqa: E402


def parameter_digests(module: torch.nn.Module) -> dict[str, str]:
    """Return the SHA-256 digest of the bytes of every parameter, keyed by name."""
    digests = {}
    for name, param in module.named_parameters():
        data = param.detach().cpu().contiguous().numpy().tobytes()
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def cg_shard_indices(switch: ConvexitySwitch) -> list[int]:
    """Return the dataset indices of this rank's shard of the CG batch (whole training set)."""
    # The objective is private, but the shard check needs the sampler that it iterates.
    loader = switch._objective.source.loader
    return [int(index) for index in loader.sampler]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="directory for the per-rank JSON files")
    parser.add_argument("--devices", type=int, default=2, help="number of CPU processes (default 2)")
    parser.add_argument("--max-epochs", type=int, default=6, help="epochs in total, both phases (default 6)")
    parser.add_argument("--samples", type=int, default=512, help="digits samples in the training set")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per process (default 32)")
    parser.add_argument(
        "--losing-guard", action="store_true", help="swap back after every CG window, then retry (margin 1e6)"
    )
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    if args.losing_guard:
        # On the default blobs data CG stays above Adam's trend, so the guard's windows are lost.
        model = TinyClassifier(batch_size=args.batch_size)
    else:
        model = TinyClassifier(
            features=64, classes=10, hidden=16, lr=0.01, dataset=digits_dataset(args.samples),
            batch_size=args.batch_size,
        )
    # By default the swap back to Adam is off, so that the run stays in the CG phase whose DDP
    # behaviour is tested. --losing-guard makes every CG window a lost one instead.
    # The guard needs three Adam checks to fit Adam's trend, hence the later earliest swap.
    losing = {"switch_back_patience": 1, "switch_back_margin": 1e6, "min_epochs": 3}
    guard = losing if args.losing_guard else {"switch_back_patience": None, "min_epochs": 2}
    switch = ConvexitySwitch(detector="peak_ratio", cg_micro_batch_size=128, cg_kwargs={"max_iter": 3}, **guard)
    strategy = "ddp" if args.devices > 1 else "auto"
    trainer = make_trainer(max_epochs=args.max_epochs, devices=args.devices, strategy=strategy, callbacks=[switch])
    trainer.fit(model)

    cg_points = [point for point in switch.history if point.phase == 1]
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "switched": switch.switched,
        "switch_step": switch.switch_step,
        "switch_epoch": switch.switch_epoch,
        "global_step": trainer.global_step,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "cg_steps": trainer.global_step - (switch.switch_step or trainer.global_step),
        "digests": parameter_digests(model),
        "cg_shard": cg_shard_indices(switch) if switch.switched else [],
        "final_loss": cg_points[-1].loss if cg_points else None,
        "losses": [point.loss for point in switch.history],
        "swap_steps": [swap["step"] for swap in switch.swaps],
        "switch_back_steps": [back["step"] for back in switch.switch_backs],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))

    # Gloo's worker threads can outlive the interpreter and abort the process at exit
    # ("terminate called without an active exception") after the work is done. Destroying the
    # process group alone still aborted about one run in six, so the worker also skips the
    # interpreter's teardown once its results are written.
    if torch.distributed.is_initialized():
        # The barrier makes every rank's file exist before rank zero, the launcher, exits.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

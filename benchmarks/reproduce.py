"""Reproduction benchmark: mini-batch Adam against Adam followed by conjugate gradient.

Every method gets the same budget of sample-gradient evaluations (samples passed forward and
backward, line-search evaluations included), expressed in epochs of the training set:

* ``adam``: the user's Adam on mini-batches for the whole budget (the baseline);
* ``adam_cg``: ``ConvexitySwitch(detector="peak_ratio", switch_back_patience=None)``, the rule of Hrycej et al.
  (arXiv:2510.25366; swap when the gradient norm falls below 0.9 times its running maximum), then CG on the whole training set;
* ``adam_lbfgs``: the same detector and CG batch, with ``torch.optim.LBFGS`` (strong Wolfe)
  after the swap;
* ``adam_cg_fixed``: CG after a swap at a fixed epoch (``--fixed-fraction`` of the budget);
* ``adam_cg_iter1``: as ``adam_cg`` with one CG iteration per Lightning step instead of
  ``--cg-max-iter``;
* ``adam_cg_log_slope``, ``adam_cg_curvature``, ``adam_cg_cost_aware``: CG after the swap chosen
  by ``LogSlopeDetector``, ``CurvatureDetector`` or ``CostAwareDetector`` with their defaults,
  without the swap-back guard;
* ``adam_cg_cost_aware_sparse``: ``CostAwareDetector(trial_every=10, trial_iterations=3)``, whose
  CG trials cost less of the budget;
* ``adam_cg_guard``, ``adam_cg_log_slope_guard``, ``adam_cg_curvature_guard``,
  ``adam_cg_cost_aware_guard``: the 0.9-times-peak rule or one of the three detectors with the
  callback's default swap-back guard (``switch_back_patience=2``, ``switch_back_margin=1.0``,
  ``swap_retry_factor=2.0``); ``adam_cg_log_slope_guard`` is ``ConvexitySwitch()`` with its defaults;
* ``adam_lbfgs_log_slope_guard``: the default detector and guard with ``torch.optim.LBFGS``
  (strong Wolfe, ``--cg-max-iter`` iterations per step) as the second phase;
* ``adam_cg_history_guard``: the default detector and guard with CG preconditioned by its last
  ``HISTORY_SIZE`` step pairs (``history_size=10``); ``adam_cg_history_c2_guard`` also sets the
  curvature constant ``c2=0.9``;
* ``adam_cg_log_slope_strict``: as ``adam_cg_log_slope_guard`` with ``switch_back_margin=1.0``,
  so CG must keep Adam's trend rate;
* ``adam_cg_dynamic``: the 0.9-times-peak rule, then CG on a batch that starts at
  ``min(512, N // 4)`` samples and grows by ``DynamicBatchPolicy``'s variance test.

At regular points of the budget the full training-set loss is evaluated without gradients
(not counted in the budget, and not in the wall time). Results go to ``<out>/reproduce.json``,
Markdown tables to ``<out>/reproduce.md`` and plots to ``--images`` (``docs/img`` when ``--out``
is left at its default, else ``<out>``).

Usage::

    python benchmarks/reproduce.py --jobs 2             # full run (25 minutes on 2 shared cores)
    python benchmarks/reproduce.py --quick --out /tmp/q  # smoke run, well under a minute
    python benchmarks/reproduce.py --jobs 2 --methods adam adam_cg adam_cg_log_slope --out /tmp/d
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.utilities.data import extract_batch_size  # noqa: E402

from lightning_twophase import ConvexitySwitch  # noqa: E402
from lightning_twophase.batch_policy import DynamicBatchPolicy  # noqa: E402
from lightning_twophase.detection import FixedEpochDetector  # noqa: E402
from lightning_twophase.detectors import CostAwareDetector, CurvatureDetector, LogSlopeDetector  # noqa: E402
from tasks import DATASETS, MODELS, Task, build_model, load_task  # noqa: E402

DETECTOR_METHODS = (
    "adam_cg_log_slope",
    "adam_cg_log_slope_guard",
    "adam_cg_log_slope_strict",
    "adam_lbfgs_log_slope_guard",
    "adam_cg_history_guard",
    "adam_cg_history_c2_guard",
    "adam_cg_curvature",
    "adam_cg_curvature_guard",
    "adam_cg_cost_aware",
    "adam_cg_cost_aware_sparse",
    "adam_cg_guard",
    "adam_cg_cost_aware_guard",
    "adam_cg_dynamic",
)
METHODS = ("adam", "adam_cg", "adam_lbfgs", "adam_cg_fixed", "adam_cg_iter1", *DETECTOR_METHODS)
DEFAULT_METHODS = ("adam", "adam_cg", "adam_lbfgs", "adam_cg_fixed")
RESULTS = Path(__file__).parent / "results"
DOCS_IMAGES = Path(__file__).parents[1] / "docs" / "img"

#: Step pairs of the quasi-Newton preconditioner in the ``adam_cg_history*`` methods.
HISTORY_SIZE = 10

#: First CG batch of ``adam_cg_dynamic``: this many samples, at most a quarter of the training set.
DYNAMIC_INITIAL_SIZE = 512


@dataclass
class RunSpec:
    """One training run."""

    dataset: str
    model: str
    method: str
    seed: int
    budget_epochs: float
    points: int
    cg_max_iter: int
    fixed_epoch: int
    cg_history_size: int | None = None

    def cg_kwargs(self, max_iter: int | None = None) -> dict[str, Any]:
        """Return the ``cg_kwargs`` of this run; ``history_size`` only when the command line set it."""
        kwargs: dict[str, Any] = {"max_iter": self.cg_max_iter if max_iter is None else max_iter}
        if self.cg_history_size is not None:
            kwargs["history_size"] = self.cg_history_size
        return kwargs


@dataclass
class RunResult:
    """Curves and summary of one run. Each row of ``points`` is ``[samples, wall_s, train_loss]``.

    ``switch_samples`` is the sample-gradient count at the moment of the swap, before any CG step
    (a cost-aware detector's CG trials before the swap included). ``switch_back_epochs`` lists
    the epochs at which the swap-back guard returned to Adam.
    """

    spec: RunSpec
    train_size: int
    budget: int
    points: list[list[float]] = field(default_factory=list)
    val_accuracy: float = float("nan")
    switch_epoch: int | None = None
    switch_samples: int | None = None
    switch_back_epochs: list[int] = field(default_factory=list)
    swap_epochs: list[int] = field(default_factory=list)
    history: list[list[float]] = field(default_factory=list)
    wall_s: float = 0.0


class BudgetMonitor(Callback):
    """Counts sample-gradient evaluations, records the full training loss, stops at the budget.

    With a ``ConvexitySwitch`` the count is its ``sample_gradients``, which includes the
    line-search evaluations on the CG batch. Without one, the monitor adds the batch size of
    every training step. A CG-phase step costs several passes over the CG batch, so the last step may overrun
    the budget. The summary therefore reads losses at or below the budget only.

    Args:
        budget: Sample-gradient evaluations after which training stops.
        interval: Evaluations between two recorded points.
        task: The data, for the full training loss.
        switch: The run's ``ConvexitySwitch``, listed before this callback, or ``None``.
    """

    def __init__(self, budget: int, interval: int, task: Task, switch: ConvexitySwitch | None) -> None:
        self.budget = budget
        self.interval = interval
        self.task = task
        self.switch = switch
        self.samples = 0
        self.next_point = 0
        self.points: list[list[float]] = []
        self._start = 0.0
        self._paused = 0.0

    def _count(self) -> int:
        return self.switch.sample_gradients if self.switch is not None else self.samples

    def _record(self, pl_module: L.LightningModule) -> None:
        begin = time.perf_counter()
        loss, _ = pl_module.evaluate(self.task.train)
        self.points.append([float(self._count()), begin - self._start - self._paused, loss])
        self._paused += time.perf_counter() - begin
        while self.next_point <= self._count():
            self.next_point += self.interval

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._record(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.samples += extract_batch_size(batch)

        count = self._count()
        # A CG step spends several passes over the training set, so each one is recorded and
        # the final in-budget loss is the one after the last CG step that fits the budget.
        in_cg = self.switch is not None and self.switch.switched
        if in_cg or count >= self.next_point or count >= self.budget:
            self._record(pl_module)
        if count >= self.budget:
            trainer.should_stop = True


def _detector_switch(spec: RunSpec, train_size: int) -> ConvexitySwitch:
    cg_kwargs = spec.cg_kwargs()
    detectors = {
        "adam_cg_log_slope": LogSlopeDetector,
        "adam_cg_log_slope_guard": LogSlopeDetector,
        "adam_cg_curvature": CurvatureDetector,
        "adam_cg_curvature_guard": CurvatureDetector,
        "adam_cg_cost_aware": CostAwareDetector,
        "adam_cg_cost_aware_guard": CostAwareDetector,
    }
    if spec.method in detectors:
        # The guarded variants use the callback's defaults: patience 2, margin 1, retry factor 2.
        guard = {} if spec.method.endswith("_guard") else {"switch_back_patience": None}
        return ConvexitySwitch(detector=detectors[spec.method](), cg_kwargs=cg_kwargs, **guard)
    if spec.method == "adam_lbfgs_log_slope_guard":
        max_iter = spec.cg_max_iter

        def lbfgs(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(groups, max_iter=max_iter, line_search_fn="strong_wolfe")

        return ConvexitySwitch(detector=LogSlopeDetector(), optimizer_factory=lbfgs)
    if spec.method in ("adam_cg_history_guard", "adam_cg_history_c2_guard"):
        history = {"history_size": HISTORY_SIZE}
        if spec.method == "adam_cg_history_c2_guard":
            history["c2"] = 0.9
        return ConvexitySwitch(detector=LogSlopeDetector(), cg_kwargs={**cg_kwargs, **history})
    if spec.method == "adam_cg_log_slope_strict":
        return ConvexitySwitch(detector=LogSlopeDetector(), cg_kwargs=cg_kwargs, switch_back_margin=1.0)
    if spec.method == "adam_cg_cost_aware_sparse":
        sparse = CostAwareDetector(trial_every=10, trial_iterations=3)
        return ConvexitySwitch(detector=sparse, cg_kwargs=cg_kwargs, switch_back_patience=None)
    if spec.method == "adam_cg_guard":
        return ConvexitySwitch(detector="peak_ratio", cg_kwargs=cg_kwargs)
    if spec.method == "adam_cg_dynamic":
        policy = DynamicBatchPolicy(initial_size=min(DYNAMIC_INITIAL_SIZE, train_size // 4))
        return ConvexitySwitch(
            detector="peak_ratio", cg_kwargs=cg_kwargs, cg_batch_policy=policy, switch_back_patience=None
        )
    raise ValueError(f"Invalid method: {spec.method!r}. Expected one of {', '.join(METHODS)}.")


def _second_phase(spec: RunSpec, train_size: int) -> ConvexitySwitch | None:
    if spec.method == "adam":
        return None
    if spec.method in DETECTOR_METHODS:
        return _detector_switch(spec, train_size)
    if spec.method == "adam_cg":
        return ConvexitySwitch(detector="peak_ratio", cg_kwargs=spec.cg_kwargs(), switch_back_patience=None)
    if spec.method == "adam_cg_iter1":
        return ConvexitySwitch(detector="peak_ratio", cg_kwargs=spec.cg_kwargs(max_iter=1), switch_back_patience=None)
    if spec.method == "adam_cg_fixed":
        fixed = FixedEpochDetector(epoch=spec.fixed_epoch)
        return ConvexitySwitch(detector=fixed, cg_kwargs=spec.cg_kwargs(), switch_back_patience=None)
    if spec.method == "adam_lbfgs":
        max_iter = spec.cg_max_iter

        def lbfgs(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(groups, max_iter=max_iter, line_search_fn="strong_wolfe")

        return ConvexitySwitch(detector="peak_ratio", optimizer_factory=lbfgs, switch_back_patience=None)
    raise ValueError(f"Invalid method: {spec.method!r}. Expected one of {', '.join(METHODS)}.")


def _quiet() -> None:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_twophase").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")


def run(spec: RunSpec) -> RunResult:
    """Train one model with one method and seed until its budget is spent."""
    _quiet()
    task = load_task(spec.dataset)
    train_size = len(task.train)
    budget = int(round(spec.budget_epochs * train_size))
    L.seed_everything(spec.seed, verbose=False)
    model = build_model(spec.model, task, spec.seed)

    switch = _second_phase(spec, train_size)
    monitor = BudgetMonitor(budget, max(1, budget // spec.points), task, switch)
    callbacks = [switch, monitor] if switch is not None else [monitor]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=int(spec.budget_epochs) + 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )

    begin = time.perf_counter()
    trainer.fit(model)
    wall = time.perf_counter() - begin

    result = RunResult(spec, train_size, budget, monitor.points, wall_s=wall)
    _, result.val_accuracy = model.evaluate(task.val)
    if switch is not None:
        result.swap_epochs = [swap["epoch"] for swap in switch.swaps]
        result.switch_epoch = result.swap_epochs[0] if result.swap_epochs else None
        result.switch_samples = switch.swaps[0]["samples"] if switch.swaps else None
        result.switch_back_epochs = [back["epoch"] for back in switch.switch_backs]
        result.history = [[p.epoch, p.loss, p.grad_norm, p.phase] for p in switch.history]
    return result


def _describe(result: RunResult) -> str:
    spec = result.spec
    last = result.points[-1]
    swap = f", swap epoch {', '.join(map(str, result.swap_epochs))}" if result.swap_epochs else ""
    if result.switch_back_epochs:
        swap += f", swap back at epoch {', '.join(map(str, result.switch_back_epochs))}"
    return (
        f"{spec.dataset:8s} {spec.model:4s} {spec.method:25s} seed {spec.seed}: loss {last[2]:.3e}"
        f" after {last[0] / result.train_size:.1f} epochs, val acc {100 * result.val_accuracy:.1f}%{swap},"
        f" {result.wall_s:.0f} s"
    )


def _run_all(specs: list[RunSpec], jobs: int) -> Iterator[RunResult]:
    if jobs == 1:
        # In-process, which saves starting a worker that imports Lightning again.
        yield from map(run, specs)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run, spec) for spec in specs]
        for future in as_completed(futures):
            yield future.result()


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    """Expand the command-line choices into one spec per run."""
    specs = []
    # Seed-major order: an interrupted run still covers every pair with its first seeds.
    for seed in range(args.seeds):
        for dataset in args.datasets:
            budget = args.budget_epochs[DATASETS.index(dataset)] if len(args.budget_epochs) > 1 else args.budget_epochs[0]
            fixed_epoch = max(1, int(round(args.fixed_fraction * budget)))
            for model in args.models:
                for method in args.methods:
                    specs.append(
                        RunSpec(
                            dataset, model, method, seed, budget, args.points, args.cg_max_iter, fixed_epoch,
                            args.cg_history_size,
                        )
                    )
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for reproduce.json and reproduce.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, one model, tiny budgets")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes, one thread each (default 1)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help=f"methods to run (default, also with --quick: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="folder for the PNG plots (default: docs/img when --out is left at its default, else --out)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument(
        "--budget-epochs",
        type=float,
        nargs="+",
        default=[100.0, 40.0],
        help="budget in epochs of the training set, one value or one per data set (default 100 40)",
    )
    parser.add_argument("--image-prefix", default="reproduce", help="file-name prefix of the plots (default reproduce)")
    parser.add_argument("--points", type=int, default=25, help="recorded loss points per run (default 25)")
    parser.add_argument("--cg-max-iter", type=int, default=2, help="CG (and L-BFGS) iterations per step (default 2)")
    parser.add_argument(
        "--cg-history-size",
        type=int,
        help="history_size of ConjugateGradient (default: the callback's, 10); 0 gives the plain CG of older sections",
    )
    parser.add_argument("--fixed-fraction", type=float, default=0.3, help="fixed swap epoch as a budget fraction")

    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.models, args.seeds = ["digits"], ["mlp"], 1
        args.budget_epochs, args.points = [8.0], 8
    args.methods = args.methods or list(DEFAULT_METHODS)
    if args.images is None:
        args.images = DOCS_IMAGES if args.out.resolve() == RESULTS.resolve() else args.out
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    specs = build_specs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        size = len(load_task(dataset).train)
        epochs = next(s.budget_epochs for s in specs if s.dataset == dataset)
        print(f"budget {dataset}: {epochs:g} epochs = {int(round(epochs * size))} sample gradients ({size} samples)")
    print(f"{len(specs)} runs in {args.jobs} process(es)", flush=True)

    begin = time.perf_counter()
    payload: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "wall_s": 0.0, "runs": []}
    for result in _run_all(specs, args.jobs):
        print(_describe(result), flush=True)
        # Written after every run, so an interrupted benchmark keeps what it finished.
        payload["runs"].append(asdict(result))
        payload["wall_s"] = time.perf_counter() - begin
        (args.out / "reproduce.json").write_text(json.dumps(payload))

    from reproduce_report import write_outputs

    write_outputs(payload, args.out, args.images, args.image_prefix)
    print(f"total wall time {payload['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()

"""Checkpoint and resume of ConvexitySwitch: a resumed run must continue as if uninterrupted.

One uninterrupted run saves a checkpoint at the end of every epoch. Runs resumed from the
checkpoint before the swap, from the one written right after it, and from one deep in the
CG phase must end with the same parameters and the same swap step. Checks every 3 of the 4
steps per epoch, so epoch-end checkpoints hold a partial check interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from helpers import TinyClassifier, digits_dataset, history_without_samples, make_trainer
from lightning_twophase import ConjugateGradient, ConvexitySwitch, Phase
from lightning_twophase.statistics import IntervalAccumulator

EPOCHS = 10
TOLERANCE = 1e-6
SAMPLES = 256

#: Sample gradients that a resume spends on top of the uninterrupted run. The CG objective's
#: cache of its last evaluation is not saved, so a resume in the CG phase evaluates the CG batch
#: once more, but the checkpoint records that the cache was current and that repeat is not counted.
EXTRA_SAMPLES = {"before_swap": 0, "after_swap": 0, "deep_cg": 0}


class ReshuffledClassifier(TinyClassifier):
    """:class:`TinyClassifier` whose shuffle order depends only on the seed and the epoch.

    Lightning calls ``set_epoch`` on the sampler at the start of every epoch, so a resumed
    run draws the same order as the uninterrupted one.
    """

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=1, rank=0, shuffle=True, seed=7)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # Every run of this module must use the same thread count, because a matrix product on
    # two threads sums in another order than on one. One thread is also faster for these sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(root: Path, ckpt_path: Path | None = None, **switch_kwargs: Any) -> tuple[TinyClassifier, ConvexitySwitch]:
    """Train for ``EPOCHS`` epochs, saving every epoch's checkpoint under ``root``."""
    L.seed_everything(0, verbose=False)
    model = ReshuffledClassifier(features=64, classes=10, hidden=16, lr=0.01, dataset=digits_dataset(SAMPLES), batch_size=64)
    switch_kwargs = {"min_epochs": 2, "check_every_n_steps": 3, "cg_kwargs": {"max_iter": 2}, **switch_kwargs}
    switch_kwargs.setdefault("switch_back_patience", None)
    switch = ConvexitySwitch(detector="peak_ratio", cg_micro_batch_size=SAMPLES, **switch_kwargs)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(
        root,
        max_epochs=EPOCHS,
        callbacks=[switch, checkpoints],
        enable_checkpointing=True,
        deterministic=True,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, switch


def _clone_values(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in values.items()}


def max_abs_difference(first: torch.nn.Module, second: torch.nn.Module) -> float:
    differences = [
        (a.detach().double() - b.detach().double()).abs().max().item()
        for a, b in zip(first.parameters(), second.parameters(), strict=True)
    ]
    return max(differences)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyClassifier, ConvexitySwitch]:
    root = tmp_path_factory.mktemp("reference")
    model, switch = fit(root)
    return root, model, switch


def resume_epoch(switch: ConvexitySwitch, case: str) -> int:
    """Return the epoch whose end-of-epoch checkpoint a resume case starts from."""
    assert switch.switch_epoch is not None, "the reference run did not swap"
    epochs = {"before_swap": switch.switch_epoch - 1, "after_swap": switch.switch_epoch, "deep_cg": EPOCHS - 2}
    return epochs[case]


def test_reference_run_swaps_mid_training(reference: tuple) -> None:
    _, _, switch = reference
    assert switch.switched
    assert 1 <= switch.switch_epoch <= EPOCHS - 4, "the swap must leave room for three resume points"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["before_swap", "after_swap", "deep_cg"])
def test_resume_matches_uninterrupted(reference: tuple, tmp_path: Path, case: str) -> None:
    root, reference_model, reference_switch = reference
    epoch = resume_epoch(reference_switch, case)
    checkpoint = root / f"epoch={epoch}.ckpt"

    model, switch = fit(tmp_path, ckpt_path=checkpoint)
    difference = max_abs_difference(model, reference_model)
    print(f"resume {case} from epoch {epoch}: max abs parameter difference {difference:.3e}")

    assert switch.switch_step == reference_switch.switch_step
    assert switch.switch_epoch == reference_switch.switch_epoch
    assert switch.sample_gradients == reference_switch.sample_gradients + EXTRA_SAMPLES[case]
    assert history_without_samples(switch) == history_without_samples(reference_switch)
    assert difference <= TOLERANCE


def test_cg_checkpoint_restores_cg_optimizer_state(reference: tuple, tmp_path: Path) -> None:
    root, _, reference_switch = reference
    checkpoint_path = root / f"epoch={resume_epoch(reference_switch, 'deep_cg')}.ckpt"
    saved = torch.load(checkpoint_path, weights_only=False)["optimizer_states"][0]
    assert "direction" in saved["state"][0], "the checkpoint holds no CG state"

    captured: dict[str, Any] = {}

    class CaptureOptimizer(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            captured.setdefault("optimizer", trainer.optimizers[0])
            state = trainer.optimizers[0].state_dict()["state"]
            captured.setdefault("state", {index: _clone_values(values) for index, values in state.items()})

    L.seed_everything(0, verbose=False)
    model = ReshuffledClassifier(features=64, classes=10, hidden=16, dataset=digits_dataset(SAMPLES), batch_size=64)
    switch = ConvexitySwitch(detector="peak_ratio",
        min_epochs=2,
        check_every_n_steps=3,
        cg_micro_batch_size=SAMPLES,
        cg_kwargs={"max_iter": 2},
        switch_back_patience=None,
    )
    trainer = make_trainer(tmp_path, max_epochs=EPOCHS, callbacks=[switch, CaptureOptimizer()])
    trainer.fit(model, ckpt_path=checkpoint_path)

    assert isinstance(captured["optimizer"], ConjugateGradient)
    assert switch.phase == Phase.CG
    for index, state in saved["state"].items():
        assert torch.equal(captured["state"][index]["direction"], state["direction"])
        assert torch.equal(captured["state"][index]["previous_grad"], state["previous_grad"])
    assert captured["state"][0]["n_iter"] == saved["state"][0]["n_iter"]


def test_accumulator_round_trip_keeps_weights() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    original, restored = IntervalAccumulator(), IntervalAccumulator()
    for value in (1.0, 2.0, 3.0):
        param.grad = torch.full((3,), value)
        original.update_gradients([param])
        original.update_loss(torch.tensor(value))
    restored.load_state_dict(original.state_dict(), [param])

    param.grad = torch.full((3,), 10.0)
    for accumulator in (original, restored):
        accumulator.update_gradients([param])
        accumulator.update_loss(torch.tensor(10.0))

    expected = original.compute(epoch=0, step=4)
    actual = restored.compute(epoch=0, step=4)
    assert actual.loss == pytest.approx(4.0)
    assert actual == expected


def _feed(accumulators: list[IntervalAccumulator], param: torch.nn.Parameter, values: list[float]) -> None:
    for value in values:
        with torch.no_grad():
            param.add_(0.1 * value)
        param.grad = torch.full((3,), value) + param.detach()
        for accumulator in accumulators:
            accumulator.update_gradients([param])
            accumulator.update_loss(torch.tensor(value))


@pytest.mark.parametrize("partial", [False, True], ids=["between_intervals", "mid_interval"])
def test_accumulator_round_trip_keeps_curvature(partial: bool) -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    original = IntervalAccumulator(track_curvature=True)
    _feed([original], param, [1.0, 2.0, 3.0])
    original.compute(epoch=0, step=3)
    original.reset()
    if partial:
        _feed([original], param, [4.0])

    restored = IntervalAccumulator(track_curvature=True)
    restored.load_state_dict(original.state_dict(), [param])
    _feed([original, restored], param, [5.0, 6.0])

    expected = original.compute(epoch=1, step=6)
    actual = restored.compute(epoch=1, step=6)
    assert expected.curvature is not None
    assert actual == expected

"""Swap back and retry through the public API: argument checks, resume, cg_dtype, LBFGS, step checks.

Every run trains :class:`TinyClassifier` (256 samples, 8 steps per epoch) with a fixed swap
at the end of epoch 2 and a margin of 1e6, so the guard loses its first window and swaps
back one CG step later. With ``swap_retry_factor=2`` the retry comes at the first check with
twice the sample gradients of the swap back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from helpers import OptimizerRecorder, TinyClassifier, make_trainer
from lightning_twophase import ConvexitySwitch, Phase
from lightning_twophase.detection import FixedEpochDetector
from lightning_twophase.tensorboard import TAG

SWAP_EPOCH = 2
EPOCHS = 12
GUARD_TAGS = (TAG.GUARD_CG_RATE, TAG.GUARD_ADAM_RATE, TAG.GUARD_ADAM_LOSS, TAG.GUARD_LOST_WINDOWS)


class ReshuffledClassifier(TinyClassifier):
    """:class:`TinyClassifier` whose shuffle order depends only on the epoch, so a resumed run draws the same batches."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=1, rank=0, shuffle=True, seed=7)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=0)


class DtypeRecorder(Callback):
    """Records the input dtype, parameter dtype and loss of every training batch.

    Lightning converts a batch before ``training_step``, so the input dtype is the one the step
    ran in. The parameter dtype is read at the batch's end, after the switch has swapped.
    Place it after the switch.
    """

    def __init__(self) -> None:
        self.rows: dict[int, tuple[torch.dtype, torch.dtype, float]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        param_dtype = next(pl_module.parameters()).dtype
        self.rows[trainer.global_step] = (batch[0].dtype, param_dtype, float(loss))


def losing_switch(**kwargs: Any) -> ConvexitySwitch:
    arguments = {
        "detector": FixedEpochDetector(epoch=SWAP_EPOCH),
        "cg_kwargs": {"max_iter": 1},
        "switch_back_patience": 1,
        "switch_back_margin": 1e6,
        "swap_retry_factor": 2.0,
        **kwargs,
    }
    return ConvexitySwitch(**arguments)


def fit(
    root: Path | None = None,
    callbacks: tuple[Callback, ...] = (),
    ckpt_path: Path | None = None,
    epochs: int = EPOCHS,
    logger: Any = False,
    **switch_kwargs: Any,
) -> tuple[TinyClassifier, ConvexitySwitch, L.Trainer]:
    L.seed_everything(0, verbose=False)
    switch = losing_switch(**switch_kwargs)
    trainer_kwargs: dict[str, Any] = {}
    all_callbacks: list[Callback] = [switch, *callbacks]
    if root is not None:
        all_callbacks.append(ModelCheckpoint(dirpath=root, filename="{epoch}", every_n_epochs=1, save_top_k=-1))
        trainer_kwargs = {"enable_checkpointing": True, "deterministic": True}
    trainer = make_trainer(root, max_epochs=epochs, callbacks=all_callbacks, logger=logger, **trainer_kwargs)
    model = ReshuffledClassifier()
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, switch, trainer


def sample_counts(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(record["step"], record["samples"]) for record in records]


# ---------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("switch_back_margin", "0.5"),
        ("switch_back_margin", True),
        ("switch_back_margin", float("inf")),
        ("switch_back_margin", float("-inf")),
        ("switch_back_patience", "2"),
        ("switch_back_patience", 2.5),
        ("switch_back_patience", float("nan")),
        ("swap_retry_factor", "2"),
        ("swap_retry_factor", float("nan")),
        ("swap_retry_factor", -2.0),
        ("swap_retry_factor", 0),
    ],
)
def test_guard_argument_rejected(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}: {value!r}"):
        ConvexitySwitch(**{name: value})


def test_margin_none_rejected() -> None:
    # None disables only the patience; a margin of None is a mistake, not a way to disable the guard.
    with pytest.raises(ValueError, match="Invalid switch_back_margin: None"):
        ConvexitySwitch(switch_back_margin=None)


# ---------------------------------------------------------------------- resume across the retry


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyClassifier, ConvexitySwitch]:
    root = tmp_path_factory.mktemp("reference")
    model, switch, _ = fit(root)
    return root, model, switch


def test_reference_swaps_back_and_retries(reference: tuple) -> None:
    _, _, switch = reference

    assert [swap["epoch"] for swap in switch.swaps][:1] == [SWAP_EPOCH]
    assert len(switch.swaps) == 2
    assert len(switch.switch_backs) >= 1
    assert switch.swaps[1]["reason"].startswith("Retry:")
    assert switch.swaps[1]["epoch"] < EPOCHS - 2, "the retry must leave room for a checkpoint in its CG phase"


def saved_state(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, weights_only=False)
    return next(state for key, state in checkpoint["callbacks"].items() if key.startswith("ConvexitySwitch"))


def resume_epochs(switch: ConvexitySwitch) -> dict[str, int]:
    """Return the epochs whose end-of-epoch checkpoints the resume cases start from."""
    return {
        "first_swap": switch.swaps[0]["epoch"],
        "after_swap_back": switch.switch_backs[0]["epoch"],
        "retry_swap": switch.swaps[1]["epoch"],
    }


@pytest.mark.parametrize("case", ["first_swap", "after_swap_back", "retry_swap"])
def test_resume_across_retry_matches(reference: tuple, tmp_path: Path, case: str) -> None:
    root, reference_model, reference_switch = reference
    checkpoint = root / f"epoch={resume_epochs(reference_switch)[case]}.ckpt"
    state = saved_state(checkpoint)
    expected_phase = {"first_swap": Phase.CG, "after_swap_back": Phase.ADAM, "retry_swap": Phase.CG}[case]
    assert state["phase"] == int(expected_phase)
    assert len(state["switch_backs"]) == (0 if case == "first_swap" else 1)

    model, switch, _ = fit(tmp_path, ckpt_path=checkpoint)

    assert sample_counts(switch.swaps) == sample_counts(reference_switch.swaps)
    assert sample_counts(switch.switch_backs) == sample_counts(reference_switch.switch_backs)
    assert switch.sample_gradients == reference_switch.sample_gradients
    for (name, param), expected in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(param, expected), f"parameter {name} differs from the uninterrupted run"


# ---------------------------------------------------------------------- second-phase variants


def test_float64_swap_back_and_retry() -> None:
    recorder = DtypeRecorder()
    _, switch, _ = fit(callbacks=(recorder,), cg_dtype=torch.float64)

    assert len(switch.swaps) == 2
    assert len(switch.switch_backs) >= 1
    for swap in switch.swaps:
        assert recorder.rows[swap["step"] + 1][0] == torch.float64, f"CG step after the swap at {swap['step']}"
    for back in switch.switch_backs:
        assert recorder.rows[back["step"]][1] == torch.float32, f"parameters after the swap back at {back['step']}"
        assert recorder.rows[back["step"] + 1][:2] == (torch.float32, torch.float32)
    assert all(math.isfinite(loss) for *_, loss in recorder.rows.values())


def test_lbfgs_factory_swap_back_and_retry() -> None:
    steps = OptimizerRecorder()
    _, switch, trainer = fit(
        callbacks=(steps,),
        optimizer_factory=lambda groups: torch.optim.LBFGS(groups, line_search_fn="strong_wolfe", max_iter=1),
    )

    assert len(switch.swaps) == 2
    assert len(switch.switch_backs) >= 1
    names = dict(steps.steps)
    assert names[switch.switch_backs[0]["step"]] == "Adam"
    assert names[switch.swaps[1]["step"]] == "LBFGS"
    assert switch.switch_backs[0]["step"] < switch.swaps[1]["step"]


def test_step_checks_swap_back_and_retry() -> None:
    _, switch, _ = fit(check_every_n_steps=3)

    assert len(switch.swaps) == 2
    assert len(switch.switch_backs) >= 1
    # The swap and the retry come at step checks inside an epoch, not at epoch ends.
    assert all(swap["step"] % 3 == 0 for swap in switch.swaps)
    assert any(swap["step"] % 8 != 0 for swap in switch.swaps)
    back = switch.switch_backs[0]
    assert switch.swaps[1]["samples"] >= 2 * back["samples"]
    assert switch.swaps[1]["samples"] - 3 * 32 < 2 * back["samples"], "the retry waited longer than one check"


# ---------------------------------------------------------------------- TensorBoard


def test_guard_scalars_and_texts_per_swap_back(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    _, switch, _ = fit(logger=logger)
    guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance=guidance)
    events.Reload()

    back_steps = [back["step"] for back in switch.switch_backs]
    assert len(back_steps) == 2
    texts = events.Tensors(f"{TAG.SWITCH_BACK}/text_summary")
    assert [entry.step for entry in texts] == back_steps
    assert all("Swapped back to Adam" in entry.tensor_proto.string_val[0].decode() for entry in texts)
    swap_texts = events.Tensors(f"{TAG.SWITCH}/text_summary")
    assert [entry.step for entry in swap_texts] == [swap["step"] for swap in switch.swaps]

    for tag in GUARD_TAGS:
        steps = [event.step for event in events.Scalars(tag)]
        assert set(back_steps) <= set(steps), f"{tag} has no value at a swap back"
    lost = {event.step: event.value for event in events.Scalars(TAG.GUARD_LOST_WINDOWS)}
    assert all(lost[step] == 1.0 for step in back_steps)
    assert all(event.value > 0.0 for event in events.Scalars(TAG.GUARD_ADAM_RATE))


# ---------------------------------------------------------------------- trend at a retry


def test_each_swap_records_its_own_trend(reference: tuple) -> None:
    # The retry fits Adam's trend to the checks since the swap back, not to the first phase.
    _, _, switch = reference
    first, retry = switch.swaps

    assert first["trend"] is not None and first["trend"][1] > 0.0
    assert retry["trend"] is not None
    assert retry["trend"] != first["trend"]

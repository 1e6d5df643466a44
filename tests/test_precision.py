"""ConvexitySwitch under Lightning's precision settings, and the float64 CG phase (``cg_dtype``).

32-true, 64-true and bf16-mixed (supported by Lightning 2.6 on CPU) must swap and keep
lowering the loss in the CG phase. Float16 AMP must be rejected at setup, before any
parameter changes. ``cg_dtype=torch.float64`` must convert the model at the swap and
survive a resume in the CG phase.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision

from helpers import (
    TinyClassifier,
    assert_parameters_unchanged,
    digits_dataset,
    history_without_samples,
    make_trainer,
    parameter_snapshot,
)
from lightning_twophase import ConjugateGradient, ConvexitySwitch, Phase

EPOCHS = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # Runs compared bit for bit must use the same thread count. One thread is also faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model() -> TinyClassifier:
    L.seed_everything(0, verbose=False)
    return TinyClassifier(features=64, classes=10, hidden=16, lr=0.01, dataset=digits_dataset(256), batch_size=64)


def make_switch(**kwargs: Any) -> ConvexitySwitch:
    # The swap back to Adam is off, so that every run stays in the CG phase under test.
    kwargs.setdefault("switch_back_patience", None)
    return ConvexitySwitch(detector="peak_ratio", min_epochs=2, cg_micro_batch_size=256, cg_kwargs={"max_iter": 3}, **kwargs)


def cg_losses(switch: ConvexitySwitch) -> list[float]:
    return [point.loss for point in switch.history if point.phase == int(Phase.CG)]


def loss_at_swap(switch: ConvexitySwitch) -> float:
    return [point.loss for point in switch.history if point.phase == int(Phase.ADAM)][-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32-true", torch.float32), ("64-true", torch.float64), ("bf16-mixed", torch.float32)],
)
def test_precision_swaps_and_loss_falls(precision: str, dtype: torch.dtype) -> None:
    model, switch = make_model(), make_switch()
    trainer = make_trainer(max_epochs=EPOCHS, precision=precision, callbacks=[switch], deterministic=True)
    trainer.fit(model)

    losses = cg_losses(switch)
    print(f"{precision}: swap at epoch {switch.switch_epoch}, loss {loss_at_swap(switch):.3e} -> {losses[-1]:.3e}")
    assert switch.switched
    assert isinstance(trainer.optimizers[0], ConjugateGradient)
    assert len(losses) >= 3, "too few CG epochs to see the loss fall"
    assert losses[-1] < 0.5 * loss_at_swap(switch)
    assert all(param.dtype == dtype for param in model.parameters())


def test_float16_amp_rejected_before_training() -> None:
    # On CPU Lightning turns precision="16-mixed" into bf16-mixed, so the test passes a
    # float16 plugin with a gradient scaler directly.
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    model = make_model()
    before = parameter_snapshot(model)
    trainer = make_trainer(max_epochs=1, plugins=[plugin], callbacks=[make_switch()])

    with pytest.raises(ValueError, match="bf16-mixed") as raised:
        trainer.fit(model)

    assert "Invalid precision: '16-mixed'" in str(raised.value)
    assert "'32-true'" in str(raised.value)
    assert model.training_steps == 0
    assert_parameters_unchanged(model, before)


def fit_float64_cg(root: Path, ckpt_path: Path | None = None) -> tuple[TinyClassifier, ConvexitySwitch, L.Trainer]:
    model, switch = make_model(), make_switch(cg_dtype=torch.float64)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer(
        root,
        max_epochs=EPOCHS,
        callbacks=[switch, checkpoints],
        enable_checkpointing=True,
        deterministic=True,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, switch, trainer


@pytest.fixture(scope="module")
def float64_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyClassifier, ConvexitySwitch, L.Trainer]:
    root = tmp_path_factory.mktemp("float64")
    return (root, *fit_float64_cg(root))


def test_cg_dtype_converts_at_swap(float64_reference: tuple) -> None:
    root, model, switch, trainer = float64_reference
    before_swap = torch.load(root / f"epoch={switch.switch_epoch - 1}.ckpt", weights_only=False)["state_dict"]
    after_swap = torch.load(root / f"epoch={switch.switch_epoch}.ckpt", weights_only=False)["state_dict"]

    assert switch.switched
    assert all(tensor.dtype == torch.float32 for tensor in before_swap.values())
    assert all(tensor.dtype == torch.float64 for tensor in after_swap.values())
    assert all(param.dtype == torch.float64 for param in model.parameters())
    assert isinstance(trainer.strategy.precision_plugin, DoublePrecision)
    assert cg_losses(switch)[-1] < 0.5 * loss_at_swap(switch)


@pytest.mark.slow
def test_cg_dtype_survives_resume_in_cg_phase(float64_reference: tuple, tmp_path: Path) -> None:
    root, reference_model, reference_switch, _ = float64_reference
    checkpoint = root / f"epoch={reference_switch.switch_epoch + 1}.ckpt"
    assert reference_switch.switch_epoch + 1 < EPOCHS - 1, "the swap must leave CG epochs after the checkpoint"

    model, switch, trainer = fit_float64_cg(tmp_path, ckpt_path=checkpoint)

    assert all(param.dtype == torch.float64 for param in model.parameters())
    assert isinstance(trainer.strategy.precision_plugin, DoublePrecision)
    assert switch.switch_step == reference_switch.switch_step
    assert history_without_samples(switch) == history_without_samples(reference_switch)
    for param, reference in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(param, reference)

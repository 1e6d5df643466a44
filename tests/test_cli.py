"""examples/cli.py: LightningCLI builds ConvexitySwitch and the optimizer from examples/config.yaml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse; install the test extra: pip install -e '.[test]'")
pytest.importorskip("sklearn", reason="the digits example needs scikit-learn; install the examples extra")

from lightning_twophase import ConjugateGradient, ConvexitySwitch  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIG = EXAMPLES / "config.yaml"


def load_cli_module():
    spec = importlib.util.spec_from_file_location("twophase_cli_example", EXAMPLES / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet_overrides(tmp_path: Path) -> list[str]:
    return [
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=1",
    ]


def the_switch(trainer) -> ConvexitySwitch:
    switches = [callback for callback in trainer.callbacks if isinstance(callback, ConvexitySwitch)]
    assert len(switches) == 1
    return switches[0]


def test_config_values_reach_callback(tmp_path: Path) -> None:
    cli = load_cli_module().main(args=["--config", str(CONFIG), *quiet_overrides(tmp_path)], run=False)

    switch = the_switch(cli.trainer)
    assert switch.detector.ratio == 0.9
    assert switch.min_epochs == 3
    assert switch.cg_batch_size == 1024
    assert switch.cg_kwargs == {"max_iter": 5, "beta": "pr+", "history_size": 10}
    assert switch.cg_dtype is None

    optimizer = cli.model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.001


@pytest.mark.parametrize("name", ["float64", "torch.float64"])
def test_cg_dtype_parsed_from_string(tmp_path: Path, name: str) -> None:
    args = ["--config", str(CONFIG), *quiet_overrides(tmp_path), f"--trainer.callbacks.init_args.cg_dtype={name}"]

    cli = load_cli_module().main(args=args, run=False)

    assert the_switch(cli.trainer).cg_dtype is torch.float64


def test_invalid_cg_dtype_rejected(tmp_path: Path) -> None:
    args = ["--config", str(CONFIG), *quiet_overrides(tmp_path), "--trainer.callbacks.init_args.cg_dtype=float16"]

    with pytest.raises(ValueError, match="Invalid cg_dtype: 'float16'"):
        load_cli_module().main(args=args, run=False)


@pytest.mark.slow
def test_fit_from_config_swaps(tmp_path: Path) -> None:
    args = [
        "fit",
        "--config",
        str(CONFIG),
        *quiet_overrides(tmp_path),
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=4",
        "--trainer.callbacks.init_args.min_epochs=1",
        "--trainer.callbacks.init_args.cg_batch_size=128",
        "--trainer.callbacks.init_args.cg_kwargs.max_iter=2",
        "--optimizer.init_args.lr=0.01",
    ]

    cli = load_cli_module().main(args=args)

    trainer = cli.trainer
    switch = the_switch(trainer)
    assert trainer.state.finished
    assert trainer.current_epoch == 3
    assert switch.cg_batch_size == 128
    assert switch.cg_kwargs == {"max_iter": 2, "beta": "pr+", "history_size": 10}
    assert switch.switched, f"no swap in 3 epochs; history: {switch.history}"
    assert isinstance(trainer.optimizers[0], ConjugateGradient)
    assert (Path(trainer.log_dir) / "config.yaml").is_file()

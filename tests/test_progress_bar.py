"""The TQDM training bar shows the current phase: "Epoch N [Adam]" before the swap, "[CG]" after it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# A fit with the progress bar enabled, in a child process so that the bar writes to a real
# stream that the test reads back. The blobs data swaps at epoch 1, so epoch 2 runs CG.
SCRIPT = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(TESTS)!r})
    import lightning as L
    from helpers import TinyClassifier, make_trainer
    from lightning_twophase import ConvexitySwitch

    L.seed_everything(0, verbose=False)
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_patience=None, min_epochs=1, cg_kwargs={{"max_iter": 2}})
    trainer = make_trainer(max_epochs=3, callbacks=[switch], enable_progress_bar=True)
    trainer.fit(TinyClassifier())
    print("SWITCH_EPOCH", switch.switch_epoch)
    """
)


@pytest.mark.slow
def test_bar_shows_phase() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).replace("\r", "\n")
    assert "SWITCH_EPOCH 1" in output
    assert "Epoch 0 [Adam]:" in output
    assert "Epoch 1 [Adam]:" in output
    assert "Epoch 2 [CG]:" in output
    assert "Epoch 0 [CG]" not in output
    assert "Epoch 2 [Adam]" not in output

"""The README's first command, run as a user would, with fewer epochs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_digits_example_swaps_and_prints_paths(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "examples/digits.py", "--max-epochs", "8", "--logdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "Swapped Adam for conjugate gradient after epoch" in result.stdout
    assert f"tensorboard --logdir {tmp_path}" in result.stdout
    assert list((tmp_path / "digits").glob("version_0/events.out.tfevents.*"))

"""Smoke test of the CG-versus-SciPy benchmark script."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cg_vs_scipy.py"


def test_cg_vs_scipy_quick_runs():
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "Total ratio ours/SciPy:" in completed.stdout


def test_history_cost_quick_runs():
    script = SCRIPT.parent / "history_cost.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "time ratio:" in completed.stdout
    assert "history_size=10:" in completed.stdout

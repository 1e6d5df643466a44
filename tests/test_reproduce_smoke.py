"""Smoke runs of the benchmark scripts: each ``--quick`` mode exits 0 and writes its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"adam", "adam_cg", "adam_lbfgs", "adam_cg_fixed"}


def _run(script: str, *arguments: str, timeout: float) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(ROOT / "benchmarks" / script), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)


@pytest.mark.slow
def test_reproduce_quick_writes_outputs(tmp_path):
    completed = _run("reproduce.py", "--quick", "--out", str(tmp_path), timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]

    payload = json.loads((tmp_path / "reproduce.json").read_text())
    runs = payload["runs"]
    assert {run["spec"]["method"] for run in runs} == METHODS
    for run in runs:
        assert run["points"][0][0] == 0
        assert run["points"][-1][0] >= run["budget"], "a run stopped before its budget was spent"

    adam = next(run for run in runs if run["spec"]["method"] == "adam")
    assert adam["points"][-1][0] == adam["budget"], "Adam overran its budget"
    assert adam["points"][-1][2] < adam["points"][0][2]

    fixed = next(run for run in runs if run["spec"]["method"] == "adam_cg_fixed")
    assert fixed["switch_epoch"] == fixed["spec"]["fixed_epoch"]

    table = (tmp_path / "reproduce.md").read_text()
    assert "| Adam |" in table
    assert "Targets for Adam+CG" in table
    assert (tmp_path / "reproduce_digits_loss.png").stat().st_size > 0
    assert (tmp_path / "reproduce_digits_norm_vs_loss.png").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_quick_detector_methods(tmp_path):
    methods = ("adam", "adam_cg_guard", "adam_cg_log_slope")
    completed = _run("reproduce.py", "--quick", "--methods", *methods, "--out", str(tmp_path), timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]

    runs = json.loads((tmp_path / "reproduce.json").read_text())["runs"]
    assert {run["spec"]["method"] for run in runs} == set(methods)
    guard = next(run for run in runs if run["spec"]["method"] == "adam_cg_guard")
    assert guard["switch_epoch"] is not None
    # The swap happens at the end of epoch `switch_epoch`, before any CG step is counted.
    assert guard["switch_samples"] == (guard["switch_epoch"] + 1) * guard["train_size"]
    assert all(back > guard["switch_epoch"] for back in guard["switch_back_epochs"])

    table = (tmp_path / "reproduce.md").read_text()
    assert "Swap detectors side by side" in table
    assert "| Adam+CG (0.9 x peak, guard) |" in table
    assert "(a) ratio >= 1/1.1 on every pair" in table


@pytest.mark.slow
def test_overhead_quick_prints_ratio():
    completed = _run("overhead.py", "--quick", timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]

    line = next(line for line in completed.stdout.splitlines() if line.startswith("median step-time ratio"))
    ratio = float(line.rsplit(":", 1)[1])
    # Only a sanity range: three short blocks on a shared CI machine are too noisy for the 1.02 target.
    assert 0.3 < ratio < 3.0


@pytest.mark.slow
def test_guard_windows_quick_prints_rates():
    completed = _run("guard_windows.py", "--quick", timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]

    lines = completed.stdout.splitlines()
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert rows, completed.stdout[-2000:]
    # Columns: step, sample-epochs, CG loss, CG rate, Adam rate, Adam trend loss, lost windows.
    assert all(float(row[4]) >= 0.0 for row in rows)
    assert all(int(float(row[6])) >= 0 for row in rows)
    assert any(line.startswith("swap at epoch") for line in lines)

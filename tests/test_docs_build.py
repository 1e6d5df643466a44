"""The documentation site builds with ``mkdocs build --strict``: no broken links, nav entries or docstring warnings."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs or mkdocstrings is not installed; install the docs extra: pip install -e '.[docs]'",
)
def test_mkdocs_strict_build(tmp_path: Path) -> None:
    site = tmp_path / "site"
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)]

    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)

    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert "WARNING" not in result.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert "ConvexitySwitch" in api
    assert "ConjugateGradient" in api
    assert (site / "method" / "index.html").is_file()
    assert (site / "benchmarks" / "index.html").is_file()

"""``lightning-twophase report``: real event files from a short fit, read back offline."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from helpers import fit_logged_two_phase_run
from lightning_twophase.report import load_runs, main
from lightning_twophase.tensorboard import TAG

SCRIPT = shutil.which("lightning-twophase", path=os.path.dirname(sys.executable)) or shutil.which("lightning-twophase")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report_logs")
    switch = fit_logged_two_phase_run(root, name="tiny", max_epochs=3)
    assert switch.switched, "the fixture run must swap to CG"
    assert switch.switch_epoch == 1
    return root


def run_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def assert_not_blank(pixels: np.ndarray) -> None:
    assert pixels.ndim == 3
    assert pixels.shape[0] > 200
    assert pixels.shape[1] > 600
    assert float(pixels[..., :3].std()) > 0.05
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20


@pytest.mark.slow
def test_runs_found_and_parsed(logdir: Path) -> None:
    runs, skipped = load_runs(logdir)

    assert [run.name for run in runs] == ["tiny/version_0"]
    assert skipped == []
    events = runs[0].swap_events()
    assert len(events) == 1
    assert events[0].label == "Adam -> CG"
    assert events[0].epoch == 1
    assert events[0].reason is not None and "fell below" in events[0].reason
    phases = {point.phase for point in runs[0].points()}
    assert phases == {0, 1}


@pytest.mark.skipif(SCRIPT is None, reason="the lightning-twophase console script is not installed; run pip install -e .")
@pytest.mark.slow
def test_console_script_writes_png(logdir: Path, tmp_path: Path) -> None:
    output = tmp_path / "report.png"
    result = run_command(SCRIPT, "report", str(logdir), "-o", str(output))

    assert result.returncode == 0, result.stderr
    assert output.is_file()
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_not_blank(matplotlib.image.imread(output))


@pytest.mark.slow
def test_module_writes_html(logdir: Path, tmp_path: Path) -> None:
    output = tmp_path / "nested" / "report.html"
    result = run_command(sys.executable, "-m", "lightning_twophase.report", "report", str(logdir), "-o", str(output))

    assert result.returncode == 0, result.stderr
    page = output.read_text(encoding="utf-8")
    assert "tiny/version_0" in page
    assert '<img alt="two-phase panels of tiny/version_0" src="data:image/png;base64,' in page
    assert "<td>Adam -&gt; CG</td><td>1</td>" in page

    encoded = page.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
    pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
    assert_not_blank(pixels)


def test_several_runs_one_row_each(logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(logdir, tmp_path / "logs")
    shutil.copytree(logdir / "tiny", tmp_path / "logs" / "copy")
    with SummaryWriter(str(tmp_path / "logs" / "unrelated")) as writer:
        writer.add_scalar("train_loss", 1.0, 0)
    single = tmp_path / "single.png"
    double = tmp_path / "double.png"

    assert main(["report", str(logdir), "-o", str(single)]) == 0
    assert main(["report", str(tmp_path / "logs"), "-o", str(double)]) == 0

    height_single = matplotlib.image.imread(single).shape[0]
    height_double = matplotlib.image.imread(double).shape[0]
    assert height_double == pytest.approx(2 * height_single, rel=0.05)
    assert "left out unrelated" in capsys.readouterr().err


def test_switch_back_and_prefix(tmp_path: Path) -> None:
    phases = [0, 0, 1, 1, 0, 0]
    with SummaryWriter(str(tmp_path / "synthetic")) as writer:
        for step, phase in enumerate(phases):
            writer.add_scalar(f"run1-{TAG.LOSS}", 1.0 / (step + 1), step)
            writer.add_scalar(f"run1-{TAG.GRAD_NORM}", 0.5 + step, step)
            writer.add_scalar(f"run1-{TAG.PHASE}", float(phase), step)
            writer.add_scalar("epoch", float(step // 2), step)

    runs, _ = load_runs(tmp_path)
    events = runs[0].swap_events()

    assert [event.label for event in events] == ["Adam -> CG", "CG -> Adam"]
    assert [event.step for event in events] == [1, 3]
    assert [event.epoch for event in events] == [0, 1]
    assert events[1].loss == pytest.approx(0.25)
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "out.html")]) == 0
    assert "CG -&gt; Adam" in (tmp_path / "out.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_missing_directory_exit_code(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    result = run_command(sys.executable, "-m", "lightning_twophase.report", "report", str(missing), "-o", "x.png")

    assert result.returncode == 2
    assert f"Log directory not found: {missing}" in result.stderr
    assert "save_dir" in result.stderr


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "No TensorBoard event files"),
        ("foreign", "No two-phase scalars"),
        ("file", "is a file"),
    ],
)
def test_invalid_logdir_errors(tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str) -> None:
    target = tmp_path / case
    if case == "file":
        target.write_text("not a directory")
    else:
        target.mkdir()
    if case == "foreign":
        with SummaryWriter(str(target / "run")) as writer:
            writer.add_scalar("train_loss", 1.0, 0)

    code = main(["report", str(target), "-o", str(tmp_path / "out.png")])

    assert code == 2
    error = capsys.readouterr().err
    assert message in error
    assert str(target) in error
    assert not (tmp_path / "out.png").exists()


def test_unsupported_suffix(logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["report", str(logdir), "-o", str(tmp_path / "report.pdf")])

    assert code == 2
    error = capsys.readouterr().err
    assert "report.pdf" in error
    assert ".png" in error
    assert ".html" in error


def test_help_lists_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])

    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "LOGDIR" in text
    assert "--output" in text
    assert "dots per inch" in text

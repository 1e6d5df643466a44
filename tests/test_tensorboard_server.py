"""A real ``tensorboard`` server on 127.0.0.1 serves the two-phase panels of a short fit.

The checks go through TensorBoard's HTTP data API, the same requests its web page sends. Where
Chromium is installed, one test also renders the Custom Scalars tab headless and checks that
the screenshot is not blank.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from helpers import fit_logged_two_phase_run
from lightning_twophase.tensorboard import LAYOUT_TITLE, TAG

pytestmark = pytest.mark.slow

RUN = "tiny/version_0"
STARTUP_TIMEOUT_S = 60.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A running TensorBoard server and the helpers to query its data API."""

    def __init__(self, port: int, process: subprocess.Popen) -> None:
        self.port = port
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **query: str) -> bytes:
        address = f"{self.url}{path}"
        if query:
            address += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(address, timeout=10) as response:
            return response.read()

    def get_json(self, path: str, **query: str):
        return json.loads(self.get(path, **query))


def wait_until_loaded(server: Server) -> None:
    """Poll until the server lists the run's loss tag, or fail after ``STARTUP_TIMEOUT_S``."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no response yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            output = server.process.stdout.read().decode(errors="replace") if server.process.stdout else ""
            pytest.fail(f"tensorboard exited with code {server.process.returncode} before serving:\n{output}")
        try:
            tags = server.get_json("/data/plugin/scalars/tags")
            if TAG.LOSS in tags.get(RUN, {}):
                return
            last_error = f"runs listed so far: {sorted(tags)}"
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as error:
            last_error = repr(error)
        time.sleep(0.5)
    pytest.fail(f"tensorboard on port {server.port} did not serve {RUN} within {STARTUP_TIMEOUT_S:.0f} s: {last_error}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tensorboard_logs")
    switch = fit_logged_two_phase_run(root, name="tiny", max_epochs=3)
    assert switch.switched, "the fixture run must swap to CG"
    return root


@pytest.fixture(scope="module")
def server(logdir: Path) -> Iterator[Server]:
    port = free_port()
    command = [
        sys.executable, "-m", "tensorboard.main",
        "--logdir", str(logdir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--load_fast=false",
        "--reload_interval", "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    running = Server(port, process)
    try:
        wait_until_loaded(running)
        yield running
    finally:
        stop(process)


def test_scalar_tags_and_loss(server: Server) -> None:
    tags = server.get_json("/data/plugin/scalars/tags")[RUN]
    for tag in (TAG.LOSS, TAG.GRAD_NORM, TAG.THRESHOLD, TAG.PHASE, TAG.CG_STEP_SIZE):
        assert tag in tags

    loss = server.get_json("/data/plugin/scalars/scalars", run=RUN, tag=TAG.LOSS)
    phase = server.get_json("/data/plugin/scalars/scalars", run=RUN, tag=TAG.PHASE)

    assert len(loss) >= 3
    assert all(len(row) == 3 for row in loss)
    assert loss[-1][2] < loss[0][2]
    assert {row[2] for row in phase} == {0.0, 1.0}


def test_image_served(server: Server) -> None:
    tags = server.get_json("/data/plugin/images/tags")
    assert TAG.FIGURE in tags[RUN]

    entries = server.get_json("/data/plugin/images/images", run=RUN, tag=TAG.FIGURE, sample="0")
    assert entries
    query = entries[-1]["query"]
    image = server.get(f"/data/plugin/images/individualImage?{query}")

    assert image[:8] == PNG_SIGNATURE
    assert len(image) > 5_000


def test_switch_text_served(server: Server) -> None:
    # SummaryWriter.add_text stores the entry under "<tag>/text_summary".
    text_tag = f"{TAG.SWITCH}/text_summary"
    tags = server.get_json("/data/plugin/text/tags")
    assert text_tag in tags[RUN]

    entries = server.get_json("/data/plugin/text/text", run=RUN, tag=text_tag)

    assert len(entries) == 1
    assert "Swapped Adam for CG" in entries[0]["text"]
    assert "epoch 1" in entries[0]["text"]


def test_custom_scalars_layout(server: Server) -> None:
    layout = server.get_json("/data/plugin/custom_scalars/layout")

    categories = layout["category"]
    titles = [category["title"] for category in categories]
    assert titles == [LAYOUT_TITLE]
    charts = {chart["title"]: chart for chart in categories[0]["chart"]}
    assert "Loss" in charts
    assert any(TAG.LOSS in pattern for pattern in charts["Loss"]["multiline"]["tag"])


def test_headless_screenshot(server: Server, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed; install it (apt-get install chromium) to screenshot the page")
    screenshot = tmp_path / "custom_scalars.png"
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1280,900",
        "--virtual-time-budget=15000", f"{server.url}/#custom_scalars",
    ]

    result = subprocess.run(command, capture_output=True, text=True, timeout=90)

    assert screenshot.is_file(), f"chromium wrote no screenshot (exit code {result.returncode}):\n{result.stderr[-2000:]}"
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (900, 1280)
    assert float(np.var(pixels[..., :3])) > 1e-3

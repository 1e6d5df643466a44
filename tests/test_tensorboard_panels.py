"""TensorBoard event files of a two-phase run, read back with TensorBoard's ``EventAccumulator``.

One module-scoped run writes into a plain ``TensorBoardLogger`` and one into a logger with
``prefix="run1"``. The tests check the scalars, the norm-versus-loss image, the swap text and
the "Two-phase" custom-scalars layout that ``ConvexitySwitch`` writes.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import TinyClassifier, limit_cpu_threads, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_twophase import ConvexitySwitch, Phase
from lightning_twophase.tensorboard import LAYOUT_TITLE, TAG

limit_cpu_threads()

EPOCHS = 4

#: Scalar tags every run writes, in both phases or only after the swap.
SCALAR_TAGS = (
    TAG.LOSS,
    TAG.GRAD_NORM,
    TAG.GRAD_NORM_BATCH_MEAN,
    TAG.GRAD_NORM_OF_MEAN,
    TAG.GRAD_NORM_MAX,
    TAG.THRESHOLD,
    TAG.PHASE,
    TAG.SAMPLES,
    TAG.CG_STEP_SIZE,
    TAG.CG_EVALUATIONS,
    TAG.CG_BETA,
    TAG.CG_CURVATURE,
    TAG.CG_RESTARTED,
)
TEXT_TAG = f"{TAG.SWITCH}/text_summary"
LAYOUT_TAG = "custom_scalars__config__"


@dataclass
class Run:
    """A finished fit and its event files, loaded without any sampling."""

    switch: ConvexitySwitch
    events: event_accumulator.EventAccumulator
    log_dir: Path


def fit_and_load(root: Path, prefix: str = "") -> Run:
    # A margin of 1e-9 never loses a window: the guard logs its rates and the run stays in CG.
    switch = ConvexitySwitch(detector="peak_ratio", switch_back_margin=1e-9, cg_micro_batch_size=256, figure_every_n_checks=1)
    logger = TensorBoardLogger(root, name="tb", version=0, prefix=prefix)
    trainer = make_trainer(max_epochs=EPOCHS, callbacks=[switch], logger=logger)
    trainer.fit(TinyClassifier())

    guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance=guidance)
    events.Reload()
    return Run(switch, events, Path(logger.log_dir))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return fit_and_load(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def prefixed_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return fit_and_load(tmp_path_factory.mktemp("prefixed"), prefix="run1")


def read_layout(events: event_accumulator.EventAccumulator) -> layout_pb2.Layout:
    """Parse the custom-scalars layout proto stored under its config tag."""
    stored = events.Tensors(LAYOUT_TAG)
    assert len(stored) == 1, f"expected one layout event, found {len(stored)}"
    layout = layout_pb2.Layout()
    layout.ParseFromString(stored[0].tensor_proto.string_val[0])
    return layout


def layout_regexes(layout: layout_pb2.Layout) -> dict[str, list[str]]:
    """Return ``{chart title: tag regexes}`` of the "Two-phase" category."""
    categories = [category for category in layout.category if category.title == LAYOUT_TITLE]
    assert len(categories) == 1, f"categories: {[c.title for c in layout.category]}"
    return {chart.title: list(chart.multiline.tag) for chart in categories[0].chart}


def matching_tags(regex: str, tags: list[str]) -> list[str]:
    # The custom-scalars plugin of TensorBoard 2.21 selects tags with re.match, anchored at the start.
    pattern = re.compile(regex)
    return [tag for tag in tags if pattern.match(tag)]


def test_run_swapped(run: Run):
    assert run.switch.switched
    assert run.switch.switch_epoch is not None


@pytest.mark.parametrize("tag", SCALAR_TAGS)
def test_scalar_tag_written(run: Run, tag: str):
    assert tag in run.events.Tags()["scalars"]
    assert len(run.events.Scalars(tag)) > 0


def test_phase_scalar_goes_zero_to_one(run: Run):
    phases = [event.value for event in run.events.Scalars(TAG.PHASE)]
    steps = [event.step for event in run.events.Scalars(TAG.PHASE)]

    assert phases[0] == float(Phase.ADAM)
    assert phases[-1] == float(Phase.CG)
    assert sorted(phases) == phases
    assert steps == sorted(steps)
    first_cg_step = steps[phases.index(float(Phase.CG))]
    assert first_cg_step > run.switch.switch_step


def test_cg_scalars_only_after_swap(run: Run):
    steps = [event.step for event in run.events.Scalars(TAG.CG_STEP_SIZE)]

    assert min(steps) > run.switch.switch_step
    assert len(steps) == run.events.Scalars(TAG.PHASE)[-1].step - run.switch.switch_step


def test_guard_scalars_after_swap(run: Run):
    cg_rates = run.events.Scalars(TAG.GUARD_CG_RATE)
    adam_rates = run.events.Scalars(TAG.GUARD_ADAM_RATE)
    lost = run.events.Scalars(TAG.GUARD_LOST_WINDOWS)

    assert cg_rates, "the guard logged no window"
    assert [e.step for e in cg_rates] == [e.step for e in adam_rates] == [e.step for e in lost]
    assert min(e.step for e in cg_rates) > run.switch.switch_step
    # CG lowers the loss in every window, and Adam's trend rate is positive on this falling loss.
    assert all(e.value > 0.0 for e in cg_rates)
    assert all(e.value > 0.0 for e in adam_rates)
    assert all(e.value == 0.0 for e in lost)


def test_threshold_is_ratio_of_max(run: Run):
    maxima = {event.step: event.value for event in run.events.Scalars(TAG.GRAD_NORM_MAX)}
    thresholds = {event.step: event.value for event in run.events.Scalars(TAG.THRESHOLD)}

    assert maxima.keys() == thresholds.keys()
    for step, maximum in maxima.items():
        assert thresholds[step] == pytest.approx(0.9 * maximum, rel=1e-6)


def test_figure_not_blank(run: Run):
    images = run.events.Images(TAG.FIGURE)
    assert len(images) >= 2, "the figure is written at every check and at the swap"

    last = images[-1]
    pixels = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (last.height, last.width, 3)
    assert pixels.std() > 10.0
    non_white = (pixels < 250).any(axis=2).mean()
    assert non_white > 0.02, f"only {non_white:.2%} of the pixels are not white"


def test_figure_has_cg_colour(run: Run):
    # CG points are drawn in matplotlib's "tab:orange" (255, 127, 14) and Adam points in "tab:blue".
    pixels = np.asarray(Image.open(io.BytesIO(run.events.Images(TAG.FIGURE)[-1].encoded_image_string)).convert("RGB"))
    orange = np.abs(pixels.astype(int) - np.array([255, 127, 14])).sum(axis=2) < 30
    blue = np.abs(pixels.astype(int) - np.array([31, 119, 180])).sum(axis=2) < 30

    assert orange.sum() > 20
    assert blue.sum() > 20


def test_switch_text(run: Run):
    assert TEXT_TAG in run.events.Tags()["tensors"]

    entries = run.events.Tensors(TEXT_TAG)
    assert len(entries) == 1
    text = entries[0].tensor_proto.string_val[0].decode()
    assert f"epoch {run.switch.switch_epoch}" in text
    assert f"global step {run.switch.switch_step}" in text
    assert run.switch.switch_reason in text
    assert entries[0].step == run.switch.switch_step


def test_layout_registered_with_plugin(run: Run):
    content = run.events.PluginTagToContent("custom_scalars")

    assert LAYOUT_TAG in content


def test_layout_regexes_match_written_tags(run: Run):
    scalar_tags = run.events.Tags()["scalars"]
    charts = layout_regexes(read_layout(run.events))

    assert len(charts) >= 4
    for title, regexes in charts.items():
        assert regexes, f"chart {title!r} has no tag regex"
        for regex in regexes:
            assert matching_tags(regex, scalar_tags), f"{title!r}: {regex!r} matches none of {scalar_tags}"


def test_layout_norm_chart_exact_tags(run: Run):
    # A pattern must not pull in a longer tag that shares its prefix.
    scalar_tags = run.events.Tags()["scalars"]
    charts = layout_regexes(read_layout(run.events))

    matched = {tag for regex in charts["Gradient norm and threshold"] for tag in matching_tags(regex, scalar_tags)}
    assert matched == {TAG.GRAD_NORM, TAG.GRAD_NORM_MAX, TAG.THRESHOLD}


def test_prefixed_tags_written(prefixed_run: Run):
    scalar_tags = prefixed_run.events.Tags()["scalars"]

    assert f"run1-{TAG.LOSS}" in scalar_tags
    assert f"run1-{TAG.CG_STEP_SIZE}" in scalar_tags
    assert not [tag for tag in scalar_tags if tag.startswith("twophase/")]


def test_prefixed_layout_matches(prefixed_run: Run):
    scalar_tags = prefixed_run.events.Tags()["scalars"]
    charts = layout_regexes(read_layout(prefixed_run.events))

    for title, regexes in charts.items():
        for regex in regexes:
            matched = matching_tags(regex, scalar_tags)
            assert matched, f"{title!r}: {regex!r} matches none of {scalar_tags}"
            assert all(tag.startswith("run1-") for tag in matched)


def test_prefixed_panels_written(prefixed_run: Run):
    assert TAG.FIGURE in prefixed_run.events.Tags()["images"]
    assert TEXT_TAG in prefixed_run.events.Tags()["tensors"]


def test_one_event_file_per_run(run: Run):
    # The layout, image and text go into the logger's own run directory, next to the scalars.
    files = list(run.log_dir.glob("events.out.tfevents.*"))

    assert len(files) == 1

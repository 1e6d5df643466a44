"""Offline report of two-phase runs, read from TensorBoard event files: ``lightning-twophase report``.

The command finds every run directory under a log directory (every directory that directly
contains ``events.out.tfevents.*`` files), reads the scalars and the swap text that
:class:`~lightning_twophase.ConvexitySwitch` wrote, and renders for each run:

* the gradient norm against the loss on log axes, coloured by ``twophase/phase``, with the
  swap point marked;
* the loss, the gradient norm and the swap threshold over global steps, with a vertical line
  at every phase change;
* the swap events: every change of ``twophase/phase`` from 0 (Adam) to 1 (CG) and any change
  back from 1 to 0, with the reason from the ``twophase/switch`` text.

The output format follows the suffix of ``-o``: ``.png`` writes one image with one row of
panels per run, ``.html`` writes a self-contained page with one inline PNG and one table of
swap events per run. No TensorBoard server is needed::

    lightning-twophase report logs -o report.html
    python -m lightning_twophase.report report logs/digits -o report.png
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

from lightning_twophase.tensorboard import TAG, CheckPoint, draw_norm_vs_loss  # noqa: E402

__all__ = [
    "ReportError",
    "RunLog",
    "Series",
    "SwapEvent",
    "find_run_directories",
    "load_runs",
    "main",
    "render_figure",
    "write_report",
]

EVENT_FILE_GLOB = "events.out.tfevents.*"
OUTPUT_SUFFIXES = (".png", ".html")
PHASE_NAMES = {0: "Adam", 1: "CG"}

# A logger prefix such as TensorBoardLogger(prefix="run1") writes "run1-twophase/loss".
_TAG_PATTERN = re.compile(r"^(?:.*-)?(twophase/.+)$")
_SWITCH_TEXT_TAG = f"{TAG.SWITCH}/text_summary"
_EPOCH_IN_TEXT = re.compile(r"at epoch (\d+)")
_REASON_IN_TEXT = re.compile(r"Reason:\s*(.+)", re.DOTALL)

# Keep every scalar and text event; the report does not need the stored images.
_SIZE_GUIDANCE = {
    event_accumulator.SCALARS: 0,
    event_accumulator.TENSORS: 0,
    event_accumulator.IMAGES: 1,
    event_accumulator.HISTOGRAMS: 1,
}


class ReportError(ValueError):
    """An input the report cannot use. The message names the path and the fix."""


# ---------------------------------------------------------------------- reading event files


@dataclass(frozen=True)
class Series:
    """One scalar tag of one run: global steps in increasing order and their values."""

    steps: tuple[int, ...]
    values: tuple[float, ...]

    def at(self, step: int) -> float | None:
        """Return the value logged at ``step`` or, failing that, the last one before it."""
        found = None
        for current, value in zip(self.steps, self.values):
            if current > step:
                break
            found = value
        return found


@dataclass(frozen=True)
class SwapEvent:
    """A change of ``twophase/phase`` between two consecutive logged steps.

    Attributes:
        step: Last global step logged in the old phase (the step at which the swap was decided).
        epoch: Epoch of the swap, from the ``twophase/switch`` text or the ``epoch`` scalar;
            ``None`` when neither was logged.
        from_phase: Phase before the change (0 Adam, 1 CG).
        to_phase: Phase after the change.
        loss: ``twophase/loss`` at ``step``, if logged there.
        grad_norm: ``twophase/grad_norm`` at ``step``, if logged there.
        reason: The reason line of the ``twophase/switch`` text, if one was written at ``step``.
    """

    step: int
    epoch: int | None
    from_phase: int
    to_phase: int
    loss: float | None
    grad_norm: float | None
    reason: str | None

    @property
    def label(self) -> str:
        """``"Adam -> CG"`` for the swap, ``"CG -> Adam"`` for a switch back."""
        return f"{PHASE_NAMES.get(self.from_phase, self.from_phase)} -> {PHASE_NAMES.get(self.to_phase, self.to_phase)}"


@dataclass(frozen=True)
class RunLog:
    """The two-phase tags of one run directory.

    Attributes:
        name: Path of the run directory relative to the log directory.
        scalars: Scalar series keyed by tag, with any logger prefix removed.
        switch_texts: ``(step, markdown)`` of every ``twophase/switch`` text entry.
    """

    name: str
    scalars: dict[str, Series]
    switch_texts: tuple[tuple[int, str], ...]

    @property
    def has_two_phase_tags(self) -> bool:
        """Whether the run contains the loss and phase scalars of ``ConvexitySwitch``."""
        return TAG.LOSS in self.scalars and TAG.PHASE in self.scalars

    def swap_events(self) -> list[SwapEvent]:
        """Return every phase change in step order."""
        phase = self.scalars[TAG.PHASE]
        events = []
        pairs = list(zip(phase.steps, phase.values))
        for (step, before), (_, after) in zip(pairs, pairs[1:]):
            if int(before) != int(after):
                events.append(self._event(step, int(before), int(after)))
        return events

    def points(self) -> list[CheckPoint]:
        """Return the gradient-norm-versus-loss points: steps that logged both, with their phase."""
        losses = dict(zip(self.scalars[TAG.LOSS].steps, self.scalars[TAG.LOSS].values))
        norms = self.scalars.get(TAG.GRAD_NORM, Series((), ()))
        phase = self.scalars[TAG.PHASE]
        points = []
        for step, norm in zip(norms.steps, norms.values):
            if step in losses:
                epoch = self._epoch_at(step)
                points.append(CheckPoint(step, -1 if epoch is None else epoch, losses[step], norm, int(phase.at(step) or 0)))
        return points

    def _event(self, step: int, before: int, after: int) -> SwapEvent:
        text = next((markdown for logged, markdown in self.switch_texts if logged == step), None)
        epoch = None
        reason = None
        if text is not None:
            epoch_match = _EPOCH_IN_TEXT.search(text)
            reason_match = _REASON_IN_TEXT.search(text)
            epoch = int(epoch_match.group(1)) if epoch_match else None
            reason = reason_match.group(1).strip() if reason_match else None
        if epoch is None:
            epoch = self._epoch_at(step)

        loss = self.scalars[TAG.LOSS]
        norms = self.scalars.get(TAG.GRAD_NORM)
        return SwapEvent(
            step=step,
            epoch=epoch,
            from_phase=before,
            to_phase=after,
            loss=_value_exactly_at(loss, step),
            grad_norm=_value_exactly_at(norms, step) if norms is not None else None,
            reason=reason,
        )

    def _epoch_at(self, step: int) -> int | None:
        epochs = self.scalars.get("epoch")
        value = epochs.at(step) if epochs is not None else None
        return None if value is None else int(value)


def _value_exactly_at(series: Series, step: int) -> float | None:
    for current, value in zip(series.steps, series.values):
        if current == step:
            return value
    return None


def find_run_directories(logdir: Path) -> list[Path]:
    """Return every directory at or below ``logdir`` that directly contains event files, sorted.

    Raises:
        ReportError: If ``logdir`` does not exist, is not a directory, or contains no event files.
    """
    if not logdir.exists():
        raise ReportError(
            f"Log directory not found: {logdir}. Pass the save_dir of your TensorBoardLogger"
            " (for example `lightning-twophase report logs -o report.html`)."
        )
    if not logdir.is_dir():
        raise ReportError(f"Invalid log directory: {logdir} is a file. Pass the directory that contains the runs.")

    directories = sorted({path.parent for path in logdir.rglob(EVENT_FILE_GLOB) if path.is_file()})
    if not directories:
        raise ReportError(
            f"No TensorBoard event files ({EVENT_FILE_GLOB}) found under {logdir}. Pass the save_dir of the"
            " TensorBoardLogger used with ConvexitySwitch, after the fit has logged at least one epoch."
        )
    return directories


def load_run(directory: Path, logdir: Path) -> RunLog:
    """Read the scalars and the swap text of one run directory."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance=_SIZE_GUIDANCE)
    accumulator.Reload()
    tags = accumulator.Tags()

    scalars = {}
    for tag in tags.get(event_accumulator.SCALARS, []):
        events = sorted(accumulator.Scalars(tag), key=lambda event: event.step)
        scalars[_strip_prefix(tag)] = Series(tuple(e.step for e in events), tuple(float(e.value) for e in events))

    texts = []
    for tag in tags.get(event_accumulator.TENSORS, []):
        if _strip_prefix(tag) == _SWITCH_TEXT_TAG:
            for event in accumulator.Tensors(tag):
                strings = event.tensor_proto.string_val
                if strings:
                    texts.append((event.step, strings[0].decode("utf-8", errors="replace")))

    name = directory.relative_to(logdir).as_posix()
    return RunLog(name=logdir.name if name == "." else name, scalars=scalars, switch_texts=tuple(sorted(texts)))


def _strip_prefix(tag: str) -> str:
    match = _TAG_PATTERN.match(tag)
    return match.group(1) if match else tag


def load_runs(logdir: Path) -> tuple[list[RunLog], list[str]]:
    """Read every run under ``logdir``.

    Returns:
        The runs with two-phase tags, and the names of the runs without them.

    Raises:
        ReportError: If no run under ``logdir`` contains the two-phase tags.
    """
    runs = [load_run(directory, logdir) for directory in find_run_directories(logdir)]
    usable = [run for run in runs if run.has_two_phase_tags]
    skipped = [run.name for run in runs if not run.has_two_phase_tags]
    if not usable:
        raise ReportError(
            f"No two-phase scalars ({TAG.LOSS}, {TAG.PHASE}) in the event files under {logdir}"
            f" (runs: {', '.join(skipped)}). Train with ConvexitySwitch in the Trainer's callbacks and a"
            " TensorBoardLogger, then rerun the report on that logger's save_dir."
        )
    return usable, skipped


# ---------------------------------------------------------------------- drawing

_PANEL_WIDTH = 5.5
_PANEL_HEIGHT = 4.2


def render_figure(runs: Sequence[RunLog]) -> Figure:
    """Draw one row of three panels per run: norm versus loss, values over steps, swap events."""
    figure, grid = plt.subplots(
        len(runs), 3, figsize=(3 * _PANEL_WIDTH, len(runs) * _PANEL_HEIGHT), squeeze=False
    )
    for row, run in zip(grid, runs):
        _draw_run(row, run)
    figure.tight_layout()
    return figure


def _draw_run(row: Sequence[Axes], run: RunLog) -> None:
    events = run.swap_events()
    points = run.points()
    swap = _point_of(next((e for e in events if e.to_phase == 1), None))
    backs = [p for p in (_point_of(e) for e in events if e.to_phase == 0) if p is not None]

    draw_norm_vs_loss(row[0], points, swap, _last_value(run, TAG.THRESHOLD), backs)
    row[0].set_title(f"{run.name}: gradient norm versus loss", fontsize=10)
    _draw_over_steps(row[1], run, events)
    _draw_event_list(row[2], run, events)


def _point_of(event: SwapEvent | None) -> CheckPoint | None:
    if event is None or event.loss is None or event.grad_norm is None:
        return None
    return CheckPoint(event.step, -1 if event.epoch is None else event.epoch, event.loss, event.grad_norm, event.from_phase)


def _last_value(run: RunLog, tag: str) -> float | None:
    series = run.scalars.get(tag)
    return series.values[-1] if series is not None and series.values else None


def _draw_over_steps(axes: Axes, run: RunLog, events: Sequence[SwapEvent]) -> None:
    styles = ((TAG.LOSS, "tab:green", "-", "loss"), (TAG.GRAD_NORM, "tab:blue", "-", "gradient norm"),
              (TAG.THRESHOLD, "grey", "--", "threshold"))
    for tag, colour, line, label in styles:
        series = run.scalars.get(tag)
        if series is None:
            continue
        chosen = [(s, v) for s, v in zip(series.steps, series.values) if v > 0]
        if chosen:
            axes.plot([s for s, _ in chosen], [v for _, v in chosen], line, marker=".", ms=3, lw=0.9,
                      color=colour, label=label)

    for event in events:
        colour = "red" if event.to_phase == 1 else "black"
        axes.axvline(event.step, color=colour, ls=":", lw=1.2, label=f"{event.label} (step {event.step})")

    axes.set_yscale("log")
    axes.set_xlabel("global step")
    axes.set_title(f"{run.name}: loss and gradient norm", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best", fontsize=8)


def _draw_event_list(axes: Axes, run: RunLog, events: Sequence[SwapEvent]) -> None:
    axes.axis("off")
    axes.set_title(f"{run.name}: swap events", fontsize=10)
    lines = [_describe(event) for event in events] or ["No phase change: the run never swapped to CG."]
    axes.text(0.0, 1.0, "\n\n".join(lines), va="top", ha="left", fontsize=8, wrap=True, transform=axes.transAxes)


def _describe(event: SwapEvent) -> str:
    epoch = "?" if event.epoch is None else str(event.epoch)
    text = f"{event.label} at epoch {epoch}, step {event.step}"
    if event.loss is not None:
        text += f"\n  loss {event.loss:.4g}"
    if event.grad_norm is not None:
        text += f", gradient norm {event.grad_norm:.4g}"
    if event.reason:
        text += "\n  " + event.reason
    return text


def _png_bytes(figure: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()


# ---------------------------------------------------------------------- writing

def _html_page(runs: Sequence[RunLog], skipped: Sequence[str], logdir: Path, dpi: int) -> str:
    sections = [_html_run(run, dpi) for run in runs]
    note = ""
    if skipped:
        names = ", ".join(html.escape(name) for name in skipped)
        note = f"<p>Runs without two-phase tags, left out: {names}</p>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>Two-phase report: {html.escape(str(logdir))}</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:4px 8px;text-align:left}img{max-width:100%}</style>\n"
        f"</head>\n<body>\n<h1>Two-phase report</h1>\n<p>Log directory: <code>{html.escape(str(logdir))}</code></p>\n"
        f"{note}\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def _html_run(run: RunLog, dpi: int) -> str:
    image = base64.b64encode(_png_bytes(render_figure([run]), dpi)).decode("ascii")
    rows = [_html_event_row(event) for event in run.swap_events()]
    if not rows:
        rows = ['<tr><td colspan="6">No phase change: the run never swapped to CG.</td></tr>']
    name = html.escape(run.name)
    return (
        f"<section>\n<h2>{name}</h2>\n"
        f'<img alt="two-phase panels of {name}" src="data:image/png;base64,{image}">\n'
        "<table>\n<tr><th>event</th><th>epoch</th><th>step</th><th>loss</th><th>gradient norm</th><th>reason</th></tr>\n"
        + "\n".join(rows) + "\n</table>\n</section>"
    )


def _html_event_row(event: SwapEvent) -> str:
    cells = [
        event.label,
        "" if event.epoch is None else str(event.epoch),
        str(event.step),
        "" if event.loss is None else f"{event.loss:.6g}",
        "" if event.grad_norm is None else f"{event.grad_norm:.6g}",
        event.reason or "",
    ]
    return "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"


def check_output_path(output: Path) -> str:
    """Return the output format, ``".png"`` or ``".html"``, from the suffix of ``output``.

    Raises:
        ReportError: For any other suffix.
    """
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ReportError(
            f"Unsupported output file: {output} (suffix {suffix or 'missing'}). Use a name ending in .png"
            " (one image, one row per run) or .html (a self-contained page)."
        )
    return suffix


def write_report(logdir: Path, output: Path, dpi: int = 100) -> list[RunLog]:
    """Read the runs under ``logdir`` and write the report to ``output``.

    Returns:
        The runs drawn.

    Raises:
        ReportError: For an unsupported suffix, a missing or empty log directory, or logs
            without two-phase tags.
    """
    suffix = check_output_path(output)
    runs, skipped = load_runs(logdir)
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        output.write_bytes(_png_bytes(render_figure(runs), dpi))
    else:
        output.write_text(_html_page(runs, skipped, logdir, dpi), encoding="utf-8")
    for name in skipped:
        print(f"lightning-twophase: left out {name}: it has no {TAG.LOSS} and {TAG.PHASE} scalars", file=sys.stderr)
    return runs


# ---------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Return the ``lightning-twophase`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lightning-twophase",
        description="Tools for runs trained with lightning_twophase.ConvexitySwitch.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="render the two-phase panels of TensorBoard logs into a PNG or HTML file",
        description=(
            "Read the TensorBoard event files under LOGDIR offline and draw, for every run, the gradient norm"
            " versus the loss, the loss and gradient norm over steps with the threshold, and the swap events."
        ),
    )
    report.add_argument(
        "logdir",
        metavar="LOGDIR",
        type=Path,
        help="log directory searched recursively for runs (directories with events.out.tfevents.* files)",
    )
    report.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="output file; .png writes one image with one row of panels per run, .html writes a"
        " self-contained page with one image and a swap-event table per run",
    )
    report.add_argument("--dpi", type=int, default=100, help="resolution of the PNG images in dots per inch (default 100)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0 on success and 2 on an invalid input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dpi < 10:
        parser.error(f"Invalid --dpi: {args.dpi}. Use a resolution of at least 10 dots per inch, such as 100.")

    try:
        runs = write_report(args.logdir, args.output, dpi=args.dpi)
    except ReportError as error:
        print(f"lightning-twophase report: error: {error}", file=sys.stderr)
        return 2

    print(f"Wrote {args.output} ({len(runs)} run{'s' if len(runs) != 1 else ''}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

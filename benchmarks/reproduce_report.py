"""Tables and plots of the reproduction benchmark, computed from ``reproduce.json``.

Usage::

    python benchmarks/reproduce_report.py benchmarks/results/reproduce.json
    python benchmarks/reproduce_report.py benchmarks/results/detectors/reproduce.json \\
        benchmarks/results/detectors_vit/reproduce.json --images docs/img --prefix detectors

The runs of all given files are merged. Tables go next to the first file as ``reproduce.md``;
plots go to ``--images`` (default: that file's folder) as ``<prefix>_<dataset>_loss.png`` and
``<prefix>_<dataset>_norm_vs_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE = "adam"
CANDIDATE = "adam_cg"
LABELS = {
    "adam": "Adam",
    "adam_cg": "Adam+CG (0.9 x peak)",
    "adam_lbfgs": "Adam+L-BFGS (0.9 x peak)",
    "adam_cg_fixed": "Adam+CG (fixed epoch)",
    "adam_cg_iter1": "Adam+CG, max_iter 1",
    "adam_cg_log_slope": "Adam+CG (log slope)",
    "adam_cg_curvature": "Adam+CG (curvature)",
    "adam_cg_curvature_guard": "Adam+CG (curvature, guard)",
    "adam_cg_cost_aware": "Adam+CG (cost-aware)",
    "adam_cg_cost_aware_sparse": "Adam+CG (cost-aware, sparse trials)",
    "adam_cg_guard": "Adam+CG (0.9 x peak, guard)",
    "adam_cg_log_slope_guard": "Adam+CG (log slope, guard)",
    "adam_cg_log_slope_strict": "Adam+CG (log slope, guard, margin 1)",
    "adam_lbfgs_log_slope_guard": "Adam+L-BFGS (log slope, guard)",
    "adam_cg_cost_aware_guard": "Adam+CG (cost-aware, guard)",
    "adam_cg_dynamic": "Adam+CG (0.9 x peak, dynamic batch)",
}
COLORS = {
    "adam": "black",
    "adam_cg": "tab:blue",
    "adam_lbfgs": "tab:green",
    "adam_cg_fixed": "tab:orange",
    "adam_cg_iter1": "tab:purple",
    "adam_cg_log_slope": "tab:red",
    "adam_cg_curvature": "tab:brown",
    "adam_cg_curvature_guard": "sienna",
    "adam_cg_cost_aware": "tab:pink",
    "adam_cg_cost_aware_sparse": "tab:olive",
    "adam_cg_guard": "tab:cyan",
    "adam_cg_log_slope_guard": "darkred",
    "adam_cg_log_slope_strict": "mediumvioletred",
    "adam_lbfgs_log_slope_guard": "darkgreen",
    "adam_cg_cost_aware_guard": "tab:gray",
    "adam_cg_dynamic": "gold",
}

#: Targets for Adam+CG against Adam: evaluations to reach Adam's final loss, final-loss ratio
#: at equal budget, and the largest allowed drop in validation accuracy (percentage points).
TARGET_FRACTION = 1 / 3
TARGET_RATIO = 10.0
TARGET_ACCURACY_DROP = 0.5
TARGET_PAIRS = 4

#: Swap rules compared side by side, each running CG after its swap.
DETECTOR_METHODS = (
    "adam_cg",
    "adam_cg_log_slope",
    "adam_cg_curvature",
    "adam_cg_cost_aware",
    "adam_cg_cost_aware_sparse",
    "adam_cg_guard",
    "adam_cg_log_slope_guard",
    "adam_cg_log_slope_strict",
    "adam_lbfgs_log_slope_guard",
    "adam_cg_curvature_guard",
    "adam_cg_cost_aware_guard",
    "adam_cg_dynamic",
)
#: Detector targets against Adam: the final loss may be at most this factor above Adam's on
#: every pair, and must be at least DETECTOR_GAIN times below it on DETECTOR_GAIN_PAIRS pairs.
DETECTOR_MAX_LOSS_FACTOR = 1.1
DETECTOR_GAIN = 3.0
DETECTOR_GAIN_PAIRS = 4


def final_loss(run: dict[str, Any]) -> float:
    """Return the training loss at the last recorded point within the budget."""
    inside = [point for point in run["points"] if point[0] <= run["budget"]]
    return inside[-1][2]


def reach_fraction(run: dict[str, Any], target: float) -> float:
    """Return the evaluations needed to reach loss ``target`` as a budget fraction, ``inf`` if never."""
    for samples, _, loss in run["points"]:
        if samples <= run["budget"] and loss <= target:
            return samples / run["budget"]
    return math.inf


def group_runs(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]]:
    """Return ``{(dataset, model): {method: {seed: run}}}``."""
    groups: dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        spec = run["spec"]
        groups[(spec["dataset"], spec["model"])][spec["method"]][spec["seed"]] = run
    return groups


def _geometric_mean(values: list[float]) -> float:
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if not finite:
        return math.nan
    return math.exp(sum(math.log(v) for v in finite) / len(finite))


def _first_swap(run: dict[str, Any]) -> list[int]:
    # Results written before retries existed record only the first swap.
    return [] if run["switch_epoch"] is None else [run["switch_epoch"]]


def summarize(methods: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Return per-method summaries of one pair, compared seed by seed with Adam."""
    baseline = methods.get(BASELINE, {})
    summary = {}
    for method, seeds in methods.items():
        losses = [final_loss(run) for run in seeds.values()]
        accuracies = [100 * run["val_accuracy"] for run in seeds.values()]
        paired = [seed for seed in seeds if seed in baseline]
        fractions = [reach_fraction(seeds[s], final_loss(baseline[s])) for s in paired]
        ratios = [final_loss(baseline[s]) / final_loss(seeds[s]) for s in paired]
        accuracy_drops = [100 * (baseline[s]["val_accuracy"] - seeds[s]["val_accuracy"]) for s in paired]
        summary[method] = {
            "seeds": len(seeds),
            "loss_mean": statistics.fmean(losses),
            "loss_min": min(losses),
            "loss_max": max(losses),
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.pstdev(accuracies),
            "fractions": fractions,
            "fraction_median": statistics.median(fractions) if fractions else math.nan,
            "ratio": _geometric_mean(ratios),
            "ratios": ratios,
            "accuracy_drop": statistics.fmean(accuracy_drops) if accuracy_drops else math.nan,
            "swap_epochs": [run["switch_epoch"] for run in seeds.values()],
            "all_swap_epochs": [run.get("swap_epochs") or _first_swap(run) for run in seeds.values()],
            "swap_back_epochs": [run.get("switch_back_epochs", []) for run in seeds.values()],
            "wall_s": statistics.fmean(run["wall_s"] for run in seeds.values()),
        }
    return summary


def _fraction_text(row: dict[str, Any]) -> str:
    reached = [f for f in row["fractions"] if math.isfinite(f)]
    if not row["fractions"]:
        return "n/a"
    if not reached:
        return f"not reached (0/{len(row['fractions'])})"
    return f"{statistics.median(reached):.2f} ({len(reached)}/{len(row['fractions'])})"


def _swap_text(row: dict[str, Any]) -> str:
    """Return the swap epochs of each seed, with ``(back N)`` after a swap back to Adam at epoch N.

    Seeds are separated by commas, the retries of one seed by spaces: ``17 (back 18) 48``.
    """
    runs = row["all_swap_epochs"]
    if not any(runs):
        return "-"
    texts = []
    for swaps, backs in zip(runs, row["swap_back_epochs"]):
        parts = [str(epoch) + (f" (back {backs[i]})" if i < len(backs) else "") for i, epoch in enumerate(swaps)]
        texts.append(" ".join(parts) if parts else "none")
    return ", ".join(texts)


def pair_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Return the Markdown table of one dataset and model."""
    lines = [
        "| method | final train loss, mean (min-max) | Adam loss / method loss | val. acc. % (std) |"
        " evaluations to Adam's final loss, fraction of budget (seeds reached) | swap epoch per seed | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in LABELS:
        if method not in summary:
            continue
        row = summary[method]
        fraction = "-" if method == BASELINE else _fraction_text(row)
        lines.append(
            f"| {LABELS[method]} | {row['loss_mean']:.2e} ({row['loss_min']:.1e}-{row['loss_max']:.1e}) |"
            f" {row['ratio']:.2g} | {row['accuracy_mean']:.1f} ({row['accuracy_std']:.1f}) | {fraction} |"
            f" {_swap_text(row)} | {row['wall_s']:.0f} |"
        )
    return lines


def target_rows(groups: dict, summaries: dict) -> tuple[list[str], int]:
    """Return the per-pair target table for Adam+CG and the number of pairs meeting all three targets."""
    lines = [
        f"| pair | evaluations to Adam's loss <= {TARGET_FRACTION:.2f} (median) | loss ratio >= {TARGET_RATIO:g}"
        f" (geometric mean) | val. acc. drop <= {TARGET_ACCURACY_DROP} points | all |",
        "|---|---|---|---|---|",
    ]
    met = 0
    for key in sorted(groups):
        row = summaries[key].get(CANDIDATE)
        if row is None or BASELINE not in summaries[key]:
            continue
        fast = row["fraction_median"] <= TARGET_FRACTION
        low = row["ratio"] >= TARGET_RATIO
        accurate = row["accuracy_drop"] <= TARGET_ACCURACY_DROP
        met += fast and low and accurate
        lines.append(
            f"| {key[0]} {key[1]} | {_mark(fast)} {row['fraction_median']:.2f} | {_mark(low)} {row['ratio']:.2g} |"
            f" {_mark(accurate)} {row['accuracy_drop']:+.1f} | {_mark(fast and low and accurate)} |"
        )
    return lines, met


def _detector_cell(row: dict[str, Any]) -> str:
    return f"{row['ratio']:.3g} [{_swap_text(row)}]"


def detector_table(summaries: dict) -> list[str]:
    """Return one table of the swap rules: loss ratio and swap epochs per pair, then the two targets.

    A cell reads ``ratio [swap epoch per seed]``, with ``ratio`` Adam's final loss over the
    method's (geometric mean over seeds, higher is better).
    """
    methods = [m for m in DETECTOR_METHODS if any(m in summary for summary in summaries.values())]
    pairs = [key for key in sorted(summaries) if BASELINE in summaries[key]]
    lines = [
        "| pair | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for key in pairs:
        cells = [_detector_cell(summaries[key][m]) if m in summaries[key] else "-" for m in methods]
        lines.append(f"| {key[0]} {key[1]} | " + " | ".join(cells) + " |")

    floor = 1 / DETECTOR_MAX_LOSS_FACTOR
    worst, never_worse, gains = [], [], []
    for method in methods:
        ratios = [summaries[key][method]["ratio"] for key in pairs if method in summaries[key]]
        seeds = [r for key in pairs if method in summaries[key] for r in summaries[key][method]["ratios"]]
        low = min(ratios) if ratios else math.nan
        worst.append(f"{low:.3g} (one seed: {min(seeds):.3g})" if seeds else "-")
        never_worse.append(_mark(len(ratios) == len(pairs) and low >= floor))
        wins = sum(r >= DETECTOR_GAIN for r in ratios)
        gains.append(f"{_mark(wins >= DETECTOR_GAIN_PAIRS)} ({wins} of {len(ratios)})")
    lines += [
        "| lowest ratio over pairs | " + " | ".join(worst) + " |",
        f"| (a) ratio >= 1/{DETECTOR_MAX_LOSS_FACTOR:g} on every pair | " + " | ".join(never_worse) + " |",
        f"| (b) ratio >= {DETECTOR_GAIN:g} on >= {DETECTOR_GAIN_PAIRS} pairs | " + " | ".join(gains) + " |",
    ]
    return lines


def _mark(passed: bool) -> str:
    return "met" if passed else "missed"


def plot_curves(groups: dict, dataset: str, path: Path) -> None:
    """Plot training loss against evaluations (top) and wall time (bottom), one column per model."""
    keys = sorted(k for k in groups if k[0] == dataset)
    figure, axes = plt.subplots(2, len(keys), figsize=(3.6 * len(keys), 5.6), squeeze=False)
    for column, key in enumerate(keys):
        for method, seeds in groups[key].items():
            for seed, run in sorted(seeds.items()):
                epochs = [p[0] / run["train_size"] for p in run["points"]]
                label = LABELS.get(method, method) if seed == min(seeds) else None
                style = {"color": COLORS.get(method), "alpha": 0.8, "linewidth": 1}
                axes[0, column].semilogy(epochs, [p[2] for p in run["points"]], label=label, **style)
                axes[1, column].semilogy([p[1] for p in run["points"]], [p[2] for p in run["points"]], **style)
        axes[0, column].set_title(f"{dataset} {key[1]}")
        axes[0, column].set_xlabel("sample gradients / training-set size")
        axes[1, column].set_xlabel("wall time (s)")
    axes[0, 0].set_ylabel("full training loss")
    axes[1, 0].set_ylabel("full training loss")
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_norm_vs_loss(groups: dict, dataset: str, path: Path) -> None:
    """Plot the detector's gradient norm against the loss for seed 0, with the swap marked."""
    keys = sorted(k for k in groups if k[0] == dataset)
    figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for column, key in enumerate(keys):
        axis = axes[0, column]
        for method in ("adam_cg", "adam_cg_fixed"):
            run = groups[key].get(method, {}).get(0)
            if run is None or not run["history"]:
                continue
            adam = [h for h in run["history"] if h[3] == 0]
            cg = [h for h in run["history"] if h[3] == 1]
            color = COLORS[method]
            axis.loglog([h[1] for h in adam], [h[2] for h in adam], ".-", color=color, markersize=3, linewidth=0.8, label=LABELS[method])
            if cg:
                axis.loglog([h[1] for h in cg], [h[2] for h in cg], "x", color=color, markersize=3)
            if run["switch_epoch"] is not None and adam:
                axis.loglog([adam[-1][1]], [adam[-1][2]], "o", color=color, markerfacecolor="none", markersize=9)
        axis.set_title(f"{dataset} {key[1]} (seed 0)")
        axis.set_xlabel("loss (Adam: epoch mean; CG: CG batch)")
    axes[0, 0].set_ylabel("gradient norm")
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def render_markdown(payload: dict[str, Any]) -> str:
    """Return the Markdown report: one table per pair, then the target table."""
    groups = group_runs(payload["runs"])
    summaries = {key: summarize(methods) for key, methods in groups.items()}
    lines = []
    for key in sorted(groups):
        lines += [f"#### {key[0]}, {key[1]}", "", *pair_table(summaries[key]), ""]
    targets, met = target_rows(groups, summaries)
    lines += [
        "#### Targets for Adam+CG (0.9 x peak)",
        "",
        *targets,
        "",
        f"All three targets met on {met} of {len(targets) - 2} pairs (goal: at least {TARGET_PAIRS}).",
        "",
    ]
    if any(m in summary for summary in summaries.values() for m in DETECTOR_METHODS[1:]):
        lines += ["#### Swap detectors side by side", "", *detector_table(summaries), ""]
    return "\n".join(lines)


def write_outputs(payload: dict[str, Any], out: Path, images: Path | None = None, prefix: str = "reproduce") -> None:
    """Write ``reproduce.md`` into ``out`` and the PNG plots into ``images`` (default ``out``).

    The documentation links its plots from ``docs/img``, because MkDocs serves only files
    inside ``docs/``.
    """
    images = out if images is None else images
    out.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.md").write_text(render_markdown(payload))
    groups = group_runs(payload["runs"])
    for dataset in sorted({key[0] for key in groups}):
        plot_curves(groups, dataset, images / f"{prefix}_{dataset}_loss.png")
        plot_norm_vs_loss(groups, dataset, images / f"{prefix}_{dataset}_norm_vs_loss.png")


def merge_payloads(sources: list[Path]) -> dict[str, Any]:
    """Return one payload with the runs of every ``reproduce.json`` in ``sources``."""
    payloads = [json.loads(source.read_text()) for source in sources]
    return {
        "command": " && ".join(payload["command"] for payload in payloads),
        "wall_s": sum(payload["wall_s"] for payload in payloads),
        "runs": [run for payload in payloads for run in payload["runs"]],
    }


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write the tables and plots of reproduce.json files.")
    default = Path(__file__).parent / "results" / "reproduce.json"
    parser.add_argument(
        "sources",
        type=Path,
        nargs="*",
        default=[default],
        help="reproduce.json files to read, merged; reproduce.md goes next to the first",
    )
    parser.add_argument("--images", type=Path, help="folder for the PNG plots (default: the JSON file's folder)")
    parser.add_argument("--prefix", default="reproduce", help="file-name prefix of the plots (default reproduce)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args()
    out = args.sources[0].parent
    write_outputs(merge_payloads(args.sources), out, args.images, args.prefix)
    print((out / "reproduce.md").read_text())

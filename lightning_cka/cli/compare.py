"""``lightning-cka compare RUN_A RUN_B``: two runs' heatmaps, their difference and their attention distances."""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_cka.cli.errors import CLIError
from lightning_cka.cli.options import add_local_threshold, sentence, step
from lightning_cka.cli.runs import Run, local_threshold, read_run
from lightning_cka.cli.summary import headline
from lightning_cka.cli.text import few, name_list, threshold_text
from lightning_cka.plotting import attention_distance_plot, cka_heatmap
from lightning_cka.result import CKAResult
from lightning_cka.stats import nanmean

COLORS = ("C0", "C3")  # run A, run B


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "draw and tabulate two runs' CKA heatmaps, their difference and their attention distances"
    parser = commands.add_parser(
        "compare",
        help=help_,
        description=f"{sentence(help_)} at one step (Raghu et al. 2021, Figure 4 in spirit): e.g. where the "
        "lower layers of a small-data ViT fail to become local.",
    )
    parser.add_argument("run_a", metavar="RUN_A", help="first run (A): log directory, its cka/ folder or a .npz file")
    parser.add_argument("run_b", metavar="RUN_B", help="second run (B)")
    parser.add_argument(
        "--step",
        type=step,
        default="last",
        help="global step to compare, present in both runs ('last', the default: the last step both have); a run "
        "given as a .npz file is that probe whatever the step",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="FILE", help="figure file to write (.png, .pdf, .svg)"
    )
    parser.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the runs in the figure and table")
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
    runs = [read_run(path) for path in (args.run_a, args.run_b)]
    a, b = select_probes(*runs, args.step)
    if a.layers != b.layers:
        raise CLIError(f"the runs monitor different layers: A has {name_list(a.layers)}; B has {name_list(b.layers)}.")
    if a.attention_layers and b.attention_layers and a.attention_layers != b.attention_layers:
        raise CLIError(
            f"the runs have different attention layers: A has {name_list(a.attention_layers)}; "
            f"B has {name_list(b.attention_layers)}."
        )
    labels = args.labels or _default_labels(runs)
    thresholds = [local_threshold(probe, args.local_threshold) for probe in (a, b)]
    fig = compare_figure(a, b, labels, thresholds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(args.out, dpi=120)
    except (ValueError, OSError) as err:
        raise CLIError(f"cannot write --out {args.out}: {err}") from err
    print("\n".join(compare_lines(a, b, labels, thresholds, runs)))
    print(f"\nwrote {args.out}")


def select_probes(a: Run, b: Run, step: int | str) -> tuple[CKAResult, CKAResult]:
    """The probes of two runs at ``step`` (an int, or ``"last"``: the last step every run directory has).

    A run given as a ``.npz`` file is its one probe whatever the step, so a training run's final probe can be set
    against ``analyze`` output (step -1).
    """
    directories = [run for run in (a, b) if not run.single_file]
    if step == "last" and directories:
        common = set.intersection(*(set(run.probes) for run in directories))
        if not common:
            raise CLIError(
                f"{a.path} (steps {few(a.steps)}) and {b.path} (steps {few(b.steps)}) have no step in common; "
                "pass --step, or one probe's .npz file."
            )
        step = max(common)
    elif step != "last" and not directories:
        raise CLIError("--step picks a probe of a run directory, but both runs are single .npz files.")
    for run in directories:
        if step not in run.probes:
            raise CLIError(f"step {step} is not in {run.path} (its steps: {few(run.steps)}).")
    return tuple(next(iter(run.probes.values())) if run.single_file else run.probes[step] for run in (a, b))


def compare_lines(
    a: CKAResult, b: CKAResult, labels: Sequence[str], thresholds: Sequence[float | None], runs: Sequence[Run]
) -> list[str]:
    """The comparison as text: headline numbers, attention distances per layer, CKA difference per layer."""
    ha, hb = headline(a, thresholds[0]), headline(b, thresholds[1])
    width = max(map(len, [*a.layers, *a.attention_layers, *b.attention_layers, "layer"]))
    lines = [f"A = {labels[0]}: {runs[0].path}, step {a.step}, {a.num_examples} probe images"]
    lines.append(f"B = {labels[1]}: {runs[1].path}, step {b.step}, {b.num_examples} probe images")
    for key, what in (("offdiag", "mean off-diagonal CKA"), ("adjacent", "mean adjacent-layer CKA")):
        lines.append(f"{what:<24} A {ha[key]:.3f}   B {hb[key]:.3f}   A - B {ha[key] - hb[key]:+.3f}")
    if a.attention_layers or b.attention_layers:
        local = threshold_text(thresholds[0])
        if thresholds[0] != thresholds[1]:
            local = f"A {local}, B {threshold_text(thresholds[1])}"
        lines += ["", f"mean attention distance per layer (pixels); local heads: {local}"]
        lines.append(f"{'attention layer':<{width}}  A mean   A min  A local  B mean   B min  B local")
        names = a.attention_layers or b.attention_layers
        for i, name in enumerate(names):
            cells = [_head_cells(r.mean_attention_distance, i, t) for r, t in zip((a, b), thresholds, strict=True)]
            lines.append(f"{name:<{width}}  {cells[0]}  {cells[1]}")
    diff = a.intra - b.intra
    lines += ["", "CKA within the model, A - B, per layer (row) over the other layers"]
    lines.append(f"{'layer':<{width}}  mean diff  max |diff|  with layer")
    for i, name in enumerate(a.layers):
        row = np.delete(diff[i], i)
        others = [n for j, n in enumerate(a.layers) if j != i]
        if not np.isfinite(row).any():
            lines.append(f"{name:<{width}}  {'-':>9}  {'-':>10}")
            continue
        j = int(np.nanargmax(np.abs(row)))
        lines.append(f"{name:<{width}}  {nanmean(row):+9.3f}  {abs(row[j]):10.3f}  {others[j]}")
    return lines


def _head_cells(distances: np.ndarray, layer: int, threshold: float | None) -> str:
    """Mean, min and local fraction of one layer's heads, or blanks when the run has no such layer."""
    heads = distances[layer][np.isfinite(distances[layer])] if layer < len(distances) else np.array([])
    if not heads.size:
        return f"{'-':>6}  {'-':>6}  {'-':>7}"
    local = f"{(heads < threshold).mean():7.2f}" if threshold else f"{'-':>7}"
    return f"{heads.mean():6.1f}  {heads.min():6.1f}  {local}"


def compare_figure(a: CKAResult, b: CKAResult, labels: Sequence[str], thresholds: Sequence[float | None]) -> Figure:
    """Both intra-model heatmaps, their difference A - B and both runs' attention distances, side by side."""
    attention = bool(a.mean_attention_distance.size or b.mean_attention_distance.size)
    fig = Figure(figsize=(5.5 * (3 + attention), 5), layout="constrained")
    axes = fig.subplots(1, 3 + attention, squeeze=False)[0]
    for ax, result, label in zip(axes, (a, b), labels, strict=False):
        cka_heatmap(result.intra, result.layers, result.layers, ax=ax, title=f"CKA within {label}")
    diff = a.intra - b.intra
    limit = max(0.05, float(np.nanmax(np.abs(diff)))) if np.isfinite(diff).any() else 1.0
    cka_heatmap(
        diff,
        a.layers,
        a.layers,
        ax=axes[2],
        title=f"{labels[0]} - {labels[1]}",
        vmin=-limit,
        vmax=limit,
        cmap="RdBu_r",
        colorbar_label="CKA difference",
    )
    if attention:
        _attention_panel(axes[3], a, b, labels, thresholds)
    fig.suptitle(f"{labels[0]} (step {a.step}) vs {labels[1]} (step {b.step})")
    return fig


def _attention_panel(
    ax: Any, a: CKAResult, b: CKAResult, labels: Sequence[str], thresholds: Sequence[float | None]
) -> None:
    top = 0.0
    for result, label, color in zip((a, b), labels, COLORS, strict=True):
        if result.mean_attention_distance.size:
            attention_distance_plot(
                result.mean_attention_distance, result.attention_layers, ax=ax, label=label, color=color
            )
            top = max(top, float(np.nanmax(result.mean_attention_distance)))
    # One grey line when the runs share their geometry, else a line in each run's colour.
    if thresholds[0] == thresholds[1]:
        lines = [(thresholds[0], "grey", "local threshold")]
    else:
        lines = [(t, c, f"local threshold ({label})") for t, c, label in zip(thresholds, COLORS, labels, strict=True)]
    for threshold, color, label in lines:
        if threshold:
            ax.axhline(threshold, color=color, linestyle="--", linewidth=1, label=label)
            top = max(top, 2 * threshold)
    ax.set_ylim(0, top * 1.1 or 1)
    ax.set_title("mean attention distance per head")
    ax.legend()


def _default_labels(runs: Sequence[Run]) -> list[str]:
    """Short run names: the log directory (and its parent for Lightning's version_N), else A and B."""
    labels = []
    for run in runs:
        folder = run.folder if run.folder.name != "cka" else run.folder.parent
        folder = folder.resolve()
        labels.append(f"{folder.parent.name}/{folder.name}" if folder.name.startswith("version_") else folder.name)
    return labels if labels[0] != labels[1] and all(labels) else ["A", "B"]

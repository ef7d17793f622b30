"""The ``lightning-cka`` command line: compare two runs, summarize one, analyze trained checkpoints.

Every failure the user can fix (a bad path, a run without arrays, a missing step, runs with different layers, a bad
model or data source) is one line on stderr, ``lightning-cka: error: ...``, and exit status 2.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_cka.cli_data import (
    CLIError,
    Run,
    input_config,
    load_model,
    local_threshold,
    probe_images,
    read_run,
)
from lightning_cka.compare import compare_models
from lightning_cka.plotting import attention_distance_plot, cka_heatmap
from lightning_cka.result import CKAResult
from lightning_cka.taps.recorder import REDUCTIONS

ANALYSIS_FILE = "cka/analysis.npz"  # relative to analyze's --out: the output is itself a run with one probe
COLORS = ("C0", "C3")  # run A, run B


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for any error).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error argparse has already printed
        return int(done.code or 0)
    try:
        if not 0 < args.local_threshold <= 1:  # every command takes it
            raise CLIError(f"--local-threshold is a fraction in (0, 1], got {args.local_threshold}.")
        args.handler(args)
    except CLIError as err:
        print(f"lightning-cka: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its ``compare``, ``analyze`` and ``summary`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="lightning-cka",
        description="Minibatch CKA and ViT mean attention distances (Raghu et al. 2021) of training runs and "
        "trained models. A RUN is a Lightning log directory holding cka/step_<step>.npz (written by CKAMonitor), "
        "its cka/ folder, or one .npz file.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_compare(commands)
    _add_analyze(commands)
    _add_summary(commands)
    return parser


def _add_compare(commands: Any) -> None:
    help_ = "draw and tabulate two runs' CKA heatmaps, their difference and their attention distances"
    parser = commands.add_parser(
        "compare",
        help=help_,
        description=f"{_sentence(help_)} at one step (Raghu et al. 2021, Figure 4 in spirit): e.g. where the "
        "lower layers of a small-data ViT fail to become local.",
    )
    parser.add_argument("run_a", metavar="RUN_A", help="first run (A): log directory, its cka/ folder or a .npz file")
    parser.add_argument("run_b", metavar="RUN_B", help="second run (B)")
    parser.add_argument(
        "--step",
        type=_step,
        default="last",
        help="global step to compare, present in both runs ('last', the default: the last step both have); a run "
        "given as a .npz file is that probe whatever the step",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="FILE", help="figure file to write (.png, .pdf, .svg)"
    )
    parser.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the runs in the figure and table")
    _add_local_threshold(parser)
    parser.set_defaults(handler=_compare)


def _add_analyze(commands: Any) -> None:
    help_ = "one-shot CKA and attention distances of a trained model (and a reference) on probe images"
    parser = commands.add_parser(
        "analyze",
        help=help_,
        description=f"{_sentence(help_)}, with compare_models. Writes OUT/{ANALYSIS_FILE} (the layout CKAMonitor "
        "writes, step -1, so 'compare' and 'summary' read OUT as a run) and the figures "
        "OUT/cka_intra.png, OUT/cka_reference.png, OUT/cka_reference_intra.png, OUT/attention_distance.png and "
        "OUT/attention_distance_reference.png (as far as the models have the parts).",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_CHECKPOINT",
        help="a timm model name, or a Lightning checkpoint whose hyperparameters hold timm_name (and timm_kwargs)",
    )
    parser.add_argument(
        "--reference", metavar="NAME_OR_CHECKPOINT", help="a second model to compare with (a timm name or a checkpoint)"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="probe images: 'digits' (scikit-learn), 'random' (Gaussian), a directory of class folders (its val/ "
        "or test/ subfolder if present) or an .npz file of uint8 images (N, H, W, 3) under x_test, x or images",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument(
        "--layers", nargs="+", default="auto", metavar="PATTERN", help="layer names or glob patterns (default: auto)"
    )
    parser.add_argument(
        "--reference-layers", nargs="+", default="auto", metavar="PATTERN", help="layers of the reference"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size of the CKA estimator (>= 4)")
    parser.add_argument("--num-examples", type=int, default=1024, help="probe images, a seeded sample (default 1024)")
    parser.add_argument("--image-size", type=int, help="resize to this size (default: the model's input size)")
    parser.add_argument(
        "--mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalization mean of the training run (default: the model's pretrained_cfg mean)",
    )
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalization std, likewise")
    parser.add_argument(
        "--model-kwargs", type=_json_object, default={}, metavar="JSON", help="timm.create_model kwargs as JSON"
    )
    parser.add_argument(
        "--reference-kwargs", type=_json_object, default={}, metavar="JSON", help="the same for the reference"
    )
    parser.add_argument(
        "--weights", metavar="FILE", help="a state dict or checkpoint file for --model given as a timm name"
    )
    parser.add_argument("--reference-weights", metavar="FILE", help="the same for --reference")
    parser.add_argument("--pretrained", action="store_true", help="download timm's pretrained --model weights")
    parser.add_argument("--reference-pretrained", action="store_true", help="the same for --reference")
    parser.add_argument("--reduction", choices=REDUCTIONS, default="flatten", help="what a layer output becomes")
    parser.add_argument("--reference-reduction", choices=REDUCTIONS, help="the same for the reference")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe sample (default 0)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for an image directory")
    _add_local_threshold(parser)
    parser.set_defaults(handler=_analyze)


def _add_summary(commands: Any) -> None:
    help_ = "text summary of a run's probes"
    parser = commands.add_parser(
        "summary",
        help=help_,
        description=f"{_sentence(help_)}: steps, epochs, probe size, layers and per probe the headline scalars.",
    )
    parser.add_argument("run", metavar="RUN", help="log directory, its cka/ folder or a .npz file")
    _add_local_threshold(parser)
    parser.set_defaults(handler=_summary)


def _add_local_threshold(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--local-threshold",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="a head is local when its mean attention distance is below this fraction of the distance of uniform "
        "attention over the patch grid (default 0.5, CKAMonitor's default)",
    )


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _step(text: str) -> int | str:
    if text == "last":
        return text
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer step or 'last', got {text!r}") from err


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_classes\": 10}}', got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------------- summary


def _summary(args: argparse.Namespace) -> None:
    print("\n".join(summary_lines(read_run(args.run), args.local_threshold)))


def summary_lines(run: Run, fraction: float = 0.5) -> list[str]:
    """The text summary of a run: what was probed, then one row of headline numbers per probe.

    Args:
        run: the run.
        fraction: a head is local below this fraction of the uniform-attention distance.
    """
    last = run.probes[run.steps[-1]]
    epochs = sorted({p.epoch for p in run.probes.values()})
    heads = last.mean_attention_distance.shape[1] if last.mean_attention_distance.size else 0
    lines = [
        f"run          {run.path} ({len(run.probes)} probe{'s' * (len(run.probes) > 1)} in {run.folder})",
        f"steps        {_few(run.steps)}" + (" (-1: not from training)" if -1 in run.probes else ""),
        f"epochs       {_few(epochs)}",
        f"examples     {', '.join(str(n) for n in sorted({p.num_examples for p in run.probes.values()}))}",
        f"layers       {_names(last.layers)}",
        f"reference    {_names(last.reference_layers)}",
        f"attention    {_names(last.attention_layers)}" + (f", {heads} heads" if heads else ""),
        f"local heads  {_threshold_text(local_threshold(last, fraction))}",
        "",
        "  step  epoch  CKA off-diag  CKA adjacent  best ref CKA  first attn px  last attn px  local heads",
    ]
    for step in run.steps:
        probe = run.probes[step]
        h = headline(probe, local_threshold(probe, fraction))
        lines.append(
            f"{step:>6} {probe.epoch:>6} {_num(h['offdiag'], 13)} {_num(h['adjacent'], 13)} {_num(h['ref_best'], 13)}"
            f" {_num(h['attn_first'], 14, '.1f')} {_num(h['attn_last'], 13, '.1f')} {_num(h['local'], 12, '.2f')}"
        )
    return lines


def headline(result: CKAResult, threshold: float | None) -> dict[str, float]:
    """One probe's headline numbers; NaN where the probe lacks the parts.

    Keys: ``offdiag`` (mean off-diagonal intra CKA), ``adjacent`` (mean CKA of consecutive layers), ``ref_best``
    (mean over layers of the best CKA with any reference layer), ``attn_first`` / ``attn_last`` (mean distance of the
    first / last attention layer over its heads, pixels) and ``local`` (fraction of all heads below ``threshold``).
    """
    intra, distances = result.intra, result.mean_attention_distance
    off_diagonal = intra[~np.eye(len(intra), dtype=bool)]
    best = np.array([row[np.isfinite(row)].max() for row in result.reference if np.isfinite(row).any()])
    finite = distances[np.isfinite(distances)]
    return {
        "offdiag": _nanmean(off_diagonal),
        "adjacent": _nanmean(np.diagonal(intra, offset=1)),
        "ref_best": _nanmean(best),
        "attn_first": _nanmean(distances[0]) if distances.size else float("nan"),
        "attn_last": _nanmean(distances[-1]) if distances.size else float("nan"),
        "local": float((finite < threshold).mean()) if threshold and finite.size else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------- compare


def _compare(args: argparse.Namespace) -> None:
    runs = [read_run(path) for path in (args.run_a, args.run_b)]
    a, b = select_probes(*runs, args.step)
    if a.layers != b.layers:
        raise CLIError(f"the runs monitor different layers: A has {_names(a.layers)}; B has {_names(b.layers)}.")
    if a.attention_layers and b.attention_layers and a.attention_layers != b.attention_layers:
        raise CLIError(
            f"the runs have different attention layers: A has {_names(a.attention_layers)}; "
            f"B has {_names(b.attention_layers)}."
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
                f"{a.path} (steps {_few(a.steps)}) and {b.path} (steps {_few(b.steps)}) have no step in common; "
                "pass --step, or one probe's .npz file."
            )
        step = max(common)
    elif step != "last" and not directories:
        raise CLIError("--step picks a probe of a run directory, but both runs are single .npz files.")
    for run in directories:
        if step not in run.probes:
            raise CLIError(f"step {step} is not in {run.path} (its steps: {_few(run.steps)}).")
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
        local = _threshold_text(thresholds[0])
        if thresholds[0] != thresholds[1]:
            local = f"A {local}, B {_threshold_text(thresholds[1])}"
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
        lines.append(f"{name:<{width}}  {_nanmean(row):+9.3f}  {abs(row[j]):10.3f}  {others[j]}")
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


# ----------------------------------------------------------------------------------------------------------- analyze


def _analyze(args: argparse.Namespace) -> None:
    # The unbiased CKA estimator needs at least 4 images per minibatch, hence in the probe too.
    for option, value, least in (
        ("--batch-size", args.batch_size, 4),
        ("--num-examples", args.num_examples, 4),
        ("--image-size", args.image_size or 1, 1),
        ("--num-workers", args.num_workers, 0),
    ):
        if value < least:
            raise CLIError(f"{option} must be at least {least}, got {value}.")
    device = _device(args.device)
    model = load_model(args.model, args.weights, args.pretrained, args.model_kwargs, "--model").to(device)
    reference = None
    if args.reference:
        reference = load_model(
            args.reference, args.reference_weights, args.reference_pretrained, args.reference_kwargs, "--reference"
        ).to(device)
    size, mean, std = input_config(model, args.image_size, args.mean, args.std)
    probe = probe_images(args.data, args.num_examples, size, mean, std, args.batch_size, args.seed, args.num_workers)
    models = args.model + (f" and {args.reference}" if args.reference else "")
    print(f"probing {models} on {probe.description}, resized to {size[0]}x{size[1]}")
    try:
        result = compare_models(
            model,
            reference,
            data=probe.batches,
            layers_a=args.layers,
            layers_b=args.reference_layers,
            batch_size=args.batch_size,
            reduction=args.reduction,
            reduction_b=args.reference_reduction,
        )
    except (ValueError, RuntimeError, AssertionError, OSError) as err:  # timm asserts the input size
        raise CLIError(f"the analysis failed: {err}") from err
    try:
        written = [result.save(args.out / ANALYSIS_FILE)]
        thresholds = [local_threshold(result, args.local_threshold, of_reference) for of_reference in (False, True)]
        written += _write_figures(result, thresholds, args.out)
    except OSError as err:
        raise CLIError(f"cannot write to --out {args.out}: {err}") from err
    run = read_run(args.out)
    print("\n".join(summary_lines(run)))
    print("\nwrote " + ", ".join(str(path) for path in written))


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here.")
    return device


def _write_figures(result: CKAResult, thresholds: Sequence[float | None], out: Path) -> list[Path]:
    """The analysis pictures; ``thresholds`` are the local-head thresholds of the model and the reference."""
    figures = {"cka_intra.png": cka_heatmap(result.intra, result.layers, result.layers, title="CKA within the model")}
    if result.reference.size:
        figures["cka_reference.png"] = cka_heatmap(
            result.reference,
            result.layers,
            result.reference_layers,
            title="CKA with the reference",
            row_label="model layer",
            col_label="reference layer",
        )
        figures["cka_reference_intra.png"] = cka_heatmap(
            result.reference_intra, result.reference_layers, result.reference_layers, title="CKA within the reference"
        )
    distances = {
        "attention_distance.png": (result.mean_attention_distance, result.attention_layers, "model"),
        "attention_distance_reference.png": (
            result.reference_mean_attention_distance,
            result.reference_attention_layers,
            "reference",
        ),
    }
    for (name, (values, layers, who)), threshold in zip(distances.items(), thresholds, strict=True):
        if values.size:
            fig, ax = attention_distance_plot(
                values, layers, title=f"mean attention distance per head, {who}", local_threshold=threshold
            )
            ax.set_ylim(0, max(float(np.nanmax(values)), 2 * (threshold or 0)) * 1.1)  # keep the threshold in view
            figures[name] = fig, ax
    for name, (fig, _) in figures.items():
        fig.savefig(out / name, dpi=120)
    return [out / name for name in figures]


# ----------------------------------------------------------------------------------------------------------- helpers


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _num(value: float, width: int, spec: str = ".3f") -> str:
    return f"{'-' if np.isnan(value) else format(value, spec):>{width}}"


def _few(values: Sequence[int], limit: int = 8) -> str:
    """``0, 1, 2`` or, for long lists, ``0, 100, 200, ..., 900, 1000``."""
    shown = [str(v) for v in values]
    if len(shown) > limit:
        shown = [*shown[:3], "...", *shown[-2:]]
    return ", ".join(shown)


def _names(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = list(names) if len(names) <= 6 else [*names[:3], "...", *names[-2:]]
    return f"{len(names)} ({', '.join(shown)})"


def _threshold_text(threshold: float | None) -> str:
    if threshold is None:
        return "none (no attention distances, or arrays saved before lightning-cka recorded their scale)"
    return f"mean distance below {threshold:.1f} px"


if __name__ == "__main__":
    sys.exit(main())

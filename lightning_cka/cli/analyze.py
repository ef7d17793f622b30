"""``lightning-cka analyze``: the one-shot analysis of trained models, written as a run with one probe."""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_cka.cli.errors import CLIError
from lightning_cka.cli.options import add_local_threshold, json_object, sentence
from lightning_cka.cli.probe_images import input_config, probe_images
from lightning_cka.cli.runs import Run, local_threshold
from lightning_cka.cli.summary import summary_lines
from lightning_cka.compare import compare_models
from lightning_cka.plotting import attention_distance_plot, cka_heatmap
from lightning_cka.reference import load_reference
from lightning_cka.result import CKAResult
from lightning_cka.taps.recorder import REDUCTIONS

ANALYSIS_FILE = "cka/analysis.npz"  # relative to --out: the output is itself a run with one probe


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "one-shot CKA and attention distances of a trained model (and a reference) on probe images"
    parser = commands.add_parser(
        "analyze",
        help=help_,
        description=f"{sentence(help_)}, with compare_models. Writes OUT/{ANALYSIS_FILE} (the layout CKAMonitor "
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
        "--model-kwargs", type=json_object, default={}, metavar="JSON", help="timm.create_model kwargs as JSON"
    )
    parser.add_argument(
        "--reference-kwargs", type=json_object, default={}, metavar="JSON", help="the same for the reference"
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
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
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
    run = Run(path=args.out, folder=(args.out / ANALYSIS_FILE).parent, probes={result.step: result})
    print("\n".join(summary_lines(run, args.local_threshold)))
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
            figures[name] = attention_distance_plot(
                values, layers, title=f"mean attention distance per head, {who}", local_threshold=threshold
            )
    for name, (fig, _) in figures.items():
        fig.savefig(out / name, dpi=120)
    return [out / name for name in figures]


def load_model(spec: str, weights: str | None, pretrained: bool, kwargs: dict[str, Any], option: str) -> nn.Module:
    """A frozen model from a timm name or a Lightning checkpoint whose hyperparameters name it (``timm_name``)."""
    try:
        return load_reference(spec, weights, pretrained, kwargs or None)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        raise CLIError(f"{option} {spec}: {err}") from err

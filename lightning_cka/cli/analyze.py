"""``lightning-cka analyze``: the one-shot analysis of trained models, written as a run with one probe.

A checkpoint of a run that had a ``CKAMonitor`` carries the monitor's settings (layers, reductions, minibatch size,
analyses, reference) and points at the run's saved probe images, so by default ``analyze`` measures exactly what the
monitor measured, on the same images; it says which settings it took and what differs when flags override them.
"""

import argparse
from pathlib import Path
from typing import Any

from lightning_cka.cli.options import add_local_threshold, json_object, sentence

ANALYSIS_FILE = "cka/analysis.npz"  # relative to --out: the output is itself a run with one probe
REDUCTIONS = ("flatten", "cls", "mean")


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "one-shot analysis of a trained model (and a reference) on probe images"
    parser = commands.add_parser(
        "analyze",
        help=help_,
        description=f"{sentence(help_)}, with compare_models. Given a checkpoint of a run with CKAMonitor, it uses "
        "the monitor's settings and saved probe images unless flags say otherwise. Writes OUT/"
        f"{ANALYSIS_FILE} (the layout CKAMonitor writes, step -1, so 'compare', 'summary' and 'plot' read OUT "
        "as a run) "
        "and one PNG per figure in OUT.",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_CHECKPOINT",
        help="a timm model name, or a Lightning checkpoint whose hyperparameters hold timm_name (and timm_kwargs)",
    )
    parser.add_argument(
        "--reference", metavar="NAME_OR_CHECKPOINT", help="a model to compare with (default: the run's)"
    )
    parser.add_argument(
        "--data",
        help="probe images (default: the run's saved probe): 'digits' (scikit-learn, all 1797 images, training "
        "images included), 'random' (Gaussian), a directory of class folders (its val/ or test/ subfolder if "
        "present) or an .npz file of uint8 images (N, H, W, 3) under x_test, x or images",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--monitor", metavar="NAME", help="which named monitor's settings to use (several in a run)")
    parser.add_argument("--layers", nargs="+", metavar="PATTERN", help="layer names or glob patterns")
    parser.add_argument("--reference-layers", nargs="+", metavar="PATTERN", help="layers of the reference")
    parser.add_argument("--batch-size", type=int, help="minibatch size of the CKA estimator (>= 4)")
    parser.add_argument("--num-examples", type=int, default=1024, help="images drawn from --data (default 1024)")
    parser.add_argument("--image-size", type=int, help="resize --data to this size (default: the model's input size)")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="normalization mean for --data")
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalization std for --data")
    parser.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON", help="timm.create_model kwargs")
    parser.add_argument("--reference-kwargs", type=json_object, default={}, metavar="JSON", help="the same, reference")
    parser.add_argument("--weights", metavar="FILE", help="a state dict or checkpoint for --model given as a timm name")
    parser.add_argument("--reference-weights", metavar="FILE", help="the same for --reference")
    parser.add_argument("--pretrained", action="store_true", help="download timm's pretrained --model weights")
    parser.add_argument("--reference-pretrained", action="store_true", help="the same for --reference")
    parser.add_argument("--reduction", choices=REDUCTIONS, help="what a layer output becomes")
    parser.add_argument("--reference-reduction", choices=REDUCTIONS, help="the same for the reference")
    parser.add_argument(
        "--analyses",
        nargs="+",
        metavar="NAME",
        help="the analyses to run, by name ('default' for the default ones; e.g. --analyses default linear_probe); "
        "default: the run's analyses with the options it ran them with",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --data sample (default 0)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for an image directory")
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
    from lightning_cka.cli.errors import CLIError

    for option, value, least in (
        ("--batch-size", args.batch_size or 4, 4),
        ("--num-examples", args.num_examples, 4),
        ("--image-size", args.image_size or 1, 1),
        ("--num-workers", args.num_workers, 0),
    ):
        if value < least:
            raise CLIError(f"{option} must be at least {least}, got {value}.")
    device = _device(args.device)
    monitor = monitor_settings(Path(args.model), args.monitor) if Path(args.model).is_file() else None
    settings = monitor.settings if monitor else {}
    chosen, notes = _choose(args, settings)
    for line in notes:
        print(line)
    model = load_model(args.model, args.weights, args.pretrained, args.model_kwargs, "--model").to(device)
    reference = None
    if chosen["reference"]:
        reference = load_model(
            chosen["reference"],
            chosen["reference_weights"],
            args.reference_pretrained,
            args.reference_kwargs,
            "--reference",
        ).to(device)
    data, description = _probe(args, model, monitor, chosen["batch_size"])
    print(
        f"probing {args.model}" + (f" and {chosen['reference']}" if reference is not None else "") + f" on "
        f"{description}"
    )
    result = _analyze(model, reference, data, chosen, _analyses(args, monitor))
    try:
        written = [result.save(args.out / ANALYSIS_FILE)]
        written += _write_figures(result, args)
    except OSError as err:
        raise CLIError(f"cannot write to --out {args.out}: {err}") from err
    from lightning_cka.cli.runs import read_run
    from lightning_cka.cli.summary import summary_lines

    print("\n".join(summary_lines(read_run(args.out), args.local_threshold)))
    print("\nwrote " + ", ".join(str(path) for path in written))


class MonitorSettings:
    """What a checkpoint says about the ``CKAMonitor`` of its run: its settings, analyses and probe images."""

    def __init__(self, checkpoint: Path, state: dict[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.settings: dict[str, Any] = _current_settings(dict(state.get("settings") or {}))
        self.analyses: list[dict[str, Any]] | None = state.get("analyses")
        self.probe_hash = state.get("probe_hash")
        name = self.settings.get("name") or ""
        candidates = []
        if state.get("array_dir"):
            candidates.append(Path(state["array_dir"]) / "probe.npz")
        candidates.append(checkpoint.parent.parent / "cka" / name / "probe.npz")  # <log_dir>/checkpoints/x.ckpt
        self.probe_file = next((p for p in candidates if p.is_file()), None)


def _current_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as this version stores them: older monitors kept the reference's options as flat keys."""
    if isinstance(settings.get("reference"), dict) or "reference_weights" not in settings:
        return settings
    reference = settings.get("reference")
    settings["reference"] = None
    if isinstance(reference, str):
        settings["reference"] = {
            "model": reference,
            "weights": settings.get("reference_weights"),
            "layers": settings.get("reference_layers", "auto"),
            "reduction": settings.get("reference_reduction"),
        }
    return settings


def monitor_settings(checkpoint: Path, name: str | None) -> MonitorSettings | None:
    """The settings of the checkpoint's ``CKAMonitor`` (``name`` picks one of several), or ``None``."""
    import torch

    from lightning_cka.cli.errors import CLIError

    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CLIError(f"--model {checkpoint} cannot be read as a checkpoint ({type(err).__name__}: {err}).") from err
    callbacks = content.get("callbacks") if isinstance(content, dict) else None
    states = [s for key, s in (callbacks or {}).items() if str(key).startswith("CKAMonitor") and isinstance(s, dict)]
    states = [s for s in states if isinstance(s.get("settings"), dict)]  # monitors older than 0.2 saved none
    if name is not None:
        states = [s for s in states if s["settings"].get("name") == name]
        if not states:
            raise CLIError(f"--monitor {name}: {checkpoint} has no CKAMonitor of that name.")
    if len(states) > 1:
        names = ", ".join(str(s["settings"].get("name")) for s in states)
        raise CLIError(f"{checkpoint} holds the settings of several monitors ({names}); pick one with --monitor NAME.")
    return MonitorSettings(checkpoint, states[0]) if states else None


def _choose(args: argparse.Namespace, settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The settings to run with: flags first, then the monitor's, then the defaults; and lines that say which."""
    run_reference = settings.get("reference") or {}
    reference = run_reference.get("model") if isinstance(run_reference.get("model"), str) else None
    if reference is not None and reference.startswith("<"):  # a module passed in: nothing to rebuild it from
        reference = None
    weights = run_reference.get("weights")
    notes = []
    if reference and not weights and not Path(reference).is_file() and args.reference is None:
        notes.append(
            f"note: the run's reference {reference} was an untrained timm model whose random weights were not saved; "
            "its cross-model CKA cannot be reproduced, so this analysis has no reference (pass --reference)."
        )
        reference = None
    flags = {
        "layers": args.layers,
        "reduction": args.reduction,
        "reference": args.reference,
        "reference_weights": args.reference_weights,
        "reference_layers": args.reference_layers,
        "reference_reduction": args.reference_reduction,
        "batch_size": args.batch_size,
    }
    monitor = {
        "layers": settings.get("layers"),
        "reduction": settings.get("reduction"),
        "reference": reference,
        "reference_weights": weights if reference else None,
        "reference_layers": run_reference.get("layers"),
        "reference_reduction": run_reference.get("reduction"),
        "batch_size": settings.get("batch_size"),
    }
    defaults = {
        "layers": "auto",
        "reduction": "flatten",
        "reference": None,
        "reference_weights": None,
        "reference_layers": "auto",
        "reference_reduction": None,
        "batch_size": 128,
    }
    chosen = {key: _first(flags[key], monitor[key], defaults[key]) for key in flags}
    if settings:
        taken = [
            f"{key.replace('_', ' ')} {monitor[key]}"
            for key in ("layers", "reduction", "batch_size")
            if flags[key] is None and monitor[key] is not None
        ]
        notes.append(f"using the monitor's settings from {args.model}: {', '.join(taken) or 'none of its settings'}")
        differs = [
            f"{key.replace('_', ' ')} {flags[key]} (the run's: {monitor[key]})"
            for key in flags
            if flags[key] is not None and monitor[key] is not None and flags[key] != monitor[key]
        ]
        if differs:
            notes.append(f"differs from the run: {'; '.join(differs)}; these numbers are not comparable with its logs")
    return chosen, notes


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _analyses(args: argparse.Namespace, monitor: "MonitorSettings | None") -> list[Any]:
    """The analyses to run: ``--analyses`` by name, else the run's, rebuilt with the options it stored."""
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.engine.analysis import UnresolvedAnalysis, from_record

    if args.analyses is not None:
        return list(args.analyses)
    if monitor is None or not monitor.analyses:
        return ["default"]
    analyses = [from_record(record) for record in monitor.analyses]
    unresolved = [a for a in analyses if isinstance(a, UnresolvedAnalysis)]
    if unresolved:
        raise CLIError(
            "the run's analyses "
            + "; ".join(f"{a.name} ({a.record.get('class')}: {a.reason})" for a in unresolved)
            + " cannot be rebuilt here: make their modules importable (PYTHONPATH) or choose --analyses."
        )
    return analyses


def _probe(args: argparse.Namespace, model: Any, monitor: MonitorSettings | None, batch_size: int) -> tuple[Any, str]:
    """The probe data (a tensor, a dataset or minibatches) and what it is."""
    from torch.utils.data import TensorDataset

    from lightning_cka.cli.errors import CLIError
    from lightning_cka.probe_data.images import input_config, probe_images
    from lightning_cka.probe_data.sample import load_probe

    if args.data is None:
        if monitor is None or monitor.probe_file is None:
            where = "" if monitor is None else f" (looked for {monitor.checkpoint.parent.parent / 'cka'}/probe.npz)"
            raise CLIError(f"no --data given and no probe images saved with the run{where}: pass --data.")
        try:
            probe = load_probe(monitor.probe_file)
        except ValueError as err:
            raise CLIError(str(err)) from err
        data = probe.images if probe.labels is None else TensorDataset(probe.images, probe.labels)
        return data, f"the run's {probe.images.shape[0]} probe images ({monitor.probe_file})"
    try:
        size, mean, std = input_config(model, args.image_size, args.mean, args.std)
        source = probe_images(args.data, args.num_examples, size, mean, std, batch_size, args.seed, args.num_workers)
    except ValueError as err:
        raise CLIError(str(err)) from err
    if monitor is not None:
        print("note: --data replaces the run's saved probe images: the numbers are not those the monitor logged.")
    return source.batches, f"{source.description}, resized to {size[0]}x{size[1]}"


def _analyze(model: Any, reference: Any, data: Any, chosen: dict[str, Any], analyses: list[Any]) -> Any:
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.compare import compare_models

    try:
        return compare_models(
            model,
            reference,
            data=data,
            analyses=analyses,
            layers_a=chosen["layers"],
            layers_b=chosen["reference_layers"],
            batch_size=chosen["batch_size"],
            reduction=chosen["reduction"],
            reduction_b=chosen["reference_reduction"],
            label_b=str(chosen["reference"] or ""),
        )
    except (ValueError, RuntimeError, AssertionError, OSError, TypeError) as err:  # timm asserts the input size
        raise CLIError(f"the analysis failed: {err}") from err


def _write_figures(result: Any, args: argparse.Namespace) -> list[Path]:
    from lightning_cka.engine.analysis import View
    from lightning_cka.figures.render import draw_figure

    written = []
    for figure in result.figures(None, View(run=str(args.out), local_threshold=args.local_threshold)):
        path = args.out / f"{figure.tag.replace('/', '_')}.png"
        draw_figure(figure).fig.savefig(path, dpi=120)
        written.append(path)
    return written


def _device(name: str) -> Any:
    import torch

    from lightning_cka.cli.errors import CLIError

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here.")
    return device


def load_model(spec: str, weights: str | None, pretrained: bool, kwargs: dict[str, Any], option: str) -> Any:
    """A frozen model from a timm name or a Lightning checkpoint whose hyperparameters name it (``timm_name``)."""
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.reference import load_reference

    try:
        return load_reference(spec, weights, pretrained, kwargs or None)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        raise CLIError(f"{option} {spec}: {err}") from err

"""``lightning-cka plot RUN --out DIR``: every figure of one probe as print-quality files (the thesis use)."""

import argparse
from pathlib import Path
from typing import Any

from lightning_cka.cli.options import RUN_HELP, add_local_threshold, sentence, step

FORMATS = ("png", "pdf", "svg")
MIN_DPI, MAX_DPI = 10, 1200  # a 5.2-inch figure at 1200 dpi is 6240 pixels wide


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "write every figure of one probe as PNG, PDF or SVG files"
    parser = commands.add_parser(
        "plot",
        help=help_,
        description=f"{sentence(help_)}: the pictures the monitor logs to TensorBoard (the same figures), at print "
        "quality, one file per figure named after its tag (cka/intra -> cka_intra.pdf), and, when the run has a "
        "reference, figure_1: the paper's Figure 1 layout (the model's CKA heatmap, the reference's beside it, and the "
        "two crossed) at any step.",
    )
    parser.add_argument("run", metavar="RUN", help=RUN_HELP)
    parser.add_argument("--step", type=step, default="last", help="the probe's global step (default: the last)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder of the files")
    parser.add_argument(
        "--format", nargs="+", choices=FORMATS, default=["png"], help="file formats (default: png); several allowed"
    )
    parser.add_argument(
        "--dpi", type=int, default=300, help=f"resolution of PNG files, {MIN_DPI} to {MAX_DPI} (default: 300)"
    )
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.cli.runs import check_unread, read_run
    from lightning_cka.engine.analysis import View
    from lightning_cka.figures.figure_one import TAGS, draw_figure_one, figure_one_specs
    from lightning_cka.figures.render import draw_figure

    if not MIN_DPI <= args.dpi <= MAX_DPI:
        raise CLIError(f"--dpi must be between {MIN_DPI} and {MAX_DPI} (print quality is 300-600), got {args.dpi}.")
    run = read_run(args.run, lazy=True)  # reads only the probe drawn and the one before it
    result = run.probe(args.step)
    earlier = [s for s in run.steps if s < result.step] if not run.single_file else []
    previous = next((run.probes[s] for s in reversed(earlier) if s in run.probes), None)
    check_unread(run)  # the other files: headers only, to report damaged ones
    view = View(run=result.run or run.label, local_threshold=args.local_threshold)
    figures = result.figures(previous, view)
    if not figures:
        raise CLIError(f"step {result.step} of {args.run} holds nothing to draw.")
    drawings = [(figure.tag.replace("/", "_"), draw_figure(figure).fig) for figure in figures]
    if len(figure_one_specs(result, view)) == len(TAGS):  # the paper's Figure 1 layout, one print-ready picture
        drawings.append(("figure_1", draw_figure_one(result, view)))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for stem, fig in drawings:
            for fmt in args.format:
                path = args.out / f"{stem}.{fmt}"
                fig.savefig(path, dpi=args.dpi)
                written.append(path)
    except OSError as err:
        raise CLIError(f"cannot write to --out {args.out}: {err}") from err
    print(f"step {result.step} of {run.spec}: wrote {len(written)} files to {args.out}")
    print("\n".join(f"  {path.name}" for path in written))

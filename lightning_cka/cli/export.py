"""``lightning-cka export RUN``: the dashboard's TensorBoard data for a run's probe files (runs logged before 0.2)."""

import argparse
from pathlib import Path
from typing import Any

from lightning_cka.cli.options import RUN_HELP, add_local_threshold, sentence


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "write the CKA dashboard's data for a run from its probe files"
    parser = commands.add_parser(
        "export",
        help=help_,
        description=f"{sentence(help_)}: runs logged by lightning-cka 0.1 (or with log_images=False) have .npz "
        "files but no dashboard data; this writes the figures of every probe as TensorBoard tensor summaries into "
        "an event file in the run's log directory (or --logdir), so the CKA tab shows the run.",
    )
    parser.add_argument("run", metavar="RUN", nargs="+", help=f"{RUN_HELP}; several RUNs are read as one run")
    parser.add_argument("--logdir", type=Path, help="where to write the event file (default: the run's log directory)")
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_cka.cli.errors import CLIError
    from lightning_cka.cli.runs import read_run
    from lightning_cka.dashboard.summaries import write_figures
    from lightning_cka.engine.analysis import View

    run = read_run(",".join(args.run))
    folder = run.folders[-1]
    logdir = args.logdir or (folder.parent if folder.name == "cka" else folder.parent.parent)
    view = View(run=run.label, local_threshold=args.local_threshold)
    try:
        writer = SummaryWriter(str(logdir), filename_suffix=".lightning_cka_export")
    except OSError as err:
        raise CLIError(f"cannot write to {logdir}: {err}") from err
    previous = None
    count = 0
    with writer:
        for step in run.steps:
            result = run.probes[step]
            figures = result.figures(previous, View(run=result.run or view.run, local_threshold=view.local_threshold))
            write_figures(writer, figures, step)
            count += len(figures)
            previous = result
    print(f"wrote {count} figures of {len(run.steps)} probes to {logdir}: tensorboard --logdir {logdir}")

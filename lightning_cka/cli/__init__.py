"""The ``lightning-cka`` command line: compare runs or groups of runs, summarize, plot, analyze checkpoints.

Every failure the user can fix (a bad path, a run without arrays, a missing step, runs with different layers or
probes, a bad model or data source) is one line on stderr, ``lightning-cka: error: ...``, and exit status 2. The
subcommand modules import torch, matplotlib and the analyses only when they run, so ``--help`` answers at once.
"""

import argparse
import sys
from collections.abc import Sequence

from lightning_cka.cli import analyze, compare, export, plot, report, summary
from lightning_cka.cli.errors import CLIError


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
        if args.local_threshold is not None and not 0 < args.local_threshold <= 1:  # every command takes it
            raise CLIError(f"--local-threshold is a fraction in (0, 1], got {args.local_threshold}.")
        args.handler(args)
    except CLIError as err:
        print(f"lightning-cka: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="lightning-cka",
        description="Minibatch CKA with error bars, ViT attention distances and the other analyses of Raghu et al. "
        "2021, for training runs logged by CKAMonitor and for trained checkpoints.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for module in (summary, compare, plot, analyze, export, report):
        module.add_command(commands)
    return parser

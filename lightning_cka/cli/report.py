"""``lightning-cka report RUN [--vs RUN ...]``: what the runs show of the paper's findings, as HTML and Markdown."""

import argparse
import json
from pathlib import Path
from typing import Any

from lightning_cka.cli.options import RUN_HELP, add_local_threshold, fraction, sentence

MIN_DPI, MAX_DPI = 50, 600


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "write a report of what the runs show of the paper's findings, with verdicts, numbers and figures"
    parser = commands.add_parser(
        "report",
        help=help_,
        description=f"{sentence(help_)}: one HTML file that opens offline and a Markdown file with its pictures "
        "beside it. 'report RUN' reads one run (or 'report SEED1 SEED2 SEED3' the seeds of one setup); 'report A1 A2 "
        "--vs B1 B2' sets two groups against each other (small against large data, say), with the differences of "
        "their headline numbers tested over the seeds.",
    )
    parser.add_argument("runs", metavar="RUN", nargs="+", help=f"side A: one run or its seeds ({RUN_HELP})")
    parser.add_argument("--vs", nargs="+", metavar="RUN", help="side B: one run or several seeds")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="names of the sides (one, or two with --vs)")
    parser.add_argument(
        "--reference-run",
        metavar="RUN",
        help="the reference model's own training run (the CNN the runs were compared with): its probes are added "
        "as a section of their own",
    )
    parser.add_argument(
        "--criteria",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="override criteria of the verdicts (cka.far_alike=0.6), or a JSON file of them; the report's appendix "
        "and docs/report.md list them",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), metavar="FILE", help="the HTML file (default: report.html)"
    )
    parser.add_argument("--no-markdown", action="store_true", help="write only the HTML file")
    parser.add_argument("--title", help="the report's title (default: the sides' labels)")
    parser.add_argument(
        "--alpha", type=fraction, default=0.05, help="significance level and false discovery rate (default 0.05)"
    )
    parser.add_argument(
        "--dpi", type=int, default=110, help=f"resolution of the pictures, {MIN_DPI} to {MAX_DPI} (default: 110)"
    )
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.cli.runs import read_run
    from lightning_cka.findings import RunProbes, Side
    from lightning_cka.report import build_report, write_report

    if not MIN_DPI <= args.dpi <= MAX_DPI:
        raise CLIError(f"--dpi must be between {MIN_DPI} and {MAX_DPI}, got {args.dpi}.")
    if args.out.suffix.lower() not in (".html", ".htm"):
        raise CLIError(f"--out is the HTML file (report.html), got {args.out}.")
    specs = [args.runs] if args.vs is None else [args.runs, args.vs]
    labels = args.labels or []
    if labels and len(labels) != len(specs):
        raise CLIError(f"--labels names each side: give {len(specs)} label(s), got {len(labels)}.")
    sides = []
    for i, group in enumerate(specs):
        runs = [read_run(spec) for spec in group]
        label = labels[i] if labels else _side_label(runs, "AB"[i] if len(specs) == 2 else "")
        sides.append(Side(label, [RunProbes(run.label, run.probes) for run in runs]))
    if len(sides) == 2 and sides[0].label == sides[1].label:
        raise CLIError(f"both sides are called {sides[0].label!r}: name them with --labels A B.")
    reference = None
    if args.reference_run:
        run = read_run(args.reference_run)
        reference = RunProbes(run.label, run.probes)
    try:
        report = build_report(
            sides,
            criteria=_criteria(args.criteria),
            title=args.title or "",
            alpha=args.alpha,
            reference_run=reference,
            local_threshold=args.local_threshold,
        )
    except ValueError as err:
        raise CLIError(str(err)) from err
    try:
        written = write_report(report, args.out, markdown=not args.no_markdown, dpi=args.dpi)
    except OSError as err:
        raise CLIError(f"cannot write the report to {args.out}: {err}") from err
    tally = ", ".join(f"{count} {verdict}" for verdict, count in report.tally().items() if count)
    print(f"{len(report.findings)} findings ({tally}), {len(report.events)} events: wrote")
    print("\n".join(f"  {path}" for path in written))


def _side_label(runs: list, letter: str) -> str:
    """A side's name: its one run's label, or the runs' common folder with the number of seeds."""
    if len(runs) == 1:
        return f"{letter}: {runs[0].label}" if letter else runs[0].label
    names = [run.label.split("/")[0] for run in runs]
    common = names[0]
    while common and not all(name.startswith(common) for name in names):
        common = common[:-1]
    common = common.rstrip("-_ ") or "runs"
    return f"{letter + ': ' if letter else ''}{common} ({len(runs)} runs)"


def _criteria(items: list[str]) -> dict[str, float]:
    """``NAME=VALUE`` pairs and JSON files of them, as one mapping (later ones win)."""
    from lightning_cka.cli.errors import CLIError

    out: dict[str, float] = {}
    for item in items:
        if "=" not in item:
            path = Path(item)
            try:
                loaded = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise CLIError(f"--criteria {item}: not NAME=VALUE and not a readable JSON file ({err}).") from err
            if not isinstance(loaded, dict):
                raise CLIError(f"--criteria {item}: the JSON file must hold an object of name: value.")
            out.update(loaded)
            continue
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError as err:
            raise CLIError(f"--criteria {item}: the value must be a number.") from err
    return out

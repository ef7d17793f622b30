"""``lightning-cka summary RUN``: what a run probed, and one row of headline numbers per probe."""

import argparse
from typing import Any

from lightning_cka.cli.options import RUN_HELP, add_local_threshold, sentence


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "text summary of a run's probes (or the list of runs below a folder)"
    parser = commands.add_parser(
        "summary",
        help=help_,
        description=f"{sentence(help_)}: steps, epochs, probe, layers and per probe the headline numbers with their "
        "jackknife standard errors.",
    )
    parser.add_argument("run", metavar="RUN", nargs="+", help=f"{RUN_HELP}; several RUNs are read as one run")
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
    from lightning_cka.cli.errors import NoProbesHere
    from lightning_cka.cli.runs import read_run

    try:
        run = read_run(",".join(args.run))
    except NoProbesHere as parent:
        print(f"{','.join(args.run)} holds no probe arrays itself; the runs below it:")
        print("\n".join(f"  {folder}  ({count} probe{'s' * (count > 1)})" for folder, count in parent.below))
        return
    print("\n".join(summary_lines(run, args.local_threshold)))


def summary_lines(run: Any, fraction: float | None = None) -> list[str]:
    """The text summary of a run: what was probed, then one row of headline numbers per probe.

    Args:
        run: a :class:`lightning_cka.cli.runs.Run`.
        fraction: a head is local below this fraction of the uniform-attention distance (default: the run's own).
    """
    from lightning_cka.cli.headline import headline, plus_minus
    from lightning_cka.cli.text import few, name_list, threshold_text
    from lightning_cka.engine.analysis import View

    view = View(run=run.label, local_threshold=fraction)
    last = run.probes[run.steps[-1]]
    attention = last.analysis("attention")
    fraction = fraction if fraction is not None else getattr(attention, "local_threshold", 0.5)
    epochs = sorted({p.epoch for p in run.probes.values()})
    heads = last.mean_attention_distance.shape[1] if last.mean_attention_distance is not None else 0
    uniform = last.uniform_attention_distance
    folders = ", ".join(str(f) for f in run.folders)
    lines = [
        f"run          {run.spec} ({len(run.probes)} probe{'s' * (len(run.probes) > 1)} in {folders})",
        f"steps        {few(run.steps)}" + (" (-1: not from training)" if -1 in run.probes else ""),
        f"epochs       {few(epochs)}",
        f"probe        {last.num_examples} images"
        + (f", {last.num_minibatches} minibatches" if last.num_minibatches else "")
        + (f", hash {last.probe_hash[:12]}" if last.probe_hash else " (identity not recorded: written before 0.2)"),
        f"layers       {name_list(last.layers)}",
        f"reference    {last.reference_label or 'none'}; layers {name_list(last.reference_layers)}",
        f"attention    {name_list(last.attention_layers)}" + (f", {heads} heads" if heads else ""),
        f"local heads  {threshold_text(fraction * uniform if uniform else None)}",
        "",
    ]
    rows = {step: headline(run.probes[step], view) for step in run.steps}
    tags = list(dict.fromkeys(tag for row in rows.values() for tag in row))
    width = max((len(t) for t in tags), default=10)
    lines.append("  step  epoch  " + "  ".join(f"{t:>{max(width, 15)}}" for t in tags))
    for step, row in rows.items():
        cells = "  ".join(plus_minus(*row.get(tag, (float("nan"), float("nan"))), max(width, 15)) for tag in tags)
        lines.append(f"{step:>6} {run.probes[step].epoch:>6}  {cells}")
    lines.append("(± one block-jackknife standard error over the probe's minibatches, where the probe has one)")
    return lines

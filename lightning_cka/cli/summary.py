"""``lightning-cka summary RUN``: what a run probed, and one row of headline numbers per probe."""

import argparse
from typing import Any

import numpy as np

from lightning_cka.cli.options import add_local_threshold, sentence
from lightning_cka.cli.runs import Run, local_threshold, read_run
from lightning_cka.cli.text import few, name_list, num, threshold_text
from lightning_cka.result import CKAResult
from lightning_cka.stats import adjacent_mean, best_matches, nanmean, offdiag_mean


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "text summary of a run's probes"
    parser = commands.add_parser(
        "summary",
        help=help_,
        description=f"{sentence(help_)}: steps, epochs, probe size, layers and per probe the headline scalars.",
    )
    parser.add_argument("run", metavar="RUN", help="log directory, its cka/ folder or a .npz file")
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
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
        f"steps        {few(run.steps)}" + (" (-1: not from training)" if -1 in run.probes else ""),
        f"epochs       {few(epochs)}",
        f"examples     {', '.join(str(n) for n in sorted({p.num_examples for p in run.probes.values()}))}",
        f"layers       {name_list(last.layers)}",
        f"reference    {name_list(last.reference_layers)}",
        f"attention    {name_list(last.attention_layers)}" + (f", {heads} heads" if heads else ""),
        f"local heads  {threshold_text(local_threshold(last, fraction))}",
        "",
        "  step  epoch  CKA off-diag  CKA adjacent  best ref CKA  first attn px  last attn px  local heads",
    ]
    for step in run.steps:
        probe = run.probes[step]
        h = headline(probe, local_threshold(probe, fraction))
        lines.append(
            f"{step:>6} {probe.epoch:>6} {num(h['offdiag'], 13)} {num(h['adjacent'], 13)} {num(h['ref_best'], 13)}"
            f" {num(h['attn_first'], 14, '.1f')} {num(h['attn_last'], 13, '.1f')} {num(h['local'], 12, '.2f')}"
        )
    return lines


def headline(result: CKAResult, threshold: float | None) -> dict[str, float]:
    """One probe's headline numbers; NaN where the probe lacks the parts.

    Keys: ``offdiag`` (mean off-diagonal intra CKA), ``adjacent`` (mean CKA of consecutive layers), ``ref_best``
    (mean over layers of the best CKA with any reference layer), ``attn_first`` / ``attn_last`` (mean distance of the
    first / last attention layer over its heads, pixels) and ``local`` (fraction of all heads below ``threshold``).
    """
    distances = result.mean_attention_distance
    finite = distances[np.isfinite(distances)]
    return {
        "offdiag": offdiag_mean(result.intra),
        "adjacent": adjacent_mean(result.intra),
        "ref_best": nanmean(best_matches(result.reference)[1]) if result.reference.size else float("nan"),
        "attn_first": nanmean(distances[0]) if distances.size else float("nan"),
        "attn_last": nanmean(distances[-1]) if distances.size else float("nan"),
        "local": float((finite < threshold).mean()) if threshold and finite.size else float("nan"),
    }

"""Train one model on a small and on a large part of the training set for the same steps, then compare their CKA.

    python examples/small_vs_large.py                     # digits, 10% vs 100% of the training images
    python examples/small_vs_large.py --seeds 3           # three seeds a side: means, spread, significant differences
    python examples/small_vs_large.py --small 0.02 --model vit_small_patch4 --dataset cifar10 --data-dir data \\
        --max-steps 20000 --accelerator gpu

Raghu et al. 2021 observe that a ViT trained on too little data does not learn local attention in its lower layers;
the comparison figure shows both runs' CKA heatmaps, their difference and their mean attention distances. Flags other
than those below go to examples/train.py, for both runs alike.
"""

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import train

from lightning_cka.cli import main as lightning_cka

SET_BY_THIS_SCRIPT = ("--train-fraction", "--train-size", "--name", "--out", "--summary-json", "--max-epochs", "--seed")


def main(argv: Sequence[str] | None = None) -> Path:
    """Train both sides (``--seeds`` runs each), draw the comparison and print where everything is.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The comparison figure's path.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other flag is passed to examples/train.py for both runs (see docs/examples.md).",
        allow_abbrev=False,  # abbreviations would swallow train.py's flags
    )
    parser.add_argument(
        "--small", type=train.fraction, default=0.1, help="training fraction of the small run (default: 0.1)"
    )
    parser.add_argument(
        "--large", type=train.fraction, default=1.0, help="training fraction of the large run (default: 1.0)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/small_vs_large"),
        help="folder of both runs (default: runs/small_vs_large)",
    )
    parser.add_argument("--step", default="last", help="step to compare (default: last)")
    parser.add_argument(
        "--seeds",
        type=train.positive_int,
        default=1,
        help="runs per side, with seeds 0..N-1 (weights, batch order and subsample); with 2 or more the comparison "
        "shows each side's mean and spread and marks the differences that are significant (default: 1)",
    )
    args, train_args = parser.parse_known_args(argv)
    clashes = sorted({flag.split("=")[0] for flag in train_args} & set(SET_BY_THIS_SCRIPT))
    if clashes:
        parser.error(
            f"{', '.join(clashes)}: set by this script; the two runs differ only in --small / --large and train for "
            "the same --max-steps."
        )
    if args.small >= args.large:
        parser.error(f"--small ({args.small}) must be smaller than --large ({args.large}).")

    runs: dict[str, list[str]] = {"small": [], "large": []}
    labels = []
    total = 2 * args.seeds
    for name, part in (("small", args.small), ("large", args.large)):
        for seed in range(args.seeds):
            print(
                f"run {len(runs['small']) + len(runs['large']) + 1}/{total}: {name} ({part:g} of the training set), "
                f"seed {seed}",
                flush=True,
            )
            run_name = name if args.seeds == 1 else f"{name}-seed{seed}"
            summary = train.main(
                [
                    *train_args,
                    "--train-fraction",
                    str(part),
                    "--name",
                    run_name,
                    "--out",
                    str(args.out),
                    "--seed",
                    str(seed),
                ]
            )
            runs[name].append(summary["log_dir"])
        labels.append(f"{name}, {summary['train_size']} images")
    figure = args.out / "comparison.png"
    command = ["compare", *runs["small"], "--vs", *runs["large"], "--step", args.step, "--out", str(figure)]
    command += ["--labels", *labels]
    status = lightning_cka(command)
    if status:
        sys.exit(status)
    print(f"small runs: {', '.join(runs['small'])}\nlarge runs: {', '.join(runs['large'])}\ncomparison: {figure}")
    print(f"rerun the comparison: {shlex.join(['lightning-cka', *command])}")
    print(f"logs of both: tensorboard --logdir {args.out}")
    return figure


if __name__ == "__main__":
    main()

"""Train one model on a small and on a large part of the training set for the same steps, then compare their CKA.

    python examples/small_vs_large.py                     # digits, 10% vs 100% of the training images
    python examples/small_vs_large.py --seeds 3           # three seeds a side: means, spread, significant differences
    python examples/small_vs_large.py --small 0.02 --model vit_small_patch4 --dataset cifar10 --data-dir data \\
        --max-steps 20000 --accelerator gpu

Raghu et al. 2021 observe that a ViT trained on too little data does not learn local attention in its lower layers;
the comparison figure shows both runs' CKA heatmaps, their difference and their mean attention distances. Flags other
than those below go to examples/train.py, for both runs alike. This is examples/ablate.py with the two sides fixed to
--train-fraction SMALL and --train-fraction LARGE.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import train
from ablate import Side, ablate, check_train_flags, existing

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
    sides = [
        Side(
            name,
            ["--train-fraction", str(part)],
            label=lambda summary, name=name: f"{name}, {summary['train_size']} images",
            description=f"{part:g} of the training set",
        )
        for name, part in (("small", args.small), ("large", args.large))
    ]
    earlier = existing(args.out, sides, args.seeds)
    if earlier:
        parser.error(
            f"{args.out} already holds {', '.join(path.name for path in earlier)} from an earlier comparison: give "
            "another --out, or remove those first."
        )
    check_train_flags([*train_args, *sides[0].flags])
    return ablate(sides, args.seeds, args.out, args.step, train_args)


if __name__ == "__main__":
    main()

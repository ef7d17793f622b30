"""Train two variants of a model (an A/B of examples/train.py flags), N seeds a side, then compare their CKA.

    python examples/ablate.py --a "--no-skip 3" --b "" --labels "no skip in block 3" intact --seeds 3
    python examples/ablate.py --a "--global-pool token" --b "--global-pool avg" --labels CLS GAP --seeds 3
    python examples/ablate.py --a "--cutmix" --b "" --labels CutMix plain --dataset imagefolder --data-dir cifar10 \\
        --max-steps 4000 --cka-every 500 --num-workers 1

Each side's flags come after the common ones (so a side may override them). The runs go to OUT/<side>-seed<k>/
(OUT/<side>/ with one seed), named after the labels; `lightning-cka compare` then draws both groups (means, spread and
the significant differences with 2 or more seeds) into OUT/comparison.png, and `lightning-cka report` writes what the
two groups show of the paper's findings, with verdicts, into OUT/report.html (and report.md). A folder that already
holds any of these is refused: nothing of an earlier ablation is overwritten. Flags other than those below go to
examples/train.py, for every run alike (see docs/examples.md).
"""

import argparse
import json
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import train

from lightning_cka.cli import main as lightning_cka

SET_BY_THIS_SCRIPT = ("--name", "--out", "--summary-json", "--seed")
MANIFEST = "ablation.json"


@dataclass
class Side:
    """One side of an ablation: its run name, the flags it adds to the common ones, and how figures label it.

    ``label`` may be a function of the side's last run summary (``small_vs_large.py`` names its sides by their
    training set size).
    """

    name: str
    flags: list[str]
    label: str | Callable[[dict[str, Any]], str]
    description: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)

    def label_text(self) -> str:
        return self.label(self.runs[-1]) if callable(self.label) else self.label


def run_name(side: Side, seed: int, seeds: int) -> str:
    """``NAME`` with one seed, ``NAME-seedK`` with several."""
    return side.name if seeds == 1 else f"{side.name}-seed{seed}"


def slug(label: str) -> str:
    """A label as a folder name: ``"no skip, block 3"`` -> ``"no_skip_block_3"``, ``"--cutmix 1"`` -> ``"cutmix_1"``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_.-") or "run"


def existing(out: Path, sides: Sequence[Side], seeds: int) -> list[Path]:
    """What an ablation into ``out`` would overwrite or mix with: run folders and the comparison of a former one."""
    paths = [out / run_name(side, seed, seeds) for side in sides for seed in range(seeds)]
    paths += [out / "comparison.png", out / "report.html", out / MANIFEST]
    return [path for path in paths if path.exists()]


def ablate(sides: Sequence[Side], seeds: int, out: Path, step: str, train_args: Sequence[str]) -> Path:
    """Train ``seeds`` runs of each side with ``train.main``, compare the two groups and write a manifest.

    Args:
        sides: the two sides.
        seeds: runs per side, seeds 0 .. seeds - 1.
        out: folder of every run, the figure and ``ablation.json``.
        step: the step to compare (``last`` or a number).
        train_args: flags of ``train.py`` common to every run.

    Returns:
        The comparison figure's path.
    """
    total, done = len(sides) * seeds, 0
    for side in sides:
        for seed in range(seeds):
            done += 1
            described = side.description or (shlex.join(side.flags) or "no extra flags")
            print(f"run {done}/{total}: {side.name} ({described}), seed {seed}", flush=True)
            argv = [*train_args, *side.flags, "--name", run_name(side, seed, seeds), "--out", str(out)]
            side.runs.append(train.main([*argv, "--seed", str(seed)]))
    figure = out / "comparison.png"
    labels = [side.label_text() for side in sides]
    command = ["compare", *[run["log_dir"] for run in sides[0].runs], "--vs"]
    command += [*[run["log_dir"] for run in sides[1].runs], "--step", step, "--out", str(figure), "--labels", *labels]
    report = ["report", *[run["log_dir"] for run in sides[0].runs], "--vs"]
    report += [*[run["log_dir"] for run in sides[1].runs], "--labels", *labels, "--out", str(out / "report.html")]
    manifest = {
        "common_flags": list(train_args),
        "seeds": seeds,
        "sides": [
            {"label": label, "flags": side.flags, "runs": side.runs} for label, side in zip(labels, sides, strict=True)
        ],
        "compare": ["lightning-cka", *command],
        "report": ["lightning-cka", *report],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for cli_args in (command, report):
        status = lightning_cka(cli_args)
        if status:
            sys.exit(status)
    for label, side in zip(labels, sides, strict=True):
        accuracies = [run["test_accuracy"] for run in side.runs]
        spread = f" ± {statistics.stdev(accuracies):.3f} sd" if len(accuracies) > 1 else ""
        runs = ", ".join(run["log_dir"] for run in side.runs)
        print(f"{label}: test accuracy {statistics.mean(accuracies):.3f}{spread} ({runs})")
    print(f"comparison: {figure}\nreport: {out / 'report.html'} (and report.md)\nmanifest: {out / MANIFEST}")
    print(f"rerun the comparison: {shlex.join(['lightning-cka', *command])}")
    print(f"rerun the report: {shlex.join(['lightning-cka', *report])}")
    print(f"logs of both: tensorboard --logdir {out}")
    return figure


def refuse_clashes(parser: argparse.ArgumentParser, flags: Sequence[str], set_here: Sequence[str], where: str) -> None:
    """Stop with an error when ``flags`` hold one of the flags this script sets itself."""
    clashes = sorted({flag.split("=")[0] for flag in flags} & set(set_here))
    if clashes:
        parser.error(f"{', '.join(clashes)} in {where}: set by this script for every run.")


def check_train_flags(flags: Sequence[str]) -> None:
    """Exit as train.py would on a bad flag (status 2, one line naming it), before anything trains."""
    parser = train.build_parser()
    train.check_args(parser, parser.parse_args(flags))


def split_side_values(argv: Sequence[str]) -> list[str]:
    """``--a FLAGS`` as ``--a=FLAGS``, so that a value such as ``--cutmix`` is not read as a flag of its own."""
    joined, items = [], iter(argv)
    for item in items:
        joined.append(f"{item}={next(items, '')}" if item in ("--a", "--b") else item)
    return joined


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other flag is passed to examples/train.py for every run (see docs/examples.md).",
        allow_abbrev=False,  # abbreviations would swallow train.py's flags
    )
    parser.add_argument(
        "--a", required=True, metavar="FLAGS", help='train.py flags of side A, one string: "--no-skip 3"'
    )
    parser.add_argument("--b", required=True, metavar="FLAGS", help='train.py flags of side B ("" for none)')
    parser.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the sides (default: their flags)")
    parser.add_argument(
        "--seeds",
        type=train.positive_int,
        default=1,
        help="runs per side, with seeds 0..N-1 (weights, batch order, subsample); with 2 or more the comparison shows "
        "each side's mean and spread and marks the significant differences (default: 1)",
    )
    parser.add_argument("--out", type=Path, help="folder of every run (default: runs/ablate/<A>_vs_<B>)")
    parser.add_argument("--step", default="last", help="step to compare (default: last)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Train both sides, draw the comparison and print where everything is.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The comparison figure's path.
    """
    parser = build_parser()
    args, train_args = parser.parse_known_args(split_side_values(sys.argv[1:] if argv is None else argv))
    sides = []
    for key, flags in (("A", args.a), ("B", args.b)):
        try:
            flags = shlex.split(flags)
        except ValueError as err:
            parser.error(f"--{key.lower()} {flags!r}: {err}")
        refuse_clashes(parser, flags, SET_BY_THIS_SCRIPT, f"--{key.lower()}")
        sides.append(Side("", flags, shlex.join(flags) or "defaults"))
    refuse_clashes(parser, train_args, SET_BY_THIS_SCRIPT, "the common flags")
    if sides[0].flags == sides[1].flags:
        parser.error("--a and --b give the same flags: the two sides would be the same runs.")
    if args.labels:
        for side, label in zip(sides, args.labels, strict=True):
            side.label = label
    names = [slug(side.label) for side in sides]
    if names[0] == names[1]:
        names = [f"a_{names[0]}", f"b_{names[1]}"]
    for side, name in zip(sides, names, strict=True):
        side.name = name
    out = args.out or Path("runs/ablate") / f"{names[0]}_vs_{names[1]}"
    clashes = existing(out, sides, args.seeds)
    if clashes:
        parser.error(
            f"{out} already holds {', '.join(path.name for path in clashes)} from an earlier ablation: give another "
            "--out, or remove those first."
        )
    for side in sides:  # a bad flag stops before any training
        check_train_flags([*train_args, *side.flags])
    return ablate(sides, args.seeds, out, args.step, train_args)


if __name__ == "__main__":
    main()

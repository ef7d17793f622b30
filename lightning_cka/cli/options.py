"""Argument types and options shared by the subcommands."""

import argparse
import json
from typing import Any

RUN_HELP = (
    "a run: a Lightning log directory holding cka/step_<step>.npz (written by CKAMonitor), its cka/ folder, or one "
    ".npz file; join the folders of a resumed run with commas (version_0,version_1) to read them as one run"
)


def add_local_threshold(parser: argparse.ArgumentParser) -> None:
    """``--local-threshold``, which every subcommand takes (``main`` checks its range)."""
    parser.add_argument(
        "--local-threshold",
        type=float,
        default=None,
        metavar="FRACTION",
        help="a head is local when its mean attention distance is below this fraction of the distance of uniform "
        "attention over the patch grid (default: the run's own, 0.5 unless its attention analysis was set otherwise)",
    )


def sentence(text: str) -> str:
    """``text`` with a capital first letter: a subcommand's help line opening its description."""
    return text[0].upper() + text[1:]


def step(text: str) -> int | str:
    """The ``--step`` type: an integer global step or ``"last"``."""
    if text == "last":
        return text
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer step or 'last', got {text!r}") from err


def json_object(text: str) -> dict[str, Any]:
    """The type of the ``--*-kwargs`` options: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_classes\": 10}}', got {text!r}")
    return value


def fraction(text: str) -> float:
    """A float in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value

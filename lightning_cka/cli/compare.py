"""``lightning-cka compare A [A ...] --vs B [B ...]``: two runs or two groups of seeds, in figures and numbers."""

import argparse
from pathlib import Path
from typing import Any

from lightning_cka.cli.options import RUN_HELP, add_local_threshold, fraction, sentence, step

FORMATS = ("png", "pdf", "svg")


def add_command(commands: Any) -> None:
    """Add the subcommand to the ``commands`` of the ``lightning-cka`` parser."""
    help_ = "compare two runs, or two groups of runs (seeds), with error bars and significance"
    parser = commands.add_parser(
        "compare",
        help=help_,
        description=f"{sentence(help_)}: every figure of both at one step (group means, their difference with the "
        "cells that differ marked, attention distances with their spread) and a table of the headline numbers. "
        "'compare A B' sets two runs against each other; 'compare A1 A2 A3 --vs B1 B2 B3' two groups of seeds.",
    )
    parser.add_argument("runs", metavar="RUN", nargs="+", help=f"side A ({RUN_HELP}); with two RUNs and no --vs: A B")
    parser.add_argument("--vs", nargs="+", metavar="RUN", help="side B: one run or several seeds")
    parser.add_argument(
        "--step",
        type=step,
        default="last",
        help="global step to compare, present in every run ('last', the default: the last step all have); a run "
        "given as a .npz file is that probe whatever the step",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="FILE_OR_DIR",
        help="a figure file (.png, .pdf or .svg) with every comparison stacked, or a folder (a name without an "
        "extension, or an existing folder) with one file per figure, named after its tag",
    )
    parser.add_argument(
        "--format", nargs="+", choices=FORMATS, default=["png"], help="file formats in a folder --out (default: png)"
    )
    parser.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the two sides")
    parser.add_argument(
        "--alpha", type=fraction, default=0.05, help="false discovery rate of the marked differences (default 0.05)"
    )
    parser.add_argument(
        "--allow-different-probes",
        action="store_true",
        help="compare runs whose probe images differ (the figure says so); by default that is an error",
    )
    parser.add_argument(
        "--allow-different-references",
        action="store_true",
        help="compare runs whose reference models differ (e.g. trained and untrained; every caption says so); by "
        "default that is an error",
    )
    add_local_threshold(parser)
    parser.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> None:
    from lightning_cka.cli.errors import CLIError

    if args.vs is None:
        if len(args.runs) != 2:
            raise CLIError(f"give two runs (A B), or side B after --vs; got {len(args.runs)} run(s) and no --vs.")
        specs_a, specs_b = args.runs[:1], args.runs[1:]
    else:
        specs_a, specs_b = args.runs, args.vs
    compare(specs_a, specs_b, args)


def compare(specs_a: list[str], specs_b: list[str], args: argparse.Namespace) -> None:
    """Read both sides, check they are comparable, write the figure and print the table."""
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.cli.runs import read_run
    from lightning_cka.engine.analysis import View
    from lightning_cka.figures.groups import Group, compare_groups

    runs_a, runs_b = [read_run(s) for s in specs_a], [read_run(s) for s in specs_b]
    step_ = _common_step([*runs_a, *runs_b], args.step)
    probes_a, probes_b = [r.probe(step_) for r in runs_a], [r.probe(step_) for r in runs_b]
    if args.labels and args.labels[0] == args.labels[1]:
        raise CLIError(f"--labels names both sides {args.labels[0]!r}: give two different names.")
    labels = args.labels or _labels(runs_a, runs_b)
    _check_layers(probes_a + probes_b, runs_a + runs_b)
    notes = (
        _check_probes(probes_a + probes_b, runs_a + runs_b, args.allow_different_probes),
        _check_references(probes_a + probes_b, runs_a + runs_b, args.allow_different_references),
    )
    note = " ".join(n for n in notes if n)
    groups = []
    for label, runs, probes in ((labels[0], runs_a, probes_a), (labels[1], runs_b, probes_b)):
        views = [View(run=r.label, local_threshold=args.local_threshold) for r in runs]
        figures = [p.figures(None, v) for p, v in zip(probes, views, strict=True)]
        groups.append(Group(label, figures))
    try:
        figures, apart = compare_groups(*groups, alpha=args.alpha, note=note)
    except ValueError as err:
        raise CLIError(str(err)) from err
    written = _write(figures, args.out, args.format)
    print("\n".join(compare_lines(probes_a, probes_b, labels, runs_a, runs_b, args.local_threshold, note)))
    for tag, reason in apart.items():
        print(f"{tag} is not drawn: {reason}")
    print(f"\nwrote {', '.join(str(path) for path in written)}")


def _write(figures: list, out: Path, formats: list[str]) -> list[Path]:
    """Every comparison figure in one file (``out`` names one), or one file per figure and format in folder ``out``."""
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.figures.render import draw_figure, draw_figures

    suffix = out.suffix.lower().lstrip(".")
    if suffix and suffix not in FORMATS and not out.is_dir():
        raise CLIError(
            f"--out {out}: a figure file ends in .png, .pdf or .svg; a name without an extension is a folder for one "
            "file per figure."
        )
    try:
        if suffix in FORMATS and not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            draw_figures(figures).savefig(out, dpi=120)
            return [out]
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for figure in figures:
            drawing = draw_figure(figure)
            for fmt in formats:
                path = out / f"{figure.tag.replace('/', '_')}.{fmt}"
                drawing.fig.savefig(path, dpi=150)
                written.append(path)
        return written
    except (ValueError, OSError) as err:
        raise CLIError(f"cannot write --out {out}: {err}") from err


def _common_step(runs: list, wanted: int | str) -> int | str:
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.cli.text import few

    directories = [run for run in runs if not run.single_file]
    if wanted != "last" or not directories:
        return wanted
    common = set.intersection(*(set(run.probes) for run in directories))
    if not common:
        steps = "; ".join(f"{run.spec}: {few(run.steps)}" for run in directories)
        raise CLIError(f"the runs have no step in common ({steps}); pass --step, or one probe's .npz file.")
    return max(common)


def _labels(runs_a: list, runs_b: list) -> list[str]:
    """How the two sides are named: a run's name, or ``A (3 runs)``; never the same name for both.

    Two runs of the same name (``vit/version_0`` under two experiment folders) take as many parent folders as tell
    them apart (``trained/vit/version_0``); failing that, ``A: name`` and ``B: name``.
    """

    def side(runs: list, fallback: str, extra: int) -> str:
        if len(runs) > 1:
            return f"{fallback} ({len(runs)} runs)"
        return _run_name(runs[0], extra) or fallback

    for extra in range(4):
        labels = [side(runs_a, "A", extra), side(runs_b, "B", extra)]
        if labels[0] != labels[1]:
            return labels
    name = side(runs_a, "A", 0)
    return [f"A: {name}", f"B: {name}"]


def _run_name(run: Any, extra: int) -> str:
    """The run's label with ``extra`` more parent folders in front of it."""
    label = run.label
    if not extra or not label or not run.folders:
        return label
    folder = run.folders[-1]
    folder = (folder.parent if folder.name == "cka" else folder).resolve()
    parts = folder.parts[: len(folder.parts) - len(label.split("/"))]
    parents = [part for part in parts[-extra:] if part not in ("/", "")]
    return "/".join([*parents, label])


def _reference_of(probe: Any) -> tuple[str, str] | None:
    """``(how figures name the reference, what identifies it)`` of a probe with a reference, else ``None``.

    Identified by what the probe recorded of it: its label (the timm name or checkpoint, trained or not) and the
    monitor's reference settings (model, weights, pretrained, kwargs, reduction). Probe files hold no fingerprint of
    the reference's weights, so one checkpoint file overwritten between runs goes unnoticed.
    """
    import json

    settings = probe.settings_dict().get("reference") if probe.settings else None
    settings = settings if isinstance(settings, dict) else {}
    label = probe.get("reference_label") or ""
    if not label and not settings and not probe.get("reference_layers"):
        return None
    identity = {key: settings.get(key) for key in ("model", "weights", "pretrained", "kwargs", "reduction")}
    name = label or str(settings.get("model") or "a reference that the file does not name")
    return name, json.dumps({"label": label, **identity}, sort_keys=True, default=str)


def _check_references(probes: list, runs: list, allow: bool) -> str:
    """Refuse runs whose reference models differ (unless allowed, then say so on every figure)."""
    from lightning_cka.cli.errors import CLIError

    seen: dict[str, tuple[str, list[str]]] = {}
    for probe, run in zip(probes, runs, strict=True):
        reference = _reference_of(probe)
        if reference is not None:
            seen.setdefault(reference[1], (reference[0], []))[1].append(run.spec)
    if len(seen) <= 1:
        return ""
    which = "; ".join(f"{name} in {', '.join(specs)}" for name, specs in seen.values())
    if len({name for name, _ in seen.values()}) < len(seen):  # same label, other settings: show the settings
        which = "; ".join(f"{key} in {', '.join(specs)}" for key, (_, specs) in seen.items())
    if not allow:
        raise CLIError(
            f"the runs' reference models differ ({which}), so cka/reference and every figure against the reference "
            "would set different models against each other; compare runs with the same reference or pass "
            "--allow-different-references."
        )
    return (
        f"Caution: the runs' references differ ({which}; --allow-different-references), so figures against the "
        "reference compare different models."
    )


def _check_layers(probes: list, runs: list) -> None:
    from lightning_cka.cli.errors import CLIError
    from lightning_cka.cli.text import name_list

    first = probes[0]
    for probe, run in zip(probes[1:], runs[1:], strict=True):
        for key in ("layers", "attention_layers", "reference_layers"):
            a, b = getattr(first, key), getattr(probe, key)
            if a and b and a != b:
                raise CLIError(
                    f"the runs monitor different {key.replace('_', ' ')}: {runs[0].spec} has {name_list(a)}; "
                    f"{run.spec} has {name_list(b)}."
                )


def _check_probes(probes: list, runs: list, allow: bool) -> str:
    """Refuse runs that probed different images (unless allowed, then say so); warn where identity is unknown."""
    import sys

    from lightning_cka.cli.errors import CLIError

    known = [(p.probe_hash, r.spec) for p, r in zip(probes, runs, strict=True) if p.probe_hash]
    unknown = [r.spec for p, r in zip(probes, runs, strict=True) if not p.probe_hash]
    if unknown:
        print(
            f"lightning-cka: warning: {', '.join(unknown)} do not record their probe's identity (files written before "
            "lightning-cka 0.2): make sure all runs probed the same images.",
            file=sys.stderr,
        )
    hashes = {h for h, _ in known}
    if len(hashes) <= 1:
        return ""
    which = ", ".join(f"{spec} ({h[:8]})" for h, spec in known)
    if not allow:
        raise CLIError(
            f"the runs probed different images ({which}), so their cells cannot be differenced; probe the same images "
            "(same probe_size, seed and validation set) or pass --allow-different-probes."
        )
    return "Caution: the runs probed different images (--allow-different-probes), so cells compare different data."


def compare_lines(
    probes_a: list, probes_b: list, labels: list[str], runs_a: list, runs_b: list, fraction_: float, note: str
) -> list[str]:
    """The comparison as text: headline numbers of both sides with their spread and the difference's p-value."""
    import numpy as np

    from lightning_cka.cli.headline import group_summary, headline, per_layer, plus_minus
    from lightning_cka.engine.analysis import View
    from lightning_cka.figures.groups import ONE_RUN, cell_p_values

    def spread_word(n: int) -> str:
        return "± sd over runs" if n > 1 else "± jackknife se"

    over_runs = min(len(probes_a), len(probes_b)) >= 2
    lines = []
    for label, runs, probes in ((labels[0], runs_a, probes_a), (labels[1], runs_b, probes_b)):
        where = ", ".join(f"{r.spec} (step {p.step})" for r, p in zip(runs, probes, strict=True))
        lines.append(f"{label}: {where}; {probes[0].num_examples} probe images")
    if note:
        lines.append(note)
    heads = {
        side: [headline(p, View(local_threshold=fraction_)) for p in ps]
        for side, ps in (("a", probes_a), ("b", probes_b))
    }
    tags = [t for t in heads["a"][0] if all(t in h for h in heads["a"] + heads["b"])]
    width = max([len(t) for t in tags] + [24])
    column = min(max(22, *(len(label) for label in labels)), 40)
    head_a, head_b = (_fit(label, column) for label in labels)
    if head_a == head_b:
        head_a, head_b = _fit(f"A: {labels[0]}", column), _fit(f"B: {labels[1]}", column)
    lines += [
        "",
        f"{'':<{width}}  {head_a:>{column}}  {head_b:>{column}}  {'A − B':>9}  {'p':>7}",
        f"{'':<{width}}  {spread_word(len(probes_a)):>{column}}  {spread_word(len(probes_b)):>{column}}",
    ]
    for tag in tags:
        values_a, values_b = ([np.asarray(v) for v in _finite(h[tag][0] for h in heads[side])] for side in "ab")
        a = group_summary([h[tag] for h in heads["a"]])
        b = group_summary([h[tag] for h in heads["b"]])
        testable = over_runs and min(len(values_a), len(values_b)) >= 2
        p = float(cell_p_values(values_a, values_b)) if testable else float("nan")
        diff = a[0] - b[0]
        p_text = f"{p:7.3f}" if np.isfinite(p) else f"{'-':>7}"
        lines.append(f"{tag:<{width}}  {plus_minus(*a, column)}  {plus_minus(*b, column)}  {diff:+9.3f}  {p_text}")
    distances = [
        per_layer(p, View(local_threshold=fraction_)).get("attention/mean_distance", {}) for p in (*probes_a, *probes_b)
    ]
    layers = list(distances[0]) if distances and all(distances) else []
    if layers:
        lines += ["", "mean attention distance per layer (pixels, mean over heads; groups: mean ± sd over runs)"]
        name_width = max(len(n) for n in layers)
        for layer in layers:
            a = group_summary([(d[layer], float("nan")) for d in distances[: len(probes_a)]])
            b = group_summary([(d[layer], float("nan")) for d in distances[len(probes_a) :]])
            lines.append(f"{layer:<{name_width}}  {plus_minus(*a, 15)}  {plus_minus(*b, 15)}  {a[0] - b[0]:+8.2f}")
    if over_runs:
        lines.append("p: Welch's t of A − B, the runs as samples.")
    else:
        who = "one run per side" if max(len(probes_a), len(probes_b)) == 1 else "one run on a side"
        lines.append(
            f"p: none, {who}: {ONE_RUN.replace('no cell is marked', 'no p-value')}. The ± jackknife se of one run "
            "is how much its probe images move it, not how much another seed would."
        )
    return lines


def _finite(values: Any) -> list[float]:
    """The finite ones of ``values`` (a run whose number is NaN takes no part in the test)."""
    import math

    return [float(v) for v in values if math.isfinite(v)]


def _fit(label: str, width: int) -> str:
    """``label`` cut in the middle to ``width`` characters (the start and the run's version both stay)."""
    if len(label) <= width:
        return label
    head = (width - 1) // 2
    return f"{label[:head]}…{label[len(label) - (width - 1 - head) :]}"

"""A report's content, collected from runs: each analysis's findings and events, group differences, the criteria.

The analyses write the findings (:meth:`lightning_cka.engine.analysis.Analysis.findings`) and notice the events
(:meth:`~lightning_cka.engine.analysis.Analysis.events`); this module only gathers them from the runs' probes, adds
what no single analysis owns (the runs table, the differences of headline numbers between groups, the paper's
Figure 1), and hands the whole to the writers (:mod:`lightning_cka.report.html`, :mod:`lightning_cka.report.markdown`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lightning_cka.__about__ import __version__
from lightning_cka.engine.analysis import Analysis, View
from lightning_cka.findings import (
    NOT_MEASURED,
    VERDICTS,
    Criteria,
    Event,
    Evidence,
    Finding,
    RunProbes,
    Side,
    architecture,
)
from lightning_cka.report.differences import Difference, differences

if TYPE_CHECKING:
    from lightning_cka.figures.spec import Figure
    from lightning_cka.result import CKAResult


@dataclass
class RunRow:
    """One run in the report's table of runs."""

    side: str
    label: str
    steps: list[int]
    probe_images: int
    minibatches: int
    model: str
    reference: str
    train_examples: int


@dataclass
class Report:
    """Everything a report says, before it is written as HTML or Markdown.

    Attributes:
        title: what is compared.
        sides: the sides (one, or A and B), each a run or the seeds of one setup.
        runs: one row per run.
        findings: every analysis's findings, in the analyses' order (both sides' per finding when there are two).
        differences: headline numbers of A against B (empty for one side).
        comparisons: figures of A against B (group means, their difference, marked cells).
        figure_one: per side, the probe whose Figure 1 layout (model, reference, crossed) the report shows.
        events: every run's events over training, by step.
        criteria: ``(name, value in force, default, meaning)`` of every criterion.
        notes: what the report could not read or cannot say, one sentence each.
        reference_findings: what the reference model's own training run shows (with ``--reference-run``).
        alike: tags of the figures every run drew with the same numbers (shown once, not compared).
        created: when it was written.
    """

    title: str
    sides: list[Side]
    runs: list[RunRow]
    findings: list[Finding]
    differences: list[Difference] = field(default_factory=list)
    comparisons: list[Figure] = field(default_factory=list)
    figure_one: list[tuple[str, CKAResult]] = field(default_factory=list)
    events: list[tuple[str, Event]] = field(default_factory=list)
    criteria: list[tuple[str, float, float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference_findings: list[Finding] = field(default_factory=list)
    alike: set[str] = field(default_factory=set)
    created: str = ""
    version: str = __version__

    def tally(self) -> dict[str, int]:
        """How many findings got each verdict."""
        return {verdict: sum(f.verdict == verdict for f in self.findings) for verdict in VERDICTS}


def build_report(
    sides: Sequence[Side],
    criteria: Mapping[str, float] | None = None,
    title: str = "",
    alpha: float = 0.05,
    reference_run: RunProbes | None = None,
    local_threshold: float | None = None,
) -> Report:
    """Collect the findings, events and differences of one side (a run, or seeds) or two (A against B).

    Args:
        sides: one or two sides, each with at least one run that has at least one probe.
        criteria: overrides of the analyses' criteria by ``"<analysis>.<key>"``.
        title: the report's title (default: the sides' labels).
        alpha: the significance level of tests and the false discovery rate of group comparisons.
        reference_run: the reference model's own training run: its findings get a section of their own.
        local_threshold: overrides the attention analysis's local-head threshold (a fraction of the uniform
            distance).

    Raises:
        ValueError: no side, more than two, a side without runs, or an override naming no criterion.
    """
    sides = list(sides)
    if not 1 <= len(sides) <= 2 or any(not side.runs for side in sides):
        raise ValueError("a report compares one side (a run or the seeds of one setup) or two, each with runs.")
    analyses = _analyses(sides)
    for analysis in analyses:
        if local_threshold is not None and hasattr(analysis, "local_threshold"):
            analysis.local_threshold = local_threshold
    evidence = Evidence(sides, Criteria(criteria, analyses), alpha=alpha)
    found: list[Finding] = []
    for analysis in analyses:
        found += analysis.findings(evidence)
    report = Report(
        title=title or " against ".join(side.label for side in sides),
        sides=sides,
        runs=[_run_row(side, run) for side in sides for run in side.runs],
        findings=_ordered(found, len(sides)),
        criteria=evidence.criteria.table(analyses),
        created=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    )
    for side in sides:
        for run in side.runs:
            for analysis in analyses:
                for event in analysis.events(run.history(), evidence.criteria):
                    report.events.append((run.label, event))
        probe = side.runs[0].last
        if probe.get("reference_intra") is not None and probe.get("intra") is not None:
            report.figure_one.append((side.label, probe))
    report.events.sort(key=lambda item: (item[1].step, item[0], item[1].analysis))
    if len(sides) == 2:
        report.differences = differences(sides[0], sides[1], alpha)
        report.comparisons, report.alike, note = _comparisons(sides[0], sides[1], alpha)
        report.notes += [note] if note else []
    report.notes += _notes(sides)
    if reference_run is not None:
        _add_reference_run(report, reference_run, evidence)
    return report


def _add_reference_run(report: Report, run: RunProbes, evidence: Evidence) -> None:
    """The reference's own run: a row in the runs table, and what its probes show (the findings that apply)."""
    side = Side("reference run", [run])
    report.runs.append(_run_row(side, run))
    own = Evidence([side], evidence.criteria, evidence.level, evidence.alpha)
    for analysis in _analyses([side]):
        report.reference_findings += [f for f in analysis.findings(own) if f.verdict != NOT_MEASURED]
    labels = {str(r.last.get("reference_label") or "") for s in report.sides for r in s.runs}
    folder = run.label.split("/")[0]
    if not any(folder and folder in label for label in labels):
        report.notes.append(
            f"The runs' reference ({'; '.join(sorted(labels)) or 'none'}) does not name the reference run "
            f"{run.label}: check that it is the model the runs were compared with."
        )


def _analyses(sides: Sequence[Side]) -> list[Analysis]:
    """The analyses of every run's last probe, each once (by name), in the order of their figures."""
    seen: dict[str, Analysis] = {}
    for side in sides:
        for run in side.runs:
            for analysis in run.last.analyses:
                seen.setdefault(analysis.name, analysis)
    return sorted(seen.values(), key=lambda a: getattr(a, "position", 1000))


def _ordered(found: list[Finding], sides: int) -> list[Finding]:
    """Findings grouped by key (A's then B's), keys in the order the analyses gave them."""
    keys = list(dict.fromkeys(f.key for f in found))
    return [f for key in keys for f in found if f.key == key] if sides > 1 else found


def _run_row(side: Side, run: RunProbes) -> RunRow:
    last = run.last
    settings = last.settings_dict()
    reference = last.get("reference_label") or ""
    return RunRow(
        side=side.label,
        label=run.label,
        steps=run.steps,
        probe_images=int(last.num_examples or 0),
        minibatches=int(last.get("num_minibatches") or 0),
        model=architecture(last),
        reference=str(reference),
        train_examples=int(settings.get("train_examples") or 0),
    )


def _reference_of(result: CKAResult) -> str:
    """What a probe's reference was: its label (name, trained or not, weights), else its settings, else none."""
    label = result.get("reference_label")
    if label:
        return str(label)
    settings = result.settings_dict().get("reference")
    return json.dumps(settings, sort_keys=True) if settings else "no reference"


def _comparisons(a: Side, b: Side, alpha: float) -> tuple[list[Figure], set[str], str]:
    """The figures of A against B at each run's last probe (group means, differences, marked cells).

    Also the tags every run drew alike (the frozen reference's own heatmap): nothing to compare, shown once.
    """
    from lightning_cka.figures.groups import Group, compare_groups

    groups, drawn = [], []
    for side in (a, b):
        figures = [run.last.figures(None, View(run=run.label)) for run in side.runs]
        groups.append(Group(side.label, figures))
        drawn += figures
    same = {tag for tag in {f.tag for f in drawn[0]} if _identical([f for run in drawn for f in run if f.tag == tag])}
    try:
        compared, apart = compare_groups(groups[0], groups[1], alpha)
    except ValueError as err:  # runs of other layers in every figure
        return [], same, f"The sides' figures are not compared cell by cell: {err}"
    apart = [f"{tag} ({reason})" for tag, reason in apart.items() if tag not in same]
    note = f"These figures are not compared cell by cell: {'; '.join(apart)}" if apart else ""
    return [figure for figure in compared if figure.tag not in same], same, note


def _identical(figures: list[Figure]) -> bool:
    """Whether every run drew this figure with the same numbers (the reference's own heatmap, say)."""

    def arrays(figure: Figure) -> list[np.ndarray]:
        out = []
        for panel in figure.panels:
            out += [panel.values] if hasattr(panel, "values") else [s.values for s in panel.series]
        return out

    first = arrays(figures[0])
    return all(
        len(first) == len(other)
        and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(first, other, strict=True))
        for other in map(arrays, figures[1:])
    )


def _notes(sides: Sequence[Side]) -> list[str]:
    notes = []
    for side in sides:
        for run in side.runs:
            if len(run.steps) < 2:
                notes.append(f"{run.label} has one probe: nothing over training (events, changes) can be told.")
            left_out = run.last.settings_dict().get("left_out") or {}
            for name, reason in left_out.items():
                notes.append(f"{run.label}: the {name} analysis was left out ({reason}).")
    references = {_reference_of(run.last) for side in sides for run in side.runs}
    if len(references) > 1:
        notes.append(
            "The runs were compared with different references (" + "; ".join(sorted(references)) + "): numbers "
            "against the reference (cka/reference, heads) compare different things across them."
        )
    hashes = {run.last.get("probe_hash") for side in sides for run in side.runs}
    if len(hashes) > 1:
        notes.append(
            "The runs probed different images (their probe hashes differ): numbers compare across runs, single cells "
            "less so."
        )
    return list(dict.fromkeys(notes))


def figures_of_finding(finding: Finding, report: Report) -> list[Figure]:
    """The figures to show with a finding: its own, or for two sides the group comparison of each of its tags.

    A tag every run drew alike (the frozen reference's own heatmap) keeps the finding's own figure.
    """
    if len(report.sides) == 1:
        return list(finding.figures)
    compared = {figure.tag: figure for figure in report.comparisons}
    return [compared.get(figure.tag, figure) for figure in finding.figures]

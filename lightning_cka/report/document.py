"""A report laid out as a sequence of blocks (headings, text, tables, pictures) that both writers render alike.

The HTML and the Markdown writer walk the same blocks, so the two documents say the same things in the same order;
every picture is drawn once (:class:`Pictures`) and shown once, later findings that share it refer to it.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lightning_cka.engine.analysis import View
from lightning_cka.findings import CANNOT_TELL, NOT_MEASURED, Finding
from lightning_cka.report.build import Report, figures_of_finding

LEVEL_TEXT = (
    "Every number is from each run's last probe unless said otherwise. ± is half a 95 % interval: for one run, the "
    "block jackknife over its probe minibatches read with Student's t on M − 1 degrees of freedom; for several runs "
    "(seeds) of one setup, their spread, with t on n − 1."
)
METHODS = (
    "CKA: the unbiased minibatch estimator of Nguyen et al. 2021, as in Raghu et al. 2021, summed over all probe "
    "minibatches.",
    "Within a run: block-jackknife standard errors over the M probe minibatches; intervals use Student's t on M − 1 "
    "degrees of freedom (calibrated so; ± 1.96 se covers only 66-73 % at M = 2).",
    "Across seeds: the mean of the runs with the t interval on n − 1 degrees of freedom.",
    "A against B: Welch's t over the runs of each side, Benjamini-Hochberg across the headline numbers (false "
    "discovery rate 5 %), and the smallest difference the seeds detect at this spread (two-sided 5 %, 80 % power). "
    "With one run a side no test is made: one run's standard error says nothing about another seed.",
    "The permutation null: CKA of each minibatch against shuffled partners (19 permutations: the 5 % level); a cell "
    "at or below it is indistinguishable from unrelated images.",
    "Linear probes: closed-form ridge regression on even probe indices, scored on odd ones; chance is what the same "
    "fit on shuffled labels scores.",
)


@dataclass
class Heading:
    """A heading of level 1 (the title) to 3 (a finding)."""

    level: int
    text: str


@dataclass
class Text:
    """A paragraph; ``kind`` says what it is (``paper``, ``statement``, ``needs``, ``note``) for its style."""

    text: str
    kind: str = ""


@dataclass
class Verdict:
    """A finding's verdict and its reason."""

    verdict: str
    reason: str


@dataclass
class Table:
    """A table of strings; the cells of ``verdict_column`` are verdicts."""

    header: list[str]
    rows: list[list[str]]
    verdict_column: int = -1  # the column whose cells are verdicts (coloured), or -1


@dataclass
class Items:
    """A bulleted list."""

    items: list[str]


@dataclass
class Picture:
    """One picture: a file stem, what it shows, its PNG bytes (once drawn), and whether this is its first showing."""

    name: str
    alt: str
    png: bytes = b""
    first: bool = True


Drawing = tuple  # ("figure", Figure) or ("figure_one", CKAResult, View): what to draw, picklable for a worker


@dataclass
class Pictures:
    """Each picture once, by key: collected while the report is laid out, then drawn together (:meth:`draw`)."""

    dpi: int = 110
    drawn: dict[Any, Picture] = field(default_factory=dict)
    todo: list[tuple[Picture, Drawing]] = field(default_factory=list)

    def get(self, key: Any, alt: str, drawing: Drawing) -> Picture:
        """The picture ``key``; the first time, ``drawing`` is queued to be drawn."""
        if key in self.drawn:
            known = self.drawn[key]
            return Picture(known.name, known.alt, known.png, first=False)
        stem = "".join(c if c.isalnum() else "_" for c in str(alt).lower())[:40].strip("_")
        number = len({id(known) for known in self.drawn.values()}) + 1
        picture = Picture(f"fig{number:02d}_{stem}", alt)
        self.drawn[key] = picture
        self.todo.append((picture, drawing))
        return picture

    def draw(self, workers: int | None = None) -> None:
        """Draw every queued picture, in forked worker processes where there are several cores.

        Drawing (matplotlib's layout above all) is most of a report's time, and the pictures are independent.
        """
        tasks = [(drawing, self.dpi) for _, drawing in self.todo]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        workers = min(len(tasks), workers or cores)
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux":
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                images = list(pool.map(render, tasks))
        else:
            images = [render(task) for task in tasks]
        for (picture, _), png in zip(self.todo, images, strict=True):
            picture.png = png
        self.todo = []


def render(task: tuple[Drawing, int]) -> bytes:
    """The PNG bytes of one queued drawing."""
    from lightning_cka.figures.figure_one import draw_figure_one
    from lightning_cka.figures.render import draw_figure

    drawing, dpi = task
    fig = draw_figure(drawing[1]).fig if drawing[0] == "figure" else draw_figure_one(drawing[1], drawing[2])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


Block = Heading | Text | Verdict | Table | Items | Picture
SIDE = "the side"  # the picture key of a one-side report's figures


def layout(report: Report, pictures: Pictures | None = None) -> list[Block]:
    """The report's blocks, in reading order."""
    from lightning_cka.figures.figure_one import TAGS

    pictures = pictures or Pictures()
    blocks: list[Block] = [Heading(1, report.title), Text(_opening(report)), Text(LEVEL_TEXT, "note")]
    blocks += [Heading(2, "Runs"), _runs_table(report)]
    blocks += [Heading(2, "Verdicts at a glance"), _glance(report)]
    if report.figure_one:
        blocks.append(Heading(2, "The paper's Figure 1: the model, the reference, and the two crossed"))
        for label, probe in report.figure_one:
            view = View(run=f"{label} · {probe.run}" if probe.run and probe.run != label else label)
            composite = pictures.get(("figure_one", label), f"Figure 1 layout, {label}", ("figure_one", probe, view))
            blocks.append(composite)
            if len(report.sides) == 1:  # the findings that show these figures refer to the composite
                pictures.drawn.update({(SIDE, tag): composite for tag in TAGS})
    blocks.append(Heading(2, "The paper's findings, one by one"))
    for finding in report.findings:
        blocks += _finding(finding, report, pictures)
    if report.reference_findings:
        blocks.append(Heading(2, "The reference model's own run"))
        for finding in report.reference_findings:
            blocks += _finding(finding, report, pictures, own=True)
    if report.differences:
        blocks += _differences(report)
    blocks += _timeline(report)
    needs = _needs(report)
    if needs:
        blocks += [Heading(2, "What would make more findings possible"), Items(needs)]
    blocks += [Heading(2, "Appendix: the criteria of the verdicts"), _criteria(report), Text(_override_text(), "note")]
    blocks += [Heading(2, "Appendix: how the numbers are made"), Items(list(METHODS))]
    pictures.draw()
    return blocks


def _opening(report: Report) -> str:
    runs = sum(len(side.runs) for side in report.sides)  # the reference's own run is not one of them
    tally = ", ".join(f"{count} {verdict}" for verdict, count in report.tally().items() if count)
    sides = (
        f"{report.sides[0].label} against {report.sides[1].label}" if len(report.sides) == 2 else report.sides[0].label
    )
    return (
        f'What {runs} run{"s" * (runs != 1)} ({sides}) show of the findings of Raghu et al. 2021, "Do Vision '
        f'Transformers See Like Convolutional Neural Networks?": {tally}. Written by lightning-cka {report.version} '
        f"on {report.created}."
    )


def _runs_table(report: Report) -> Table:
    rows = []
    for row in report.runs:
        steps = f"{len(row.steps)} ({row.steps[0]}–{row.steps[-1]})" if len(row.steps) > 1 else f"1 ({row.steps[0]})"
        rows.append(
            [
                row.side,
                row.label,
                steps,
                str(row.probe_images),
                str(row.minibatches or "-"),
                row.model,
                row.reference or "none",
                f"{row.train_examples:,}" if row.train_examples else "not recorded",
            ]
        )
    header = ["side", "run", "probes (steps)", "probe images", "minibatches M", "model", "reference", "training images"]
    return Table(header, rows)


def _glance(report: Report) -> Table:
    two = len(report.sides) == 2
    rows = [[f.title, *([f.side] if two else []), f.verdict, f.reason] for f in report.findings]
    header = ["finding", *(["side"] if two else []), "verdict", "why"]
    return Table(header, rows, verdict_column=2 if two else 1)


def _finding(finding: Finding, report: Report, pictures: Pictures, own: bool = False) -> list[Block]:
    title = f"{finding.title} ({finding.side})" if finding.side else finding.title
    blocks: list[Block] = [Heading(3, title), Verdict(finding.verdict, finding.reason)]
    blocks.append(Text(f"The paper: {finding.paper}", "paper"))
    if finding.statement:
        blocks.append(Text(finding.statement, "statement"))
    if finding.numbers:
        blocks.append(Table(["quantity", "value"], [[q, v] for q, v in finding.numbers]))
    for figure in finding.figures if own else figures_of_finding(finding, report):
        if own:
            key = ("reference run", figure.tag)
        elif len(report.sides) == 1:
            key = (SIDE, figure.tag)
        elif any(figure is c for c in report.comparisons) or figure.tag in report.alike:
            key = ("A against B", figure.tag)  # the same picture for both sides' findings
        else:
            key = (finding.side, figure.tag)
        picture = pictures.get(key, figure.title, ("figure", figure))
        blocks.append(
            picture if picture.first else Text(f"Figure: {figure.title}, shown above ({picture.alt}).", "note")
        )
    if finding.needs:
        blocks.append(Text(f"What would decide it: {finding.needs}.", "needs"))
    return blocks


def _differences(report: Report) -> list[Block]:
    a, b = (side.label for side in report.sides)
    rows = [[d.key, d.a.text(basis=False), d.b.text(basis=False), d.test.text(), d.verdict] for d in report.differences]
    tested = [d for d in report.differences if min(d.test.runs) >= 2]
    found = [d.key for d in tested if d.discovery]
    if not tested:
        summary = (
            "One run per side: seed variation is unknown, so no difference is tested (a run's own standard errors "
            "say nothing about another seed). Train 2 or more seeds a side (3 for a claim)."
        )
    else:
        detectable = sorted(d.test.detectable for d in tested if d.test.detectable == d.test.detectable)
        smallest = (
            f" The seeds detect differences of about {detectable[0]:.2g} to {detectable[-1]:.2g} (80 % power)."
            if detectable
            else ""
        )
        summary = (
            f"{len(found)} of {len(tested)} headline numbers differ between {a} and {b} (Welch's t over runs, "
            f"Benjamini-Hochberg at 5 %){': ' + ', '.join(found) if found else ''}.{smallest}"
        )
    return [
        Heading(2, f"{a} against {b}: what differs"),
        Text(summary),
        Table(["number", a, b, f"{a} − {b}", "verdict"], rows),
    ]


def _timeline(report: Report) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Over training: events")]
    if not report.events:
        blocks.append(
            Text(
                "No event: no head became local or stopped being local, no layer's attention or rank collapsed, no "
                "block stopped changing, no layer newly matched or stopped matching the reference, and no probe was "
                "dominated by a few images (criteria in the appendix).",
            )
        )
        return blocks
    rows = [[str(event.step), run, event.analysis, event.text] for run, event in report.events]
    blocks.append(Table(["step", "run", "analysis", "what happened"], rows))
    return blocks


def _needs(report: Report) -> list[str]:
    needs = [
        f"{f.title}{f' ({f.side})' if f.side else ''}: {f.needs}."
        for f in report.findings
        if f.needs and f.verdict in (NOT_MEASURED, CANNOT_TELL)
    ]
    return list(dict.fromkeys(needs + report.notes))


def _criteria(report: Report) -> Table:
    rows = [[name, f"{value:g}", f"{default:g}", doc] for name, value, default, doc in report.criteria]
    return Table(["criterion", "in force", "default", "meaning"], rows)


def _override_text() -> str:
    return (
        "Change a criterion with lightning-cka report ... --criteria cka.far_alike=0.6 (several allowed, or a JSON "
        "file of them); docs/report.md describes each."
    )

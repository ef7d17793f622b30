"""Two groups of runs set against each other, figure by figure: group means, their difference, and which part is real.

Every figure of a probe compares the same way by its panels' kinds, so every analysis is compared without code of its
own: heatmaps become the two group means and their difference A - B with the cells that differ significantly marked;
curves, dots and scatters overlay both groups with their spread.

Significance per cell: Welch's t on the difference of the group means, each side's variance of its mean ``s² / n``
over its ``n >= 2`` runs (``n - 1`` degrees of freedom); Benjamini-Hochberg across the cells of one heatmap keeps the
false discovery rate at ``alpha``. The diagonal of a heatmap of a model's layers with themselves (``Heatmap.joint``)
is not tested; that of two models' layers is, even when their layer names are equal (a same-architecture reference).

With a single run on either side nothing is marked: a run's jackknife standard errors say how much its probe images
move a cell, not how much another seed would, and between two seeds of the same setup they mark most cells. The
caption says so and how many seeds would do.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_cka.figures.cka import change_panel
from lightning_cka.figures.spec import Curves, Dots, Figure, Heatmap, Line, Scatter, Series
from lightning_cka.stats import benjamini_hochberg, welch_test

ONE_RUN = "seed variation unknown, no cell is marked; train 2 or more seeds a side (3 for a claim)"


@dataclass
class Group:
    """One side of a comparison: a label and, per run, its figures.

    Attributes:
        label: how figures name the side.
        figures: per run, its figures at the compared step (the tests take the runs as samples).
    """

    label: str
    figures: list[list[Figure]]

    @property
    def runs(self) -> int:
        """Runs in the group."""
        return len(self.figures)


def compare_groups(a: Group, b: Group, alpha: float = 0.05, note: str = "") -> tuple[list[Figure], dict[str, str]]:
    """One comparison figure per figure tag that every run of both groups has.

    A figure whose runs have other rows, columns or x positions (a block without skip connection left out of one
    side's skip ratios, say) cannot be set cell by cell against the other side's; it is left out, the others are kept.

    Args:
        a: side A.
        b: side B.
        alpha: false discovery rate of the marked differences.
        note: added to every caption (e.g. that the runs probed different images).

    Returns:
        The comparison figures, and the tags left out with the reason.

    Raises:
        ValueError: no figure can be compared: the runs have other layers in every one.
    """
    tags = [f.tag for f in a.figures[0]]
    for runs in (a.figures, b.figures):
        for figures in runs:
            tags = [t for t in tags if t in {f.tag for f in figures}]
    out, apart = [], {}
    for tag in tags:
        per_run_a = [next(f for f in figures if f.tag == tag) for figures in a.figures]
        per_run_b = [next(f for f in figures if f.tag == tag) for figures in b.figures]
        panels = []
        try:
            for i in range(len(per_run_a[0].panels)):
                pa, pb = [f.panels[i] for f in per_run_a], [f.panels[i] for f in per_run_b]
                panels += _compare_panels(pa, pb, a, b, alpha)
        except ValueError as err:
            apart[tag] = str(err)
            continue
        caption = " ".join(p for p in (_caption(per_run_a[0], a, b, alpha), note) if p)
        title = f"{per_run_a[0].title}: {a.label} vs {b.label}"
        out.append(Figure(tag, title, tuple(panels), caption, _subtitle(per_run_a[0], per_run_b[0], a, b)))
    if apart and not out:
        raise ValueError(next(iter(apart.values())))
    return out, apart


def _compare_panels(pa: list, pb: list, a: Group, b: Group, alpha: float) -> list:
    kind = type(pa[0])
    _check_same_axes(pa + pb, a, b)
    if kind is Heatmap:
        return _heatmaps(pa, pb, a, b, alpha)
    if kind is Dots:
        return _dots(pa, pb, a, b)
    if kind is Curves:
        return [_curves(pa, pb, a, b)]
    return [_scatter(pa, pb, a, b)]


def _heatmaps(pa: list[Heatmap], pb: list[Heatmap], a: Group, b: Group, alpha: float) -> list[Heatmap]:
    first = pa[0]
    mean_a, mean_b = np.mean([p.values for p in pa], axis=0), np.mean([p.values for p in pb], axis=0)
    diff = mean_a - mean_b
    significant = None
    if min(a.runs, b.runs) >= 2:
        p_values = cell_p_values([p.values for p in pa], [p.values for p in pb])
        if any(p.joint for p in pa + pb):  # a layer with itself is no test
            np.fill_diagonal(p_values, np.nan)
        significant = benjamini_hochberg(p_values, alpha)
    means = [
        Heatmap(
            m,
            first.rows,
            first.cols,
            first.row_label,
            first.col_label,
            f"{g.label}{_mean_of(g)}",
            first.vmin,
            first.vmax,
            first.cmap,
            first.colorbar,
        )
        for m, g in ((mean_a, a), (mean_b, b))
    ]
    change = change_panel(diff, first.rows, first.cols, title=f"{a.label} − {b.label}")
    change = Heatmap(
        change.values,
        change.rows,
        change.cols,
        first.row_label,
        first.col_label,
        change.title,
        change.vmin,
        change.vmax,
        "diverging",
        f"difference (scale ±{change.vmax:g})",
        marked=significant,
        mark_label=f"dot: {a.label} and {b.label} differ (FDR {alpha:g})" if significant is not None else "",
    )
    return [*means, change]


def cell_p_values(runs_a: Sequence[np.ndarray], runs_b: Sequence[np.ndarray]) -> np.ndarray:
    """Per cell, the two-sided p-value of Welch's t on the difference of the group means, runs as samples.

    Each side's variance of its mean is ``s² / n`` over its ``n >= 2`` runs, on ``n - 1`` degrees of freedom; NaN
    where a cell is not finite in every run or neither side varies.
    """
    stack_a, stack_b = np.stack(runs_a).astype(np.float64), np.stack(runs_b).astype(np.float64)
    if len(stack_a) < 2 or len(stack_b) < 2:
        raise ValueError("a test over runs needs 2 or more runs a side.")
    stats = [
        (s.mean(axis=0), s.var(axis=0, ddof=1) / len(s), np.full(s.shape[1:], len(s) - 1.0)) for s in (stack_a, stack_b)
    ]
    return welch_test(*stats[0], *stats[1])


def _dots(pa: list[Dots], pb: list[Dots], a: Group, b: Group) -> list:
    """Every head of every run per group as dots, and per layer the group's mean over heads with its spread."""
    first = pa[0]
    pooled = [Series(g.label, np.concatenate([p.series[0].values for p in ps], axis=1)) for ps, g in ((pa, a), (pb, b))]
    ylim = _shared_ylim([*pa, *pb])
    dots = Dots(first.x, tuple(pooled), first.x_label, first.y_label, first.title, _lines(pa, pb), ylim)
    layer_means = []
    for ps, g in ((pa, a), (pb, b)):
        per_run = np.stack([np.nanmean(p.series[0].values, axis=1) for p in ps])  # (runs, layers)
        spread = per_run.std(axis=0, ddof=1) if len(ps) > 1 else None
        layer_means.append(Series(g.label, per_run.mean(axis=0), spread))
    label = f"{first.y_label}, mean over heads"
    curves = Curves(first.x, tuple(layer_means), first.x_label, label, "", _lines(pa, pb), ylim)
    return [dots, curves]


def _shared_ylim(panels: list[Dots]) -> tuple[float, float] | None:
    """The y range that holds every run's own range (each run's panel keeps its heads and lines in view)."""
    limits = [p.ylim for p in panels]
    if any(limit is None for limit in limits):
        return None
    return min(low for low, _ in limits), max(high for _, high in limits)


def _curves(pa: list[Curves], pb: list[Curves], a: Group, b: Group) -> Curves:
    first = pa[0]
    # Curves by label: a side shows the curves all of its runs drew (a class-token curve only where there is a CLS).
    names = list(dict.fromkeys(s.label for p in (*pa, *pb) for s in p.series))
    series = []
    for name in names:
        for ps, g in ((pa, a), (pb, b)):
            if not all(name in {s.label for s in p.series} for p in ps):
                continue
            own = [next(s for s in p.series if s.label == name) for p in ps]
            stack = np.stack([s.values for s in own])
            spread = stack.std(axis=0, ddof=1) if len(ps) > 1 else own[0].error
            label = f"{g.label}: {name}" if name else g.label
            series.append(Series(label, stack.mean(axis=0), spread))
    if not series:
        raise ValueError(f"the runs of {a.label} and {b.label} draw different curves in {first.title!r}.")
    return Curves(first.x, tuple(series), first.x_label, first.y_label, first.title, _lines(pa, pb), first.ylim)


def _scatter(pa: list[Scatter], pb: list[Scatter], a: Group, b: Group) -> Scatter:
    first = pa[0]
    series = [
        Series(g.label, np.concatenate([s.values for p in ps for s in p.series], axis=0))
        for ps, g in ((pa, a), (pb, b))
    ]
    return Scatter(tuple(series), first.x_label, first.y_label, first.title, _lines(pa, pb))


def _lines(pa: Sequence, pb: Sequence) -> tuple[Line, ...]:
    """The reference lines of both groups, once each (the same threshold when the runs share their geometry)."""
    seen: dict[tuple, Line] = {}
    for panel in (*pa, *pb):
        for line in panel.lines:
            # Lines whose labels differ only in their numbers (each run's own chance level) are drawn once, the first
            # run's: their labels would overprint each other; the report's tables give every run's value.
            seen.setdefault((re.sub(r"-?[\d.]+", "#", line.label), line.axis), line)
    return tuple(seen.values())


def _check_same_axes(panels: list, a: Group, b: Group) -> None:
    first = panels[0]
    axes = (getattr(first, "rows", None), getattr(first, "cols", None), getattr(first, "x", None))
    for panel in panels[1:]:
        if (getattr(panel, "rows", None), getattr(panel, "cols", None), getattr(panel, "x", None)) != axes:
            raise ValueError(
                f"the runs of {a.label} and {b.label} monitor different layers ({_names(axes)} vs "
                f"{_names((getattr(panel, 'rows', None), getattr(panel, 'cols', None), getattr(panel, 'x', None)))})."
            )


def _names(axes: tuple) -> str:
    names = next((list(n) for n in axes if n), [])
    return f"{len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def _mean_of(group: Group) -> str:
    return f", mean of {group.runs} runs" if group.runs > 1 else ""


def _caption(figure: Figure, a: Group, b: Group, alpha: float) -> str:
    single = one_run(a, b)
    if not any(isinstance(p, Heatmap) for p in figure.panels):
        spread = (
            "bars: sd over runs"
            if max(a.runs, b.runs) > 1
            else "bands: one standard error over the probe images, not over seeds"
        )
        seeds = single.split(":")[0] + ": seed variation unknown" if single else ""
        return f"Both groups overlaid ({spread})." + (f" {seeds[0].upper()}{seeds[1:]}." if seeds else "")
    if single:
        return f"Bottom: the difference of the means. {single[0].upper()}{single[1:]}."
    return (
        "Bottom: the difference of the means; dots mark cells where the groups differ (Welch's t over runs, "
        f"Benjamini-Hochberg across cells, FDR {alpha:g})."
    )


def one_run(a: Group, b: Group) -> str:
    """``"one run per side: seed variation unknown, ..."`` when a side has a single run, else ``""``."""
    if min(a.runs, b.runs) >= 2:
        return ""
    who = "one run per side" if max(a.runs, b.runs) == 1 else f"one run of {a.label if a.runs == 1 else b.label}"
    return f"{who}: {ONE_RUN}"


def _subtitle(fa: Figure, fb: Figure, a: Group, b: Group) -> str:
    steps = {f.subtitle.split(" · ")[1] if " · " in f.subtitle else "" for f in (fa, fb)}
    runs = f"{a.runs} vs {b.runs} run{'s' * (b.runs > 1)}"
    return " · ".join(p for p in (runs, *sorted(s for s in steps if s)) if p)

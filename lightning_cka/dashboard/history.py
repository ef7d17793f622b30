"""One cell's or one point's value over every kept step, computed on the server.

The first history request of a (run, tag) decodes every step once into float32 stacks shaped like the last step's
panels (a step whose panel has another shape or kind contributes NaN); later requests index the stacks, so hovering
over a 200-layer heatmap does not download or re-parse a hundred figures.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_cka.dashboard.store import Samples, parse_figure


class HistoryError(ValueError):
    """A history request that names no cell or point of the figure."""


@dataclass
class PanelStack:
    """One panel's arrays over steps: ``fields["values"]`` is ``(S, ...)`` for a heatmap, one per series otherwise."""

    kind: str
    panel: dict[str, Any]  # the last step's panel, for names and labels
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    series: list[dict[str, np.ndarray]] = field(default_factory=list)


@dataclass
class FigureStack:
    """Every panel of one (run, tag) over its kept steps."""

    steps: list[int]
    probes: list[str | None]
    panels: list[PanelStack]

    @property
    def nbytes(self) -> int:
        """Memory held by the stacks."""
        arrays = [a for p in self.panels for a in (*p.fields.values(), *(a for s in p.series for a in s.values()))]
        return sum(a.nbytes for a in arrays) + 64 * len(self.steps)


def stack(samples: Samples) -> FigureStack:
    """Decode every step of a series into stacks; steps that are not figures are left out."""
    figures, steps = [], []
    for sample in samples.samples:
        try:
            figures.append(parse_figure(sample.payload))
        except ValueError:
            continue
        steps.append(sample.step)
    probes = [(f.get("meta") or {}).get("probe") for f in figures]
    if not figures:
        return FigureStack([], [], [])
    panels = []
    for p, last in enumerate(figures[-1]["panels"]):
        kind = last.get("kind")
        at = [f["panels"][p] if p < len(f["panels"]) and f["panels"][p].get("kind") == kind else None for f in figures]
        out = PanelStack(kind, last)
        if kind == "heatmap":
            for name in ("values", "error", "null", "marked"):
                if last.get(name) is not None:
                    out.fields[name] = _stack([None if panel is None else panel.get(name) for panel in at])
        elif kind in ("dots", "curves", "scatter"):
            for s in range(len(last.get("series") or [])):
                series = [_series(panel, s) for panel in at]
                out.series.append({name: _stack([x and x.get(name) for x in series]) for name in ("values", "error")})
        panels.append(out)
    return FigureStack(steps, probes, panels)


def history(figure: FigureStack, panel: int, args: dict[str, str]) -> dict[str, Any]:
    """The history of one element of ``panel``, as JSON-ready builtins.

    Args:
        figure: the stacks of the series.
        panel: index of the panel in the figure.
        args: which element: ``row`` and ``col`` for a heatmap cell, ``x`` (index of a layer) for dots and curves,
            ``series`` and ``point`` for a scatter point.

    Returns:
        ``{"steps", "probes", "kind", "label", "y_label", "series": [{"label", "values", "error"}]}``: one
        series per line of the chart (one per head for dots, per curve for curves, ``x`` and ``y`` for a scatter
        point); heatmaps add ``null`` and ``marked`` (``None`` when absent), dots and curves their horizontal
        reference ``lines``.

    Raises:
        HistoryError: when the panel or element does not exist.
    """
    if not 0 <= panel < len(figure.panels):
        raise HistoryError(f"panel {panel} does not exist; the figure has {len(figure.panels)}")
    stack_ = figure.panels[panel]
    p = stack_.panel
    out: dict[str, Any] = {"steps": figure.steps, "probes": figure.probes, "kind": stack_.kind}
    if stack_.kind == "heatmap":
        values = stack_.fields["values"]
        row, col = _index(args, "row", values.shape[1]), _index(args, "col", values.shape[2])
        out["label"] = f"{p['rows'][row]} × {p['cols'][col]}"
        out["y_label"] = p.get("colorbar") or "value"
        error = stack_.fields.get("error")
        out["series"] = [
            {"label": out["y_label"], "values": _list(values[:, row, col]), "error": _cell(error, row, col)}
        ]
        out["null"] = _cell(stack_.fields.get("null"), row, col)
        marked = stack_.fields.get("marked")
        out["marked"] = None if marked is None else [bool(v == 1) for v in marked[:, row, col]]
    elif stack_.kind in ("dots", "curves"):
        x = _index(args, "x", len(p["x"]))
        out["label"] = f"{p.get('x_label') or 'x'} {p['x'][x]}"
        out["y_label"] = p.get("y_label") or "value"
        out["lines"] = [line for line in p.get("lines") or [] if line.get("axis", "y") == "y"]
        out["series"] = []
        for s, series in enumerate(stack_.series):
            name = p["series"][s].get("label") or ""
            values, error = series["values"], series["error"]
            if stack_.kind == "curves" and values.ndim == 2:
                out["series"].append({"label": name, "values": _list(values[:, x]), "error": _column(error, x)})
                continue
            if values.ndim == 2:  # dots with one point per layer
                values, error = values[..., None], None if error is None else error[..., None]
            for k in range(values.shape[2]):  # dots: one line per head
                label = f"{name} head {k}".strip()
                out["series"].append({"label": label, "values": _list(values[:, x, k]), "error": _column(error, x, k)})
    elif stack_.kind == "scatter":
        s = _index(args, "series", len(stack_.series))
        values = stack_.series[s]["values"]
        point = _index(args, "point", values.shape[1])
        name = p["series"][s].get("label") or ""
        out["label"] = f"{name} point {point}".strip()
        out["y_label"] = ""
        out["series"] = [
            {"label": p.get("x_label") or "x", "values": _list(values[:, point, 0]), "error": None},
            {"label": p.get("y_label") or "y", "values": _list(values[:, point, 1]), "error": None},
        ]
    else:
        raise HistoryError(f"panel {panel} is of unknown kind {stack_.kind!r}")
    return out


def _series(panel: dict[str, Any] | None, s: int) -> dict[str, Any] | None:
    series = (panel or {}).get("series") or []
    return series[s] if s < len(series) else None


def _stack(arrays: list[Any]) -> np.ndarray:
    """Stack per-step nested lists into ``(S, *shape of the last)``; a step of another shape becomes NaN."""
    last = _array(arrays[-1])
    out = np.full((len(arrays), *last.shape), np.nan, dtype=np.float32)
    for i, a in enumerate(arrays):
        if a is None:
            continue
        try:
            a = _array(a)
        except (TypeError, ValueError):  # ragged, or not numbers
            continue
        if a.shape == last.shape:
            out[i] = a
    return out


def _array(a: Any) -> np.ndarray:
    # JSON null (NaN in the figure) becomes NaN; marked's booleans become 0 and 1.
    return np.asarray(math.nan if a is None else a, dtype=np.float32)


def _index(args: dict[str, str], name: str, size: int) -> int:
    raw = args.get(name)
    try:
        i = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HistoryError(f"`{name}` must be an integer index; got {raw!r}") from None
    if not 0 <= i < size:
        raise HistoryError(f"`{name}` {i} is out of range: 0 to {size - 1}")
    return i


def _list(values: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(v) else round(float(v), 7) for v in values]


def _cell(stacked: np.ndarray | None, row: int, col: int) -> list[float | None] | None:
    return None if stacked is None else _list(stacked[:, row, col])


def _column(stacked: np.ndarray | None, *index: int) -> list[float | None] | None:
    if stacked is None or np.isnan(stacked).all():
        return None
    return _list(stacked[(slice(None), *index)])

"""What a figure shows, as plain data.

Every picture of the package is a :class:`Figure`: a tag, a title, a caption that says how to read it, and panels of
four kinds (:class:`Heatmap`, :class:`Dots`, :class:`Curves`, :class:`Scatter`). An analysis builds the figure from
a probe's arrays once; matplotlib draws it for TensorBoard images, ``CKAResult.plot()`` and the command line, and the
TensorBoard dashboard receives the same figure as JSON (:func:`to_json`), so every view shows the same numbers with
the same labels.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

Axis = Literal["x", "y"]


@dataclass(frozen=True)
class Line:
    """A labelled reference line across a panel, e.g. the local-head threshold."""

    value: float
    label: str
    axis: Axis = "y"
    style: Literal["dashed", "dotted", "solid"] = "dashed"


@dataclass(frozen=True)
class Series:
    """One run's (or one group's) values in a :class:`Curves`, :class:`Dots` or :class:`Scatter` panel.

    Attributes:
        label: legend entry; empty for a panel with one series.
        values: ``(X,)`` for curves, ``(X, K)`` for dots (NaN pads missing points), ``(N, 2)`` ``(x, y)`` points
            for a scatter.
        error: error-bar half-widths shaped like ``values`` (one standard error, or one standard deviation over a
            group of runs: :attr:`Figure.caption` says which), or ``None``.
    """

    label: str
    values: np.ndarray
    error: np.ndarray | None = None


@dataclass(frozen=True)
class Heatmap:
    """A matrix of values with named rows (y axis, first row at the bottom) and columns (x axis).

    Attributes:
        values: ``(R, C)``; NaN cells are left blank.
        rows: ``R`` row names.
        cols: ``C`` column names.
        row_label: y axis label.
        col_label: x axis label.
        title: panel title.
        vmin: value at the bottom of the colour scale; values below it are clipped and the colour bar shows an arrow.
        vmax: value at the top of the colour scale.
        cmap: ``"sequential"`` (0 dark, 1 bright) or ``"diverging"`` (blue negative, red positive, white 0).
        colorbar: colour bar label.
        error: ``(R, C)`` standard errors, or ``None``.
        null: ``(R, C)`` null thresholds (|value| at or below them is what unrelated images give), or ``None``.
        marked: ``(R, C)`` bool, cells drawn with a dot, or ``None``.
        mark_label: what a dot means, for the legend.
        joint: rows and columns are the same layers of the same model (a layer with itself on the diagonal, where
            there is nothing to test); ``False`` for two models, even of one architecture with equal layer names.
    """

    values: np.ndarray
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    row_label: str = "layer"
    col_label: str = "layer"
    title: str = ""
    vmin: float = 0.0
    vmax: float = 1.0
    cmap: Literal["sequential", "diverging"] = "sequential"
    colorbar: str = "CKA"
    error: np.ndarray | None = None
    null: np.ndarray | None = None
    marked: np.ndarray | None = None
    mark_label: str = ""
    joint: bool = False


@dataclass(frozen=True)
class Dots:
    """A column of points per named x position (the heads of each layer), one colour per series."""

    x: tuple[str, ...]
    series: tuple[Series, ...]
    x_label: str = "layer"
    y_label: str = ""
    title: str = ""
    lines: tuple[Line, ...] = ()
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Curves:
    """One line per series over named x positions (layers or blocks)."""

    x: tuple[str, ...]
    series: tuple[Series, ...]
    x_label: str = "layer"
    y_label: str = ""
    title: str = ""
    lines: tuple[Line, ...] = ()
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Scatter:
    """Points ``(x, y)``, one colour per series."""

    series: tuple[Series, ...]
    x_label: str = ""
    y_label: str = ""
    title: str = ""
    lines: tuple[Line, ...] = ()


Panel = Heatmap | Dots | Curves | Scatter
PANEL_KINDS: dict[str, type] = {"heatmap": Heatmap, "dots": Dots, "curves": Curves, "scatter": Scatter}


@dataclass(frozen=True)
class Figure:
    """One picture: panels side by side under a title.

    Attributes:
        tag: the TensorBoard tag (``cka/intra``), also the file name stem of ``lightning-cka plot``.
        title: what is shown, in words.
        panels: the panels, left to right.
        caption: one or two sentences on how to read it, printed under the panels.
        subtitle: which run and step (``vit-digits/version_0, step 300``).
    """

    tag: str
    title: str
    panels: tuple[Panel, ...]
    caption: str = ""
    subtitle: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def to_json(figure: Figure) -> dict[str, Any]:
    """The figure as JSON-ready builtins: arrays become nested lists, NaN and inf become ``None``.

    Example:
        >>> import numpy as np
        >>> fig = Figure("t", "title", (Curves(x=("a", "b"), series=(Series("", np.array([0.5, np.nan])),)),))
        >>> to_json(fig)["panels"][0]["series"][0]["values"]
        [0.5, None]
    """
    return _encode(figure)


def from_json(data: dict[str, Any]) -> Figure:
    """The inverse of :func:`to_json` (``None`` cells come back as NaN)."""
    panels = tuple(_decode_panel(p) for p in data["panels"])
    return Figure(
        tag=data["tag"],
        title=data["title"],
        panels=panels,
        caption=data.get("caption", ""),
        subtitle=data.get("subtitle", ""),
        meta=dict(data.get("meta") or {}),
    )


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype == bool:
            return value.tolist()
        return _finite_or_none(value.astype(np.float64).tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Series | Line | Figure) or type(value) in PANEL_KINDS.values():
        out = {f.name: _encode(getattr(value, f.name)) for f in fields(value)}
        kind = next((k for k, cls in PANEL_KINDS.items() if type(value) is cls), None)
        return {"kind": kind, **out} if kind else out
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return _encode(value.item())
    return value


def _finite_or_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_finite_or_none(v) for v in values]
    return values if math.isfinite(values) else None


def _decode_panel(data: dict[str, Any]) -> Panel:
    cls = PANEL_KINDS[data["kind"]]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "series":
            value = tuple(
                Series(s["label"], _array(s["values"]), None if s.get("error") is None else _array(s["error"]))
                for s in value
            )
        elif f.name == "lines":
            value = tuple(Line(**line) for line in value)
        elif f.name == "marked":
            value = None if value is None else np.asarray(value, dtype=bool)
        elif f.name in ("values", "error", "null"):
            value = None if value is None else _array(value)
        elif f.name in ("rows", "cols", "x"):
            value = tuple(value)
        elif f.name == "ylim":
            value = None if value is None else tuple(value)
        elif f.name in ("vmin", "vmax"):
            value = float("nan") if value is None else float(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _array(values: Any) -> np.ndarray:
    return np.array(_none_to_nan(values), dtype=np.float64)


def _none_to_nan(values: Any) -> Any:
    if isinstance(values, list):
        return [_none_to_nan(v) for v in values]
    return float("nan") if values is None else values

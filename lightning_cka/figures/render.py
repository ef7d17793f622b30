"""Matplotlib drawings of figure specs: TensorBoard images, ``CKAResult.plot()`` and the command line's files.

Everything draws on ``matplotlib.figure.Figure`` objects, never on pyplot's global state, so figures can be rendered
off the training thread. Panels are stacked in one column, 5.2 inches wide: TensorBoard scales an image to its card's
width (about 330 pixels), so a single column keeps the 11-point labels legible there.
"""

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D

from lightning_cka.figures.spec import Curves, Dots, Figure, Heatmap, Panel, Scatter

WIDTH = 5.2  # inches, at 100 dpi: TensorBoard shows it about 0.63x
FONT = 11
SMALL = 9.5
TITLE_WIDTH = 48  # characters of a panel title per line: longer titles (a checkpoint path) wrap, never clip
CMAPS = {"sequential": "magma", "diverging": "RdBu_r"}
LINE_STYLES = {"dashed": "--", "dotted": ":", "solid": "-"}
COLORS = ("C0", "C3", "C2", "C1", "C4", "C5", "C6", "C7", "C8", "C9")
_HEIGHTS = {Heatmap: 3.8, Dots: 3.0, Curves: 2.9, Scatter: 3.3}


@dataclass
class Drawing:
    """A figure spec drawn on matplotlib: the figure, its panel axes, the anchors of its texts, the changing artists."""

    fig: Any
    axes: list[Any]
    title: Any
    caption: Any
    dynamic: list[Artist]


def draw_figure(figure: Figure, container: Any = None) -> Drawing:
    """Draw ``figure`` into a new matplotlib figure (or into ``container``, a figure or subfigure).

    The title is a static suptitle with room for the subtitle under it; the caption sits in a blank ``supxlabel`` that
    reserves its lines. Subtitle and caption are annotations anchored to those two, so that :class:`FrameCache` can
    redraw them (with the data) on a cached frame whose layout is fixed.
    """
    if container is None:
        container = MplFigure(figsize=(WIDTH, _figure_height(figure)), layout="constrained", dpi=100)
    axes = list(container.subplots(len(figure.panels), 1, squeeze=False)[:, 0])
    dynamic: list[Artist] = []
    for ax, panel in zip(axes, figure.panels, strict=True):
        dynamic += draw_panel(panel, ax)[2]
    title = container.suptitle(f"{_wrap(figure.title, TITLE_WIDTH)}\n", fontsize=FONT + 2, fontweight="bold")
    caption = _wrap(figure.caption)
    blank = "\n".join(" " for _ in range(caption.count("\n") + 1)) if caption else ""
    anchor = container.supxlabel(blank, x=0.01, ha="left", fontsize=SMALL)
    drawing = Drawing(container, axes, title, anchor, dynamic)
    drawing.dynamic += _texts(drawing, figure)
    return drawing


def _texts(drawing: Drawing, figure: Figure) -> list[Artist]:
    """The subtitle under the title and the caption in its reserved lines (annotations anchored to both)."""
    texts = []
    ax = drawing.axes[0]
    if figure.subtitle:
        texts.append(
            ax.annotate(
                figure.subtitle,
                (0.5, 0.08),
                xycoords=drawing.title,
                ha="center",
                va="bottom",
                fontsize=SMALL,
                color="0.3",
                annotation_clip=False,
            )
        )
    caption = _wrap(figure.caption)
    if caption:
        texts.append(
            ax.annotate(
                caption,
                (0.0, 0.0),
                xycoords=drawing.caption,
                ha="left",
                va="bottom",
                fontsize=SMALL,
                color="0.25",
                annotation_clip=False,
            )
        )
    for text in texts:  # their room is reserved by the title and the blank supxlabel, not by the axes
        text.set_in_layout(False)
    return texts


def draw_figures(figures: Sequence[Figure]) -> MplFigure:
    """All ``figures`` in one matplotlib figure, two per row (``CKAResult.plot()``)."""
    if not figures:
        raise ValueError("there is nothing to plot: the probe holds no field that a figure shows.")
    columns = min(2, len(figures))
    rows = -(-len(figures) // columns)
    heights = [max(_figure_height(f) for f in figures[r * columns : (r + 1) * columns]) for r in range(rows)]
    fig = MplFigure(figsize=(WIDTH * columns, sum(heights)), layout="constrained", dpi=100)
    subfigures = np.atleast_1d(fig.subfigures(rows, columns, height_ratios=heights)).reshape(-1)
    for i, (sub, figure) in enumerate(zip(subfigures, figures, strict=False)):
        own, row = _figure_height(figure), heights[i // columns]
        if own < row:  # a shorter figure keeps its own height at the top of the row instead of being stretched
            sub = sub.subfigures(2, 1, height_ratios=[own, row - own])[0]
        draw_figure(figure, sub)
    return fig


def _figure_height(figure: Figure) -> float:
    """Inches a figure needs at ``WIDTH``: its panels, the (wrapped) title and subtitle, and its caption lines."""
    caption = _wrap(figure.caption)
    title_lines = _wrap(figure.title, TITLE_WIDTH).count("\n")
    panels = sum(_panel_height(p) for p in figure.panels)
    return panels + 0.75 + 0.22 * title_lines + 0.17 * (caption.count("\n") + bool(caption))


def draw_panel(panel: Panel, ax: Any = None) -> tuple[Any, Any, list[Artist]]:
    """Draw one panel on ``ax`` (a new single-panel figure when ``None``); returns ``(fig, ax, dynamic artists)``."""
    if ax is None:
        fig = MplFigure(figsize=(WIDTH, _panel_height(panel)), layout="constrained", dpi=100)
        ax = fig.add_subplot()
    draw = {Heatmap: _heatmap, Dots: _dots, Curves: _curves, Scatter: _scatter}[type(panel)]
    artists = draw(panel, ax)
    if panel.title:
        ax.set_title(_wrap(panel.title, TITLE_WIDTH), fontsize=FONT)
    ax.tick_params(labelsize=SMALL)
    return ax.figure, ax, artists


def to_image(fig: Any) -> np.ndarray:
    """Render a matplotlib figure with Agg to an ``(H, W, 3)`` uint8 array (thread-safe: no pyplot involved)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class FrameCache:
    """Render figures as ``(H, W, 3)`` images, reusing each tag's static frame across probes.

    A fresh matplotlib figure costs a tenth of a second or more, almost all of it in axes, ticks and text that stay the
    same from probe to probe. Each tag's figure is therefore drawn in full once; its frame without the changing artists
    (data, subtitle, caption) is kept as pixels, and later probes with the same frame only draw their changing artists
    on top of it. A figure whose frame differs (other layers, another colour scale or axis range) is drawn anew.
    """

    def __init__(self) -> None:
        self._frames: dict[str, tuple[tuple, Drawing, Any]] = {}

    def render(self, figure: Figure) -> np.ndarray:
        """The image of ``figure``."""
        key = frame_key(figure)
        cached = self._frames.get(figure.tag)
        if cached is None or cached[0] != key:
            drawing = draw_figure(figure)
            canvas = FigureCanvasAgg(drawing.fig)
            canvas.draw()  # lays the figure out with every artist in place ...
            drawing.fig.set_layout_engine("none")  # ... and keeps that layout for the frames drawn on it
            image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
            for artist in drawing.dynamic:
                artist.remove()
            canvas.draw()
            self._frames[figure.tag] = (key, drawing, canvas.copy_from_bbox(drawing.fig.bbox))
            return image
        _, drawing, background = cached
        canvas = drawing.fig.canvas
        canvas.restore_region(background)
        fresh = [
            a for ax, panel in zip(drawing.axes, figure.panels, strict=True) for a in _DATA[type(panel)](panel, ax)
        ]
        fresh += _texts(drawing, figure)
        for artist in fresh:
            artist.axes.draw_artist(artist)
        # The spines sit above the data in a full draw, so they are drawn again over it.
        for ax in drawing.axes:
            for spine in ax.spines.values():
                ax.draw_artist(spine)
        image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        for artist in fresh:
            artist.remove()
        return image


def frame_key(figure: Figure) -> tuple:
    """What a figure's static frame depends on: everything but the data, the subtitle and the caption's words."""
    parts: list[Any] = [figure.tag, figure.title, len(figure.panels), _wrap(figure.caption).count("\n")]
    for panel in figure.panels:
        if isinstance(panel, Heatmap):
            parts.append(
                (
                    "heatmap",
                    panel.rows,
                    panel.cols,
                    panel.row_label,
                    panel.col_label,
                    panel.title,
                    panel.vmin,
                    panel.vmax,
                    panel.cmap,
                    panel.colorbar,
                    _extend(panel),
                )
            )
        else:
            limits = _limits(panel)
            parts.append(
                (
                    type(panel).__name__,
                    getattr(panel, "x", None),
                    panel.x_label,
                    panel.y_label,
                    panel.title,
                    panel.lines,
                    tuple(s.label for s in panel.series),
                    limits,
                )
            )
    return tuple(parts)


# ------------------------------------------------------------------------------------------------------- heatmaps


def _heatmap(panel: Heatmap, ax: Any) -> list[Artist]:
    rows, cols = panel.values.shape
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)  # row 0 at the bottom, as in Raghu et al. 2021
    _ticks(ax.set_yticks, ax.set_yticklabels, panel.rows, rows, _axis_pixels(ax, "y"))
    _ticks(ax.set_xticks, ax.set_xticklabels, panel.cols, cols, _axis_pixels(ax, "x"), rotation=90)
    ax.set_ylabel(panel.row_label, fontsize=FONT)
    ax.set_xlabel(panel.col_label, fontsize=FONT)
    mappable = ScalarMappable(Normalize(panel.vmin, panel.vmax), colormaps[CMAPS[panel.cmap]])
    bar = ax.figure.colorbar(mappable, ax=ax, extend=_extend(panel))
    bar.set_label(panel.colorbar, fontsize=FONT)
    bar.ax.tick_params(labelsize=SMALL)
    return _heatmap_data(panel, ax)


def _heatmap_data(panel: Heatmap, ax: Any) -> list[Artist]:
    rows, cols = panel.values.shape
    image = ax.imshow(
        panel.values,
        origin="lower",
        vmin=panel.vmin,
        vmax=panel.vmax,
        cmap=CMAPS[panel.cmap],
        interpolation="nearest",
        aspect="auto",
        extent=(-0.5, cols - 0.5, -0.5, rows - 0.5),
    )
    artists: list[Artist] = [image]
    if panel.marked is not None and panel.marked.any():
        r, c = np.nonzero(panel.marked)
        size = max(2.0, min(30.0, (_axis_pixels(ax, "x") / max(cols, rows)) ** 2 / 40))
        artists.append(ax.scatter(c, r, s=size, c="white", edgecolors="black", linewidths=0.4, zorder=3))
    return artists


def _extend(panel: Heatmap) -> str:
    """Which ends of the colour bar get an arrow: values beyond the fixed scale are clipped, and say so."""
    finite = panel.values[np.isfinite(panel.values)]
    low = bool(finite.size and finite.min() < panel.vmin - 1e-9)
    high = bool(finite.size and finite.max() > panel.vmax + 1e-9)
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[(low, high)]


# ----------------------------------------------------------------------------------------------- dots and curves


def _dots(panel: Dots, ax: Any) -> list[Artist]:
    count = len(panel.x)
    ax.set_xlim(-0.6, count - 0.4)
    ax.set_ylim(*_limits(panel))
    _ticks(ax.set_xticks, ax.set_xticklabels, panel.x, count, _axis_pixels(ax, "x"), rotation=90)
    _axes_labels(ax, panel)
    _reference_lines(ax, panel)
    _legend(ax, panel)
    return _dots_data(panel, ax)


def _dots_data(panel: Dots, ax: Any) -> list[Artist]:
    artists = []
    groups = len(panel.series)
    for g, series in enumerate(panel.series):
        values = series.values
        heads = values.shape[1]
        # Spread each layer's heads (and each group) sideways, so heads at the same distance stay visible.
        width = 0.7 / groups
        offsets = g * width - 0.35 + width * (np.arange(heads) + 0.5) / heads
        x = (np.arange(values.shape[0])[:, None] + offsets[None, :]).ravel()
        y = values.ravel()
        keep = np.isfinite(y)
        color = COLORS[g % len(COLORS)] if groups > 1 else "C0"
        artists.append(
            ax.scatter(x[keep], y[keep], s=22, alpha=0.85, color=color, edgecolors="white", linewidths=0.4, zorder=3)
        )
        if series.error is not None:
            err = series.error.ravel()
            artists.append(
                ax.errorbar(
                    x[keep], y[keep], yerr=err[keep], fmt="none", ecolor=color, elinewidth=0.8, alpha=0.6, zorder=2
                ).lines[2][0]
            )
    return artists


def _curves(panel: Curves, ax: Any) -> list[Artist]:
    count = len(panel.x)
    ax.set_xlim(-0.3, count - 0.7)
    ax.set_ylim(*_limits(panel))
    _ticks(ax.set_xticks, ax.set_xticklabels, panel.x, count, _axis_pixels(ax, "x"), rotation=90)
    _axes_labels(ax, panel)
    _reference_lines(ax, panel)
    _legend(ax, panel)
    return _curves_data(panel, ax)


def _curves_data(panel: Curves, ax: Any) -> list[Artist]:
    artists = []
    x = np.arange(len(panel.x))
    for g, series in enumerate(panel.series):
        color = COLORS[g % len(COLORS)]
        (line,) = ax.plot(x, series.values, marker="o", markersize=4, color=color, zorder=3)
        artists.append(line)
        if series.error is not None:
            low, high = series.values - series.error, series.values + series.error
            artists.append(ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0, zorder=2))
    return artists


def _scatter(panel: Scatter, ax: Any) -> list[Artist]:
    xlim, ylim = _limits(panel)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    _axes_labels(ax, panel)
    _reference_lines(ax, panel)
    _legend(ax, panel, marker="o")
    return _scatter_data(panel, ax)


def _scatter_data(panel: Scatter, ax: Any) -> list[Artist]:
    artists = []
    for g, series in enumerate(panel.series):
        points = series.values[np.isfinite(series.values).all(axis=1)]
        artists.append(
            ax.scatter(
                points[:, 0],
                points[:, 1],
                s=24,
                alpha=0.85,
                color=_series_color(g, panel),
                edgecolors="white",
                linewidths=0.4,
                zorder=3,
            )
        )
    return artists


_DATA = {Heatmap: _heatmap_data, Dots: _dots_data, Curves: _curves_data, Scatter: _scatter_data}


def _series_color(index: int, panel: Scatter) -> Any:
    if len(panel.series) > len(COLORS):  # many layers: a sequential colour per layer, low to high
        return colormaps["viridis"](index / max(1, len(panel.series) - 1))
    return COLORS[index % len(COLORS)]


def _limits(panel: Dots | Curves | Scatter) -> Any:
    """Axis ranges from the data and the reference lines, rounded so that the cached frame changes rarely."""
    if isinstance(panel, Scatter):
        points = np.concatenate([s.values for s in panel.series]) if panel.series else np.zeros((0, 2))
        points = points[np.isfinite(points).all(axis=1)]
        if not points.size:
            return (0.0, 1.0), (0.0, 1.0)
        xs = np.concatenate([points[:, 0], [line.value for line in panel.lines if line.axis == "x"]])
        ys = np.concatenate([points[:, 1], [line.value for line in panel.lines if line.axis == "y"]])
        return _padded(xs), _padded(ys, floor_zero=False)
    if panel.ylim is not None:
        return tuple(panel.ylim)
    values = [s.values + (s.error if s.error is not None else 0) for s in panel.series]
    values += [s.values - (s.error if s.error is not None else 0) for s in panel.series]
    values += [np.array([line.value]) for line in panel.lines if line.axis == "y"]
    flat = np.concatenate([np.ravel(v) for v in values]) if values else np.zeros(0)
    return _padded(flat, floor_zero=True)


def _padded(values: np.ndarray, floor_zero: bool = False) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if floor_zero and low >= 0:
        low = 0.0
    span = high - low or abs(high) or 1.0
    # Round to whole decades of the span (or a tenth of the values' size, for a narrow cluster far from 0), so that the
    # range, and with it the cached frame, stays put while the data moves a little from probe to probe.
    magnitude = max(abs(low), abs(high)) or 1.0
    step = max(10 ** np.floor(np.log10(span)), 10 ** np.floor(np.log10(magnitude)) / 10)
    return float(np.floor((low - 0.06 * span) / step) * step), float(np.ceil((high + 0.1 * span) / step) * step)


def _axes_labels(ax: Any, panel: Dots | Curves | Scatter) -> None:
    ax.set_xlabel(panel.x_label, fontsize=FONT)
    ax.set_ylabel(panel.y_label, fontsize=FONT)
    ax.grid(axis="y", color="0.9", linewidth=0.8, zorder=0)


def _reference_lines(ax: Any, panel: Dots | Curves | Scatter) -> None:
    for line in panel.lines:
        style = {"color": "0.35", "linestyle": LINE_STYLES[line.style], "linewidth": 1.1, "zorder": 1}
        if line.axis == "y":
            ax.axhline(line.value, **style)
            ax.annotate(
                line.label,
                (1.0, line.value),
                xycoords=("axes fraction", "data"),
                xytext=(-3, 2),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize=SMALL,
                color="0.25",
            )
        else:
            ax.axvline(line.value, **style)
            ax.annotate(
                line.label,
                (line.value, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                ha="left",
                va="top",
                fontsize=SMALL,
                color="0.25",
                rotation=90,
            )


def _legend(ax: Any, panel: Dots | Curves | Scatter, marker: str = "o") -> None:
    labelled = [(g, s.label) for g, s in enumerate(panel.series) if s.label]
    if not labelled:
        return
    if isinstance(panel, Scatter) and len(panel.series) > len(COLORS):
        labelled = [labelled[0], labelled[-1]]  # a colour ramp: name its ends
    handles = [
        Line2D(
            [],
            [],
            color=_series_color(g, panel) if isinstance(panel, Scatter) else COLORS[g % len(COLORS)],
            marker=marker,
            linestyle="-" if isinstance(panel, Curves) else "none",
            label=label,
        )
        for g, label in labelled
    ]
    ax.legend(handles=handles, fontsize=SMALL, loc="best", framealpha=0.85)


# ----------------------------------------------------------------------------------------------- shared pieces


def _ticks(set_ticks: Any, set_labels: Any, names: Sequence[str], count: int, pixels: float, rotation: int = 0) -> None:
    """Label every position that fits: labels at least 1.5 font heights apart, evenly thinned beyond that."""
    room = max(1, int(pixels / (SMALL * 100 / 72 * 1.5)))
    step = max(1, -(-count // room))
    positions = list(range(0, count, step))
    set_ticks(positions)
    set_labels([str(names[i]) if i < len(names) else str(i) for i in positions], rotation=rotation, fontsize=SMALL)


def _axis_pixels(ax: Any, axis: str) -> float:
    """Approximate length of an axis in pixels before layout (the panel's share of the figure)."""
    width, height = ax.figure.bbox.width, ax.figure.bbox.height  # a figure's or a subfigure's box, in pixels
    spec = ax.get_subplotspec()
    rows = spec.get_gridspec().nrows if spec is not None else 1  # panels stacked in the figure, colour bars aside
    return 0.72 * width if axis == "x" else 0.62 * height / rows


def _panel_height(panel: Panel) -> float:
    height = _HEIGHTS[type(panel)]
    labels = getattr(panel, "cols", None) or getattr(panel, "x", None) or ()
    longest = max((len(str(name)) for name in labels), default=0)
    return height + 0.075 * max(0, longest - 8)  # room for long rotated labels


def _wrap(text: str, width: int = 70) -> str:
    return "\n".join(textwrap.wrap(text, width=width)) if text else ""

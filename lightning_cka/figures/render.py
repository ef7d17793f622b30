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
        container = MplFigure(figsize=(WIDTH, figure_height(figure)), layout="constrained", dpi=100)
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
    heights = [max(figure_height(f) for f in figures[r * columns : (r + 1) * columns]) for r in range(rows)]
    fig = MplFigure(figsize=(WIDTH * columns, sum(heights)), layout="constrained", dpi=100)
    subfigures = np.atleast_1d(fig.subfigures(rows, columns, height_ratios=heights)).reshape(-1)
    for i, (sub, figure) in enumerate(zip(subfigures, figures, strict=False)):
        own, row = figure_height(figure), heights[i // columns]
        if own < row:  # a shorter figure keeps its own height at the top of the row instead of being stretched
            sub = sub.subfigures(2, 1, height_ratios=[own, row - own])[0]
        draw_figure(figure, sub)
    return fig


def figure_height(figure: Figure) -> float:
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
    same from probe to probe. Each tag's figure is therefore drawn in full once; its frame without the changing parts
    is kept as pixels, and later probes with the same frame only draw their changing parts on top of it: the data, the
    subtitle and caption, and the scales that follow the data (the colour bar of a heatmap with its ticks; the value
    axis of curves and dots with its ticks, grid, reference lines and legend; both axes of a scatter), which are cheap
    to draw. A figure whose frame differs (other layers, titles or reference lines) is drawn anew, and so is one whose
    scales would move the layout: their tick labels' extents (the widest, and how far the end ones reach beyond the
    axis) are part of the key, so that a cached render lays out exactly as a fresh draw would.

    Attributes:
        hits: renders drawn on a cached frame.
        misses: renders drawn in full.
    """

    def __init__(self) -> None:
        self._frames: dict[str, tuple[tuple, Drawing, Any, tuple]] = {}
        self.hits = 0
        self.misses = 0

    def render(self, figure: Figure) -> np.ndarray:
        """The image of ``figure``."""
        key = frame_key(figure)
        cached = self._frames.get(figure.tag)
        if cached is not None and cached[0] == key and _scale_layout(cached[1], figure) == cached[3]:
            self.hits += 1
            return _draw_on_frame(cached[1], cached[2], figure)
        self.misses += 1
        drawing = draw_figure(figure)
        canvas = FigureCanvasAgg(drawing.fig)
        canvas.draw()  # lays the figure out with every artist in place ...
        drawing.fig.set_layout_engine("none")  # ... and keeps that layout for the frames drawn on it
        image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        scales = _scale_layout(drawing, figure)
        for artist in drawing.dynamic:
            artist.remove()
        hidden = _scale_parts(drawing, figure)
        for artist in hidden:
            artist.set_visible(False)
        canvas.draw()
        background = canvas.copy_from_bbox(drawing.fig.bbox)
        for artist in hidden:
            artist.set_visible(True)
        self._frames[figure.tag] = (key, drawing, background, scales)
        return image


def _title_lines(title: str) -> int:
    """What a panel title adds to the layout: its number of lines (its words are drawn on the frame)."""
    return _wrap(title, TITLE_WIDTH).count("\n") + 1 if title else 0


def _scale_parts(drawing: Drawing, figure: Figure) -> list[Artist]:
    """What the frame leaves out because it follows the data: titles, colour bars, value axes (with their spines)."""
    parts: list[Artist] = [ax.title for ax in drawing.axes]
    for ax, panel in zip(drawing.axes, figure.panels, strict=True):
        if isinstance(panel, Heatmap):
            parts.append(ax._cka_colorbar.ax)
        else:
            parts += [ax.yaxis, *ax.spines.values()]
            if isinstance(panel, Scatter):
                parts.append(ax.xaxis)
    return parts


def _draw_on_frame(drawing: Drawing, background: Any, figure: Figure) -> np.ndarray:
    """``figure`` drawn on its cached frame: the data, the texts and the scales (already set by _scale_layout)."""
    canvas, fig = drawing.fig.canvas, drawing.fig
    canvas.restore_region(background)
    fresh: list[Artist] = []
    for ax, panel in zip(drawing.axes, figure.panels, strict=True):
        ax.set_title(_wrap(panel.title, TITLE_WIDTH), fontsize=FONT)
        if not isinstance(panel, Heatmap):  # before the data, as a full draw adds them: equal z-orders keep that order
            for artist in ax._cka_lines:
                artist.remove()
            _reference_lines(ax, panel)
        artists = _DATA[type(panel)](panel, ax)
        fresh += artists
        if isinstance(panel, Heatmap):
            for artist in artists:
                ax.draw_artist(artist)
            # The spines sit above the data in a full draw, so they are drawn again over it.
            for spine in ax.spines.values():
                ax.draw_artist(spine)
            fig.draw_artist(ax._cka_colorbar.ax)
        else:
            # The whole axes in its z-order (background, grid, value axis, reference lines, data, legend, spines),
            # without what the frame already holds: the category axis of curves and dots.
            kept = [] if isinstance(panel, Scatter) else [ax.xaxis]
            for artist in kept:
                artist.set_visible(False)
            fig.draw_artist(ax)
            for artist in kept:
                artist.set_visible(True)
        ax.draw_artist(ax.title)
    texts = _texts(drawing, figure)
    for artist in texts:
        artist.axes.draw_artist(artist)
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    for artist in fresh + texts:
        artist.remove()
    return image


def _scale_layout(drawing: Drawing, figure: Figure) -> tuple:
    """Set ``figure``'s scales on ``drawing`` and return what their tick labels add to the layout.

    For every colour bar and value axis: the largest tick label (pixels), how far the end labels reach beyond the
    axis, and the formatter's offset text (and a colour bar's label size). Two figures that agree on these (and on
    :func:`frame_key`) lay out alike.
    """
    renderer = drawing.fig.canvas.get_renderer()
    parts: list[tuple] = []
    for ax, panel in zip(drawing.axes, figure.panels, strict=True):
        if isinstance(panel, Heatmap):
            bar = ax._cka_colorbar
            bar.mappable.set_clim(panel.vmin, panel.vmax)
            bar.set_label(panel.colorbar, fontsize=FONT)  # it may name the scale ("±0.05"): only its size is static
            label = bar.long_axis.label
            size = renderer.get_text_width_height_descent(label.get_text(), label.get_fontproperties(), ismath=False)
            parts.append((_tick_extents(bar.long_axis, renderer), round(size[0]), round(size[1])))
        elif isinstance(panel, Scatter):
            xlim, ylim = _limits(panel)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            parts += [_tick_extents(ax.xaxis, renderer), _tick_extents(ax.yaxis, renderer)]
        else:
            ax.set_ylim(*_limits(panel))
            parts.append(_tick_extents(ax.yaxis, renderer))
    return tuple(parts)


def _tick_extents(axis: Any, renderer: Any) -> tuple:
    """What an axis's tick labels add to the layout at its current limits, in whole pixels.

    ``(widest, tallest, reach below or left of the axis, reach above or right of it, offset text)``, from the
    locator, the formatter and the font metrics only (nothing is drawn).
    """
    low, high = sorted(axis.get_view_interval())
    margin = 1e-9 * (high - low)
    locations = [v for v in axis.get_majorticklocs() if low - margin <= v <= high + margin]
    formatter = axis.get_major_formatter()
    labels = formatter.format_ticks(locations) if locations else []
    font = axis.get_ticklabels()[0].get_fontproperties() if axis.get_ticklabels() else None
    vertical = axis.axis_name == "y"
    box = axis.axes.bbox
    transform = axis.axes.transData
    widest = tallest = below = above = 0.0
    for value, label in zip(locations, labels, strict=True):
        if not label:
            continue
        width, height, _ = renderer.get_text_width_height_descent(label, font, ismath="$" in label)
        widest, tallest = max(widest, width), max(tallest, height)
        point = transform.transform((0, value) if vertical else (value, 0))
        centre, extent = (point[1], height) if vertical else (point[0], width)
        start, end = (box.y0, box.y1) if vertical else (box.x0, box.x1)
        below = max(below, start - (centre - extent / 2))
        above = max(above, centre + extent / 2 - end)
    return round(widest), round(tallest), round(below), round(above), formatter.get_offset()


def frame_key(figure: Figure) -> tuple:
    """What a figure's static frame depends on: all but the data, the scales, the subtitle and the caption's words.

    The scales' effect on the layout is checked apart, by :func:`_scale_layout`.
    """
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
                    _title_lines(panel.title),
                    panel.cmap,
                    _extend(panel),
                )
            )
        else:
            parts.append(
                (
                    type(panel).__name__,
                    getattr(panel, "x", None),
                    panel.x_label,
                    panel.y_label,
                    _title_lines(panel.title),
                    tuple(s.label for s in panel.series),
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
    ax._cka_colorbar = bar  # FrameCache redraws it on a cached frame when the colour scale moves
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


def _reference_lines(ax: Any, panel: Dots | Curves | Scatter) -> list[Artist]:
    """The reference lines with their labels, inside the axes (kept out of the layout, so they never move it)."""
    artists: list[Artist] = []
    for line in panel.lines:
        style = {"color": "0.35", "linestyle": LINE_STYLES[line.style], "linewidth": 1.1, "zorder": 1}
        if line.axis == "y":
            artists.append(ax.axhline(line.value, **style))
            artists.append(
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
            )
        else:
            artists.append(ax.axvline(line.value, **style))
            artists.append(
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
            )
    for artist in artists:
        artist.set_in_layout(False)
    ax._cka_lines = artists  # FrameCache draws them anew on a cached frame
    return artists


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

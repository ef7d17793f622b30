"""Figures of CKA matrices and attention distances.

Everything draws on ``matplotlib.figure.Figure`` objects, never on pyplot's global state, so figures can be rendered
off the training thread and are freed with their last reference.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MAX_TICK_LABELS = 32


def cka_heatmap(
    matrix: Any,
    row_names: Sequence[str] | None = None,
    col_names: Sequence[str] | None = None,
    ax: Any = None,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "magma",
    row_label: str = "layer",
    col_label: str = "layer",
    colorbar_label: str = "CKA",
) -> tuple[Any, Any]:
    """Heatmap of a CKA (or CKA-difference) matrix, layer 0 at the bottom left as in Raghu et al. 2021.

    Args:
        matrix: ``(rows, cols)`` array or tensor.
        row_names: labels of the rows (y axis).
        col_names: labels of the columns (x axis).
        ax: matplotlib ``Axes`` to draw into; a new ``Figure`` is made when ``None``.
        title: axes title.
        vmin: value at the bottom of the fixed colour scale.
        vmax: value at the top of the fixed colour scale.
        cmap: matplotlib colormap name.
        row_label: y axis label.
        col_label: x axis label.
        colorbar_label: colour bar label.

    Returns:
        ``(fig, ax)``.

    """
    values = _to_numpy(matrix)
    fig, ax = _figure_and_axes(ax, values.shape)
    image = ax.imshow(values, origin="lower", vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest", aspect="auto")
    _set_ticks(ax.set_yticks, ax.set_yticklabels, row_names, values.shape[0])
    _set_ticks(ax.set_xticks, ax.set_xticklabels, col_names, values.shape[1], rotation=90)
    ax.set_ylabel(row_label)
    ax.set_xlabel(col_label)
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return fig, ax


def attention_distance_plot(
    distances: Any,
    layer_names: Sequence[str] | None = None,
    ax: Any = None,
    title: str | None = None,
    local_threshold: float | None = None,
    label: str | None = None,
    color: str | None = None,
) -> tuple[Any, Any]:
    """Mean attention distance per head, one column of points per layer (Raghu et al. 2021, Figure 3).

    Args:
        distances: ``(layers, heads)`` mean distances in pixels; NaN entries (missing heads) are skipped.
        layer_names: x tick labels.
        ax: matplotlib ``Axes``; a new ``Figure`` is made when ``None``.
        title: axes title.
        local_threshold: draw a dashed line at this distance (the "local head" threshold) and keep twice it, about
            the distance of uniform attention, in view.
        label: legend label of the points (when several runs share one axes).
        color: point colour.

    Returns:
        ``(fig, ax)``.

    """
    values = _to_numpy(distances)
    fig, ax = _figure_and_axes(ax, (6, max(values.shape[0], 6)))
    layer_index = np.repeat(np.arange(values.shape[0]), values.shape[1])
    ax.scatter(layer_index, values.reshape(-1), s=14, alpha=0.75, label=label, color=color)
    if local_threshold is not None:
        ax.axhline(local_threshold, color="grey", linestyle="--", linewidth=1)
    _set_ticks(ax.set_xticks, ax.set_xticklabels, layer_names, values.shape[0], rotation=90)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (pixels)")
    if local_threshold is None:
        ax.set_ylim(bottom=0)
    else:  # points near the top then read as global, as they are, not as the plot's whole range
        ax.set_ylim(0, max(float(np.nanmax(values, initial=0.0)), 2 * local_threshold) * 1.1)
    if title:
        ax.set_title(title)
    return fig, ax


def figure_to_array(fig: Any) -> np.ndarray:
    """Render a figure with Agg to an ``(H, W, 3)`` uint8 array (thread-safe: no pyplot involved)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _figure_and_axes(ax: Any, shape: tuple[int, int]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    rows, cols = shape
    width = min(12.0, 3.5 + 0.22 * cols)
    height = min(11.0, 3.0 + 0.2 * rows)
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _set_ticks(set_ticks: Any, set_labels: Any, names: Sequence[str] | None, count: int, rotation: int = 0) -> None:
    step = max(1, -(-count // _MAX_TICK_LABELS))
    positions = list(range(0, count, step))
    set_ticks(positions)
    labels = [str(i) for i in positions] if names is None else [names[i] for i in positions]
    set_labels(labels, rotation=rotation, fontsize=7)


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)

"""Cheap re-rendering of the monitor's figures with Agg blitting.

A fresh matplotlib figure costs 0.1-0.2 s, almost all of it in axes, ticks and text that are the same at every probe
(the layer names and colour scales are fixed). Each figure is therefore drawn once; its static frame is kept as pixels
and every later probe only restores those pixels and redraws the artists that change (the heatmap image or the
points, and the title).
"""

from typing import Any

import numpy as np
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from lightning_cka.plotting import attention_distance_plot, cka_heatmap
from lightning_cka.result import CKAResult


class _BlitFigure:
    """A figure whose static frame is rendered once; :meth:`render` redraws only the changing artists on top of it.

    Args:
        fig: the complete figure, laid out with every artist in place.
        artist: the artist whose data changes (a heatmap image or scatter points).
        title: the axes title, whose text changes.
    """

    def __init__(self, fig: Any, artist: Artist, title: Text) -> None:
        self.canvas = FigureCanvasAgg(fig)
        self.artist, self.title = artist, title
        self.canvas.draw()  # lays the figure out with the title's space reserved ...
        fig.set_layout_engine("none")  # ... and keeps that layout for the frame drawn without the changing parts
        # An empty title (not a hidden one) keeps the title's position; a hidden one is re-placed off the figure.
        artist.set_visible(False)
        text = title.get_text()
        title.set_text("")
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(fig.bbox)
        artist.set_visible(True)
        title.set_text(text)

    def render(self) -> np.ndarray:
        self.canvas.restore_region(self.background)
        axes = self.artist.axes
        # The spines sit above the image in a full draw, so they are drawn again over the new image.
        for artist in (self.artist, *axes.spines.values(), self.title):
            axes.draw_artist(artist)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


class ProbeRenderer:
    """Render a probe's figures as ``(H, W, 3)`` uint8 images, reusing each figure's frame across probes.

    Args:
        local_threshold_px: distance of the dashed "local head" line in the attention plot.
    """

    def __init__(self, local_threshold_px: float) -> None:
        self.local_threshold_px = local_threshold_px
        self._figures: dict[str, tuple[tuple, _BlitFigure]] = {}  # tag: (what the frame shows, figure)

    def render(self, result: CKAResult, previous: CKAResult | None) -> dict[str, np.ndarray]:
        """Images keyed by tag (without a monitor's name prefix)."""
        step = f"step {result.step}"
        images = {"cka/intra": self._heatmap("cka/intra", result.intra, result.layers, result.layers, step)}
        if result.reference.size:
            images["cka/reference"] = self._heatmap(
                "cka/reference", result.reference, result.layers, result.reference_layers, step
            )
        if previous is not None:
            change = result.intra - previous.intra
            images["cka/intra_change"] = self._heatmap(
                "cka/intra_change", change, result.layers, result.layers, f"step {previous.step} to {result.step}"
            )
        if result.mean_attention_distance.size:
            images["attention/mean_distance"] = self._distances(
                result.mean_attention_distance, result.attention_layers, step
            )
        return images

    def _heatmap(self, tag: str, values: np.ndarray, rows: list[str], cols: list[str], when: str) -> np.ndarray:
        key = (tag, tuple(rows), tuple(cols))
        if self._figures.get(tag, (None,))[0] != key:
            style = _HEATMAP_STYLES[tag]
            fig, ax = cka_heatmap(values, rows, cols, title=style["title"], **style["kwargs"])
            (image,) = ax.get_images()
            self._figures[tag] = (key, _BlitFigure(fig, image, ax.title))
        _, blit = self._figures[tag]
        blit.artist.set_data(values)
        blit.title.set_text(f"{_HEATMAP_STYLES[tag]['title']}, {when}")
        return blit.render()

    def _distances(self, distances: np.ndarray, layers: list[str], when: str) -> np.ndarray:
        tag = "attention/mean_distance"
        top = float(np.nanmax(distances, initial=0.0))
        key = (tag, tuple(layers), distances.shape)
        cached = self._figures.get(tag)
        if cached is None or cached[0] != key or top > cached[1].artist.axes.get_ylim()[1]:
            fig, ax = attention_distance_plot(
                distances, layers, title="mean attention distance per head", local_threshold=self.local_threshold_px
            )
            # Room for every head up to twice the local threshold (the uniform-attention distance) and beyond.
            ax.set_ylim(0, max(top, 2 * self.local_threshold_px) * 1.25)
            (points,) = ax.collections
            self._figures[tag] = (key, _BlitFigure(fig, points, ax.title))
        _, blit = self._figures[tag]
        layer_index = np.repeat(np.arange(distances.shape[0]), distances.shape[1])
        blit.artist.set_offsets(np.column_stack([layer_index, distances.reshape(-1)]))
        blit.title.set_text(f"mean attention distance per head, {when}")
        return blit.render()


_HEATMAP_STYLES: dict[str, dict[str, Any]] = {
    "cka/intra": {"title": "CKA within the model", "kwargs": {}},
    "cka/reference": {
        "title": "CKA with the reference",
        "kwargs": {"row_label": "model layer", "col_label": "reference layer"},
    },
    "cka/intra_change": {
        "title": "change of CKA within the model",
        "kwargs": {"vmin": -0.5, "vmax": 0.5, "cmap": "RdBu_r", "colorbar_label": "ΔCKA"},
    },
}

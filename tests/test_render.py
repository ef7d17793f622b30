"""The figures as data and their drawings: cached frames, colour scales, labels, JSON."""

import numpy as np
import pytest

from lightning_cka.engine.analysis import View
from lightning_cka.figures.cka import symmetric_limit
from lightning_cka.figures.render import FrameCache, draw_figure, draw_panel, to_image
from lightning_cka.figures.spec import Curves, Figure, Heatmap, Series, from_json, to_json
from lightning_cka.result import CKAResult

rng = np.random.default_rng(0)


def probe(step, num_layers=6):
    layers = [f"blocks.{i}" for i in range(num_layers)]
    intra = rng.random((num_layers, num_layers))
    return CKAResult(
        layers=layers,
        intra=intra,
        intra_se=np.full_like(intra, 0.01),
        intra_null=np.full_like(intra, 0.3),
        reference_layers=["layer1.0", "layer2.0"],
        reference=rng.random((num_layers, 2)),
        attention_layers=[f"{name}.attn" for name in layers],
        mean_attention_distance=rng.random((num_layers, 3)) * 12,
        uniform_attention_distance=16.0,
        step=step,
        num_examples=64,
    )


def assert_same_picture(blitted, full):
    assert blitted.shape == full.shape and blitted.dtype == np.uint8
    diff = np.abs(blitted.astype(int) - full.astype(int))
    assert diff.mean() < 0.5 and diff.max() < 80  # text antialiasing only


def test_cached_frames_look_like_fresh_figures():
    cache, view = FrameCache(), View(run="vit/version_0")
    first, current = probe(1), probe(2)
    for figure in first.figures(None, view):
        cache.render(figure)
    for figure in current.figures(first, view):
        blitted = cache.render(figure)
        assert_same_picture(blitted, to_image(draw_figure(figure).fig))


def test_frames_follow_the_data_and_rebuild_when_layers_change():
    cache, view = FrameCache(), View()
    images = [cache.render(probe(step).figures(None, view)[0]) for step in (1, 2)]
    assert images[0].shape == images[1].shape and np.abs(images[0].astype(int) - images[1]).mean() > 1
    bigger = probe(3, num_layers=12).figures(None, view)[0]
    assert_same_picture(cache.render(bigger), to_image(draw_figure(bigger).fig))
    assert len(cache._frames) == 1 and cache._frames["cka/intra"][1].axes[0].get_xlim() == (-0.5, 11.5)


@pytest.mark.parametrize("count", [6, 12, 48, 200])
def test_tick_labels_are_thinned_to_what_fits_and_stay_legible(count):
    names = tuple(f"blocks.{i}" for i in range(count))
    fig, ax, _ = draw_panel(Heatmap(rng.random((count, count)), names, names))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "blocks.0" and all(label in names for label in labels)
    assert len(labels) == count if count <= 12 else len(labels) < count
    to_image(fig)
    height = ax.get_window_extent().height
    assert height / len(labels) >= 1.4 * ax.get_yticklabels()[0].get_fontsize() * 100 / 72  # no overlapping labels
    assert ax.get_yticklabels()[0].get_fontsize() >= 9


def test_the_change_scale_keeps_large_and_small_changes_visible_and_never_clips():
    assert symmetric_limit(np.array([[-0.6, 0.01]])) == 1.0
    assert symmetric_limit(np.array([[0.004, -0.009]])) == 0.01
    assert symmetric_limit(np.array([[0.3]])) == 0.5
    first, second = probe(1), probe(2)
    second.intra = first.intra + rng.uniform(-0.04, 0.04, first.intra.shape)
    change = next(f for f in second.figures(first, View()) if f.tag == "cka/intra_change")
    panel = change.panels[0]
    assert (panel.vmin, panel.vmax) == (-0.05, 0.05) and "±0.05" in panel.colorbar
    assert np.abs(panel.values).max() <= panel.vmax


def test_values_beyond_the_fixed_scale_get_an_arrow_on_the_colour_bar():
    values = np.array([[1.0, -0.2], [-0.2, 1.0]])  # unbiased CKA can be slightly negative
    fig, ax, _ = draw_panel(Heatmap(values, ("a", "b"), ("a", "b")))
    (bar_axes,) = [a for a in fig.axes if a is not ax]
    assert bar_axes._colorbar.extend == "min"


def test_null_marks_and_titles_say_what_they_show():
    result = probe(5)
    result.intra[0, 1] = 0.1  # below its null threshold of 0.3
    figure = result.figures(None, View(run="vit/version_0"))[0]
    panel = figure.panels[0]
    assert panel.marked[0, 1] and not panel.marked.diagonal().any()
    assert "permutation test" in panel.mark_label and "Dots:" in figure.caption
    assert figure.subtitle == "vit/version_0 · step 5 · 64 probe images"
    distances = next(f for f in result.figures(None, View(local_threshold=0.5)) if f.tag == "attention/mean_distance")
    lines = {line.label: line.value for line in distances.panels[0].lines}
    assert lines == {"local below 8.0 px": 8.0, "uniform attention 16.0 px (global)": 16.0}
    assert distances.panels[0].ylim[0] < 0 < distances.panels[0].ylim[1]  # points at 0 stay whole
    assert distances.panels[0].ylim[1] > max(16.0, float(result.mean_attention_distance.max()))


def test_figures_survive_json_with_nan():
    figure = Figure("x/y", "t", (Curves(("a", "b"), (Series("s", np.array([0.5, np.nan]), np.array([0.1, 0.2])),)),))
    back = from_json(to_json(figure))
    np.testing.assert_array_equal(back.panels[0].series[0].values, [0.5, np.nan])
    assert back.panels[0].x == ("a", "b") and back.tag == "x/y"


def test_plot_draws_every_figure_of_a_probe():
    fig = probe(3).plot(probe(2))
    # a figure shorter than its row sits in the top one of two nested subfigures, at its own height
    drawn = [sub if sub._suptitle is not None else sub.subfigs[0] for sub in fig.subfigs]
    titles = [sub._suptitle.get_text().split("\n")[0] for sub in drawn]
    assert titles == [
        "CKA between the model's layers",
        "CKA of the model with the reference",
        "Change of CKA between the model's layers",
        "Mean attention distance per head",
    ]
    to_image(fig)

"""The frame cache hits for every figure of later probes, and draws what a fresh figure shows, scales included."""

import numpy as np
import pytest

from lightning_cka.analyses import AttentionStats, EffectiveRank, LayerCKA
from lightning_cka.engine.analysis import View
from lightning_cka.figures.render import FrameCache, draw_figure, to_image
from lightning_cka.figures.spec import Curves, Dots, Figure, Heatmap, Line, Scatter, Series
from lightning_cka.result import CKAResult

ANALYSES = (LayerCKA(), AttentionStats(), EffectiveRank())
LAYERS = [f"blocks.{i}" for i in range(8)]


def probe(step, rng, scale):
    """A probe whose values move between steps like a training run's: CKA drifts, ranks and distances grow."""
    drift = np.sin(np.add.outer(np.arange(8), np.arange(8)))  # CKA moves by at most 0.01 per step
    intra = np.clip(0.5 + 0.01 * step * drift + 0.001 * rng.standard_normal((8, 8)), 0, 1)
    intra = (intra + intra.T) / 2
    np.fill_diagonal(intra, 1.0)
    ranks = scale * (40 + 3 * np.arange(8) + rng.random(8))
    return CKAResult(
        {
            "layers": LAYERS,
            "intra": intra,
            "intra_se": np.full((8, 8), 0.01),
            "intra_null": np.full((8, 8), 0.2),
            "attention_layers": [f"{name}.attn" for name in LAYERS],
            "mean_attention_distance": scale * (4 + 10 * rng.random((8, 3))),
            "attention_entropy": rng.random((8, 3)),
            "uniform_attention_distance": 16.0,
            "effective_rank": ranks,
            "effective_rank_se": np.full(8, 0.5),
            "effective_rank_minibatches": np.stack([ranks, ranks]),
            "effective_rank_bound": 63.0,
            "step": step,
            "num_examples": 64,
        },
        analyses=ANALYSES,
    )


def assert_same_picture(blitted, full):
    assert blitted.shape == full.shape and blitted.dtype == np.uint8
    diff = np.abs(blitted.astype(int) - full.astype(int))
    assert diff.mean() < 0.5 and diff.max() < 80, (diff.mean(), diff.max())  # text antialiasing only


def test_every_figure_of_later_probes_hits_the_cache_and_looks_fresh():
    rng, cache, view = np.random.default_rng(0), FrameCache(), View(run="run")
    first = probe(1, rng, 1.0)
    for figure in first.figures(probe(0, rng, 1.0), view):  # the first probe of a run draws every frame in full
        cache.render(figure)
    previous = first
    tags = set()
    for step, scale in ((2, 1.04), (3, 1.08), (4, 1.1)):  # ranks and distances grow a few percent per probe
        current = probe(step, rng, scale)
        figures = current.figures(previous, view)
        tags |= {f.tag for f in figures}
        before = cache.misses
        for figure in figures:
            blitted = cache.render(figure)
            assert cache.misses == before, f"{figure.tag} missed the cache at step {step}"
            assert_same_picture(blitted, to_image(draw_figure(figure).fig))
        previous = current
    assert {"cka/intra", "cka/intra_change", "rank/effective_rank", "attention/mean_distance"} <= tags


def heatmap_figure(values, vmin, vmax, label="CKA"):
    panel = Heatmap(
        values,
        tuple(f"r{i}" for i in range(4)),
        tuple(f"c{i}" for i in range(4)),
        vmin=vmin,
        vmax=vmax,
        cmap="diverging",
        colorbar=label,
    )
    return Figure("x/heatmap", "A heatmap", (panel,), "caption", "")


@pytest.mark.parametrize(
    "make",
    [
        # a colour scale that moves inside the same tick label widths, and a colour bar label of the same size
        lambda k: heatmap_figure(
            np.linspace(-1, 1, 16).reshape(4, 4) * (0.3 + 0.02 * k),
            -0.31 - 0.02 * k,
            0.31 + 0.02 * k,
            f"scale ±0.{k + 1}",
        ),
        lambda k: Figure(
            "x/curves",
            "Curves",
            (
                Curves(
                    ("a", "b", "c"),
                    (Series("s", np.array([1.0, 2, 3]) * (50 + k), np.ones(3)),),
                    "layer",
                    "value",
                    ylim=(0.0, 170 + 2 * k),
                    lines=(Line(60.0 + k, "bound"),),
                ),
            ),
            "",
            "",
        ),
        lambda k: Figure(
            "x/dots",
            "Dots",
            (
                Dots(
                    ("a", "b"),
                    (Series("", np.array([[3.0, 4], [5, 6]]) + k),),
                    "layer",
                    "distance",
                    lines=(Line(8.0, "uniform"),),
                ),
            ),
            "",
            "",
        ),
        lambda k: Figure(
            "x/scatter",
            "Scatter",
            (
                Scatter(
                    (Series("one", np.array([[1.0, 2], [3, 4 + k]])), Series("two", np.array([[2.0, 1], [5 + k, 3]]))),
                    "x",
                    "y",
                ),
            ),
            "",
            "",
        ),
    ],
    ids=["heatmap", "curves", "dots", "scatter"],
)
def test_moving_scales_are_drawn_on_the_frame_as_a_fresh_draw_shows_them(make):
    cache = FrameCache()
    cache.render(make(0))
    for k in (1, 2):
        figure = make(k)
        blitted = cache.render(figure)
        assert cache.hits == k and cache.misses == 1
        assert_same_picture(blitted, to_image(draw_figure(figure).fig))


def test_a_scale_that_would_move_the_layout_draws_a_new_frame():
    cache = FrameCache()
    cache.render(heatmap_figure(np.zeros((4, 4)), -0.1, 0.1))
    wider = heatmap_figure(np.zeros((4, 4)), -0.00125, 0.00125)  # longer tick labels: a wider colour bar margin
    assert_same_picture(cache.render(wider), to_image(draw_figure(wider).fig))
    assert cache.misses == 2 and cache.hits == 0
    curves = [
        Figure("x/c", "C", (Curves(("a", "b"), (Series("", np.array([1.0, 2])),), "l", "v", ylim=(0, top)),), "", "")
        for top in (9.0, 9000.0)
    ]
    cache.render(curves[0])
    assert_same_picture(cache.render(curves[1]), to_image(draw_figure(curves[1]).fig))
    assert cache.misses == 4

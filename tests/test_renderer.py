import numpy as np
import pytest

from lightning_cka.callbacks.renderer import ProbeRenderer
from lightning_cka.plotting import attention_distance_plot, cka_heatmap, figure_to_array
from lightning_cka.result import CKAResult

rng = np.random.default_rng(0)


def probe(step, num_layers=6):
    layers = [f"blocks.{i}" for i in range(num_layers)]
    return CKAResult(
        layers=layers,
        intra=rng.random((num_layers, num_layers)),
        reference_layers=["layer1.0", "layer2.0"],
        reference=rng.random((num_layers, 2)),
        attention_layers=[f"{name}.attn" for name in layers],
        mean_attention_distance=rng.random((num_layers, 3)) * 12,
        step=step,
    )


def assert_same_picture(blitted, full):
    assert blitted.shape == full.shape and blitted.dtype == np.uint8
    diff = np.abs(blitted.astype(int) - full.astype(int))
    assert diff.mean() < 0.5 and diff.max() < 64  # text antialiasing only


def test_blitted_frames_look_like_fresh_figures():
    renderer = ProbeRenderer(local_threshold_px=8.0)
    first, current = probe(1), probe(2)
    renderer.render(first, None)
    images = renderer.render(current, first)
    fig, _ = cka_heatmap(current.intra, current.layers, current.layers, title="CKA within the model, step 2")
    assert_same_picture(images["cka/intra"], figure_to_array(fig))
    change = current.intra - first.intra
    fig, _ = cka_heatmap(
        change,
        current.layers,
        current.layers,
        title="change of CKA within the model, step 1 to 2",
        vmin=-0.5,
        vmax=0.5,
        cmap="RdBu_r",
        colorbar_label="ΔCKA",
    )
    assert_same_picture(images["cka/intra_change"], figure_to_array(fig))
    fig, ax = attention_distance_plot(
        current.mean_attention_distance,
        current.attention_layers,
        title="mean attention distance per head, step 2",
        local_threshold=8.0,
    )
    ax.set_ylim(0, 20.0)  # the renderer's range: 1.25 x twice the threshold
    assert_same_picture(images["attention/mean_distance"], figure_to_array(fig))


def test_frames_follow_the_data_and_rebuild_when_layers_change():
    renderer = ProbeRenderer(local_threshold_px=8.0)
    a = renderer.render(probe(1), None)["cka/intra"]
    b = renderer.render(probe(2), None)["cka/intra"]
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() > 1
    bigger = renderer.render(probe(3, num_layers=12), None)["cka/intra"]
    assert bigger.shape[0] > a.shape[0]


@pytest.mark.parametrize("top", [5.0, 60.0])
def test_distance_axis_grows_to_fit_far_heads(top):
    renderer = ProbeRenderer(local_threshold_px=8.0)
    result = probe(1)
    result.mean_attention_distance[0, 0] = top
    renderer.render(result, None)
    _, blit = renderer._figures["attention/mean_distance"]
    assert blit.artist.axes.get_ylim()[1] >= top

import numpy as np
import pytest
import reference as ref
import timm
import torch
from torch import nn

from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.analyses.localization import Localization
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.engine.options import ProbeOptions
from lightning_cka.figures.render import draw_figure
from lightning_cka.result import CKAResult


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(x, size=8):
    return [ProbeBatch(i, s, x[s : s + size]) for i, s in enumerate(range(0, x.shape[0], size))]


def run(model, x, size=8, layers="auto", permutations=0, **options):
    options = ProbeOptions(localization=True, permutations=permutations, **options)
    engine = ProbeEngine([ProbedModel("model", model, layers)], [Localization(options)])
    parts = batches(x, size)
    engine.run(parts, len(parts), torch.device("cpu"))
    return engine, engine.compute()


def images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def capture(model, names, x):
    """Outputs (clones) of the named modules from plain forward hooks."""
    modules, out, handles = dict(model.named_modules()), {}, []
    for name in names:
        handles.append(modules[name].register_forward_hook(lambda m, a, o, name=name: out.__setitem__(name, o.clone())))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def textbook_localization(model, layer, source, x, layer_positions, source_positions, size=8):
    """(P, P) minibatch CKA of every (layer position, input position) pair, by tests/reference.py's loops."""
    per_layer, per_source = [], []
    for start in range(0, x.shape[0], size):
        out = capture(model, [layer, source], x[start : start + size])
        per_layer.append(layer_positions(out[layer].double().numpy()))
        per_source.append(source_positions(out[source].double().numpy()))
    return ref.minibatch_cka(per_layer, per_source)


def own_fraction_and_offset(matrix, gw, stride):
    """Row by row: the most similar input position, its grid distance."""
    own, offsets = [], []
    for p, row in enumerate(matrix):
        q = int(np.argmax(row))
        own.append(q == p)
        offsets.append(np.hypot(q // gw - p // gw, q % gw - p % gw) * stride)
    return np.mean(own), np.mean(offsets)


# ----------------------------------------------------------------------------------------- independent references


@pytest.mark.parametrize(
    ("name", "kwargs", "prefix"),
    [
        ("test_vit", dict(img_size=32, patch_size=8), 1),  # dynamic size: patch_embed gives (n, 4, 4, C)
        ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2), 2),  # flattened (n, 16, C)
    ],
)
def test_vit_equals_textbook_cka_per_position_pair(name, kwargs, prefix):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = images(32, 32)
    _, fields = run(model, x)
    layer = ProbedModel("model", model).layers[-1]

    def tokens(out):  # (n, T, D): patch tokens after the prefix, row-major
        return [out[:, prefix + p] for p in range(16)]

    def patches(out):  # (n, 4, 4, C) or (n, 16, C)
        out = out.reshape(out.shape[0], 16, -1)
        return [out[:, p] for p in range(16)]

    expected = textbook_localization(model, layer, "patch_embed", x, tokens, patches)
    assert fields["localization"].shape == (16, 16)
    np.testing.assert_allclose(fields["localization"], expected, atol=2e-5)
    assert fields["localization_grid"].tolist() == [4, 4] and fields["localization_stride"] == 8.0
    assert fields["localization_layer"] == layer and fields["localization_input"] == "patch_embed"


def test_cnn_first_stage_is_pooled_to_the_layer_grid():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    x = images(32, 64, seed=1)
    _, fields = run(model, x)

    def positions(maps):  # (n, C, 2, 2)
        return [maps[:, :, r, c] for r in range(2) for c in range(2)]

    def pooled(maps):  # layer1: (n, C, 16, 16), mean over 8 x 8 blocks
        n, c = maps.shape[:2]
        return positions(maps.reshape(n, c, 2, 8, 2, 8).mean(axis=(3, 5)))

    expected = textbook_localization(model, "layer4.0", "layer1", x, positions, pooled)
    np.testing.assert_allclose(fields["localization"], expected, atol=2e-5)
    assert fields["localization_input"] == "layer1" and fields["localization_stride"] == 32.0


# ------------------------------------------------------------------------------------------------ known answers


def test_identity_network_localizes_perfectly(registered):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
    model.blocks = nn.Sequential(*[nn.Identity() for _ in model.blocks])  # tokens = patch embedding + position
    _, fields = run(model, images(32, 32, seed=2))
    matrix = fields["localization"]
    np.testing.assert_allclose(np.diagonal(matrix), 1.0, atol=1e-6)
    assert (matrix.argmax(axis=1) == np.arange(16)).all()
    scalars = Localization.scalars(CKAResult(fields), View())
    assert scalars["localization/own_position_fraction"] == 1.0 and scalars["localization/mean_offset_px"] == 0.0
    assert scalars["localization/own_position_cka"] == pytest.approx(1.0, abs=1e-6)


class Rolled(nn.Module):
    """A conv patch embedding whose 'high layer' is the embedding shifted one column right (wrapping around)."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 24, kernel_size=8, stride=8)
        self.layer = nn.Identity()

    def forward(self, x):
        return self.layer(torch.roll(self.patch_embed(x), shifts=1, dims=3)).mean(dim=(2, 3))


def test_rolled_embedding_gives_the_known_offset(registered):
    torch.manual_seed(0)
    _, fields = run(Rolled().eval(), images(32, 32, seed=3), layers=["layer"])
    matrix = fields["localization"]
    source = np.arange(16).reshape(4, 4)[:, [3, 0, 1, 2]].ravel()  # token (r, c) is input (r, c - 1)
    np.testing.assert_allclose(matrix[np.arange(16), source], 1.0, atol=1e-6)
    scalars = Localization.scalars(CKAResult(fields), View())
    assert scalars["localization/own_position_fraction"] == 0.0
    assert scalars["localization/mean_offset_px"] == pytest.approx(8.0 * (3 * 1 + 3) / 4)  # 3 columns 1 away, 1 wraps
    assert scalars["localization/own_position_cka"] < 0.3


# ----------------------------------------------------------------------------------------------------- contract


def test_null_and_standard_errors_come_with_it():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
    _, fields = run(model, images(32, 32, seed=4), permutations=19)
    assert np.isfinite(fields["localization_se"]).all() and np.isfinite(fields["localization_null"]).all()
    assert (fields["localization_null"] > 0).all()


def test_layer_option_accepts_display_and_module_names_and_rejects_others():
    model = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
    x = images(16, 32, seed=5)
    _, fields = run(model, x, localization_layer="blocks.2")
    assert fields["localization_layer"] == "blocks.2"
    _, fields = run(model, x, localization_layer="blocks.2.mlp.fc2")  # any module with (n, T, D) tokens
    assert fields["localization"].shape == (16, 16)
    with pytest.raises(ValueError, match="no module of the model"):
        run(model, x, localization_layer="blocks.99")
    with pytest.raises(RuntimeError, match="no positions"):
        run(model, x, localization_layer="head")


def test_off_by_default_and_the_model_is_left_untouched():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    assert ProbeEngine([ProbedModel("model", model)], [Localization(ProbeOptions())]).analyses == []
    x = images(16, 64, seed=6)
    before = model.eval()(x).detach().clone()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run(model, x)
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model.eval()(x), before, rtol=0, atol=0)


def test_two_ranks_summed_by_hand_equal_one_engine():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
    parts = batches(images(40, 32, seed=7))
    options = ProbeOptions(localization=True, permutations=3)
    single = ProbeEngine([ProbedModel("model", model)], [Localization(options)])
    single.run(parts, len(parts), torch.device("cpu"))
    expected = single.compute()
    engines = [ProbeEngine([ProbedModel("model", model)], [Localization(options)]) for _ in range(2)]
    engines[0].run(parts[0::2], len(parts), torch.device("cpu"))
    engines[1].run(parts[1::2], len(parts), torch.device("cpu"))
    ours, theirs = engines[0].analyses[0], engines[1].analyses[0]
    ours._metric.merge_state(theirs._metric)
    ours._sums.merge_state(theirs._sums)
    got = engines[0].compute()
    for key in ("localization", "localization_se", "localization_null"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-12)
    assert got["localization_stride"] == expected["localization_stride"] == 8.0


# ------------------------------------------------------------------------------------------- figures, scalars


@pytest.fixture
def registered(monkeypatch):
    import lightning_cka.analyses as analyses

    monkeypatch.setattr(analyses, "ANALYSES", (LayerCKA, Localization))


def test_figure_shows_query_maps_in_image_orientation_and_scalars_match(registered):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
    _, fields = run(model, images(32, 32, seed=8))
    result = CKAResult(fields)
    (figure,) = Localization.figures(result, None, View(run="r"))
    assert figure.tag == "localization/maps" and len(figure.panels) == 4
    matrix = fields["localization"]
    for panel, (r, c) in zip(figure.panels, [(0, 0), (0, 2), (2, 2), (3, 3)], strict=True):
        assert f"row {r}, column {c}" in panel.title
        assert panel.rows[0] == "3" and panel.rows[-1] == "0"  # first row drawn at the bottom: image row 3
        for rr in range(4):
            for cc in range(4):
                assert panel.values[3 - rr, cc] == matrix[r * 4 + c, rr * 4 + cc]
        assert panel.marked[3 - r, c] and panel.marked.sum() == 1
    draw_figure(figure)
    scalars = Localization.scalars(result, View())
    own, offset = own_fraction_and_offset(matrix, 4, 8.0)
    assert scalars["localization/own_position_fraction"] == pytest.approx(own)
    assert scalars["localization/mean_offset_px"] == pytest.approx(offset)
    assert scalars["localization/own_position_cka"] == pytest.approx(np.mean(np.diagonal(matrix)))


def test_scalars_and_figures_are_nan_safe(registered):
    empty = CKAResult(layers=["a"])
    assert Localization.scalars(empty, View()) == {} and Localization.figures(empty, None, View()) == []
    nan = CKAResult(
        layers=["a"],
        localization=np.full((4, 4), np.nan),
        localization_grid=np.array([2, 2]),
        localization_stride=float("nan"),
        localization_layer="a",
    )
    assert all(np.isnan(v) for v in Localization.scalars(nan, View()).values())
    for figure in Localization.figures(nan, None, View()):
        draw_figure(figure)
    one = CKAResult(layers=["a"], localization=np.ones((1, 1)), localization_grid=np.array([1, 1]))
    assert Localization.scalars(one, View())["localization/own_position_fraction"] == 1.0
    assert len(Localization.figures(one, None, View())[0].panels) == 1

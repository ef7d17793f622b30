import threading

import numpy as np
import pytest
import reference as ref
import timm
import torch
import torchmetrics.metric
from torch import nn

from lightning_cka.analyses import default_analyses
from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.analyses.localization import Localization
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
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


def run(model, x, size=8, layers="auto", permutations=0, layer=None, failures_ok=False):
    engine = ProbeEngine([ProbedModel("model", model, layers)], [Localization(layer=layer, permutations=permutations)])
    parts = batches(x, size)
    engine.run(parts, len(parts), torch.device("cpu"))
    if not failures_ok:  # the engine keeps an analysis's error instead of raising it
        assert engine.failures == {}, engine.failures
    fields = engine.compute(skip=list(engine.failures))
    assert engine.finalize_failures == {}, engine.finalize_failures
    return engine, fields


def images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


ANALYSES = (LayerCKA(), Localization())  # the analyses whose fields the results below hold


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


def test_identity_network_localizes_perfectly():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
    model.blocks = nn.Sequential(*[nn.Identity() for _ in model.blocks])  # tokens = patch embedding + position
    _, fields = run(model, images(32, 32, seed=2))
    matrix = fields["localization"]
    np.testing.assert_allclose(np.diagonal(matrix), 1.0, atol=1e-6)
    assert (matrix.argmax(axis=1) == np.arange(16)).all()
    scalars = Localization().scalars(CKAResult(fields, analyses=ANALYSES), View())
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


def test_rolled_embedding_gives_the_known_offset():
    torch.manual_seed(0)
    _, fields = run(Rolled().eval(), images(32, 32, seed=3), layers=["layer"])
    matrix = fields["localization"]
    source = np.arange(16).reshape(4, 4)[:, [3, 0, 1, 2]].ravel()  # token (r, c) is input (r, c - 1)
    np.testing.assert_allclose(matrix[np.arange(16), source], 1.0, atol=1e-6)
    scalars = Localization().scalars(CKAResult(fields, analyses=ANALYSES), View())
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
    _, fields = run(model, x, layer="blocks.2")
    assert fields["localization_layer"] == "blocks.2"
    _, fields = run(model, x, layer="blocks.2.mlp.fc2")  # any module with (n, T, D) tokens
    assert fields["localization"].shape == (16, 16)
    with pytest.raises(ValueError, match="no module of the model"):  # asked for, impossible: raised at bind
        run(model, x, layer="blocks.99")
    engine, fields = run(model, x, layer="head", failures_ok=True)  # fails in the probe: kept, not raised
    error = engine.failures["localization"]
    assert isinstance(error, RuntimeError) and "no positions" in str(error)
    assert "localization" not in fields
    with pytest.raises(ValueError, match="layer"):
        Localization(layer="")
    with pytest.raises(ValueError, match="permutations"):
        Localization(permutations=1001)


def test_off_by_default_and_the_model_is_left_untouched():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    assert not Localization.default and "localization" not in [a.name for a in default_analyses()]
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
    single = ProbeEngine([ProbedModel("model", model)], [Localization(permutations=3)])
    single.run(parts, len(parts), torch.device("cpu"))
    expected = single.compute()
    engines = [ProbeEngine([ProbedModel("model", model)], [Localization(permutations=3)]) for _ in range(2)]
    engines[0].run(parts[0::2], len(parts), torch.device("cpu"))
    engines[1].run(parts[1::2], len(parts), torch.device("cpu"))
    ours, theirs = engines[0].analyses[0], engines[1].analyses[0]
    ours._metric.merge_state(theirs._metric)
    ours._sums.merge_state(theirs._sums)
    got = engines[0].compute()
    for key in ("localization", "localization_se", "localization_null"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-12)
    assert got["localization_stride"] == expected["localization_stride"] == 8.0


class FakeWorld:
    """All-gather between threads, one thread per rank: what torch.distributed gives torchmetrics' sync."""

    def __init__(self, size):
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size
        self.local = threading.local()

    def gather(self, tensor, group=None):
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


def fake_world(monkeypatch, size):
    """Metrics made from here on sync through a :class:`FakeWorld` (a metric reads whether it is distributed when it
    is made: make the engines' after this)."""
    world = FakeWorld(size)
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", world.gather)
    monkeypatch.setattr(torchmetrics.metric, "jit_distributed_available", lambda: True)
    return world


def compute_as_ranks(engines, world):
    results, errors = [None] * len(engines), []

    def rank(r):
        world.local.rank = r
        try:
            results[r] = engines[r].compute()
        except Exception as err:  # surfaced below
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize(("name", "kwargs", "size"), [("test_vit", dict(img_size=32, patch_size=8), 32),
                                                      ("test_resnet", {}, 64)])  # fmt: skip
def test_a_rank_without_minibatches_learns_the_grid_from_the_others(monkeypatch, name, kwargs, size):
    # Under DDP a rank may get no probe minibatch: it cannot know the grid, agrees on it in reduce, and every rank
    # ends with the one-process result.
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    parts = batches(images(24, size, seed=9))
    single = ProbeEngine([ProbedModel("model", model)], [Localization(permutations=3)])
    assert single.analyses[0]._tap.grid is None  # learned from the first minibatch
    single.run(parts, len(parts), torch.device("cpu"))
    expected = single.compute()
    world = fake_world(monkeypatch, 2)
    engines = []
    for share in (parts, []):
        engine = ProbeEngine([ProbedModel("model", model)], [Localization(permutations=3)])
        engine.run(share, len(parts), torch.device("cpu"))
        assert engine.failures == {}
        engines.append(engine)
    for got in compute_as_ranks(engines, world):
        for key in ("localization", "localization_se", "localization_null"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-12)
        assert got["localization_grid"].tolist() == expected["localization_grid"].tolist()
        assert got["localization_stride"] == expected["localization_stride"]
        assert got["localization_layer"] == expected["localization_layer"]


# ------------------------------------------------------------------------------------------- figures, scalars


def test_figure_shows_query_maps_in_image_orientation_and_scalars_match():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
    _, fields = run(model, images(32, 32, seed=8))
    result = CKAResult(fields, analyses=ANALYSES)
    (figure,) = Localization().figures(result, None, View(run="r"))
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
    scalars = Localization().scalars(result, View())
    own, offset = own_fraction_and_offset(matrix, 4, 8.0)
    assert scalars["localization/own_position_fraction"] == pytest.approx(own)
    assert scalars["localization/mean_offset_px"] == pytest.approx(offset)
    assert scalars["localization/own_position_cka"] == pytest.approx(np.mean(np.diagonal(matrix)))


def test_scalars_and_figures_are_nan_safe():
    empty = CKAResult(layers=["a"], analyses=ANALYSES)
    assert Localization().scalars(empty, View()) == {} and Localization().figures(empty, None, View()) == []
    nan = CKAResult(
        layers=["a"],
        localization=np.full((4, 4), np.nan),
        localization_grid=np.array([2, 2]),
        localization_stride=float("nan"),
        localization_layer="a",
        analyses=ANALYSES,
    )
    assert all(np.isnan(v) for v in Localization().scalars(nan, View()).values())
    for figure in Localization().figures(nan, None, View()):
        draw_figure(figure)
    one = CKAResult(layers=["a"], localization=np.ones((1, 1)), localization_grid=np.array([1, 1]), analyses=ANALYSES)
    assert Localization().scalars(one, View())["localization/own_position_fraction"] == 1.0
    assert len(Localization().figures(one, None, View())[0].panels) == 1

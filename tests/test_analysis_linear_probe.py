"""LinearProbe against an independent NumPy reference (manual hooks, ridge by ``numpy.linalg.solve`` with an explicit
intercept column, GCV from the explicit hat matrix) and known answers (separable labels, shuffled labels, DDP split)."""

import re
import threading
import warnings

import numpy as np
import pytest
import timm
import torch
import torchmetrics.metric
from torch import nn

from lightning_cka.analyses import LayerCKA, default_analyses, resolve_analyses
from lightning_cka.analyses.linear_probe import LinearProbe
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.render import draw_figure
from lightning_cka.figures.spec import Curves
from lightning_cka.functional.ridge import fit_ridge, label_permutation
from lightning_cka.result import CKAResult
from lightning_cka.taps.base import TapSet
from lightning_cka.taps.linear_probe import LinearProbeTap

GRID = 10.0 ** np.arange(-6.0, 2.0 + 1e-9, 0.25)  # the documented λ grid, relative to s_max (docs/tags page)


# ----------------------------------------------------------------------------------------------- the reference


def manual_outputs(model, names, inputs, batch):
    """Each layer's whole output in float64, copied in plain forward hooks."""
    outputs = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, a, out, name=name: outputs[name].append(out.detach().double().numpy().copy())
        )
        for name in names
    ]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            model(inputs[i : i + batch])
    for handle in handles:
        handle.remove()
    return [np.concatenate(outputs[name]) for name in names]


def manual_features(model, names, inputs, batch, prefix, has_cls):
    """Each layer's (cls, gap) features: token 0, mean of tokens[prefix:], or the mean over H and W of NCHW maps."""
    features = []
    for out in manual_outputs(model, names, inputs, batch):
        if out.ndim == 3:
            features.append((out[:, 0] if has_cls else None, out[:, prefix:].mean(axis=1)))
        else:
            features.append((None, out.mean(axis=(2, 3))))
    return features


def with_intercept(x):
    return np.hstack([np.ones((len(x), 1)), x])


def penalty(d):
    p = np.eye(d + 1)
    p[0, 0] = 0.0  # the intercept is not penalized
    return p


def ridge_accuracy(x_fit, y_fit, x_score, y_score, lam, classes):
    """Ridge on one-hot targets with an explicit intercept column, solved by numpy.linalg.solve; held-out accuracy."""
    a = with_intercept(x_fit)
    coef = np.linalg.solve(a.T @ a + lam * penalty(x_fit.shape[1]), a.T @ np.eye(classes)[y_fit])
    return float(((with_intercept(x_score) @ coef).argmax(axis=1) == y_score).mean())


def gcv_naive(x_fit, y_fit, classes):
    """The GCV curve from the explicit n x n hat matrix H of the intercept model: n RSS / (n - tr H)^2."""
    n, d = x_fit.shape
    centered = x_fit - x_fit.mean(axis=0)
    s_max = np.linalg.eigvalsh(centered.T @ centered).max()
    a, y = with_intercept(x_fit), np.eye(classes)[y_fit]
    lambdas, values = s_max * GRID, []
    for lam in lambdas:
        hat = a @ np.linalg.solve(a.T @ a + lam * penalty(d), a.T)
        rss = np.square(y - hat @ y).sum()
        dof = n - np.trace(hat)
        values.append(n * rss / dof**2 if dof > 0 else np.inf)
    return lambdas, np.array(values)


def shuffled_fit_labels(y_fit, seed, shuffle):
    """The fit half's labels (even probe indices, in order) as shuffle ``shuffle`` permutes them (package seeding)."""
    return y_fit[label_permutation(seed, shuffle, len(y_fit)).numpy()]


def batches(x, y, size):
    return [
        ProbeBatch(i, start, x[start : start + size], None if y is None else y[start : start + size])
        for i, start in enumerate(range(0, len(x), size))
    ]


def run(model, x, y, size, layers="auto"):
    engine = ProbeEngine([ProbedModel("model", model, layers)], [LinearProbe()])
    parts = batches(x, y, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.run(parts, len(parts), torch.device("cpu"))
        fields = engine.compute()
    # A failed update or finalize is kept by the engine, not raised: it must not have happened.
    assert engine.failures == {} and engine.finalize_failures == {}, (engine.failures, engine.finalize_failures)
    return engine, fields


def shifted_images(n, size, seed, classes=3):
    """Images whose class is the channel with the largest offset: decodable, but not perfectly."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(n, classes, generator=g)
    x = torch.randn(n, 3, size, size, generator=g) + 0.3 * shift[:, :3, None, None]
    return x, shift.argmax(dim=1)


def check_against_reference(model, x, y, fields, names, prefix, has_cls, batch, shuffles_checked=1):
    y_np = y.numpy()
    classes = int(y_np.max()) + 1
    fit, held = np.arange(len(y_np)) % 2 == 0, np.arange(len(y_np)) % 2 == 1
    features = manual_features(model, names, x, batch, prefix, has_cls)
    accuracy, ridge = fields["linear_probe_accuracy"], fields["linear_probe_ridge"]
    assert accuracy.shape == ridge.shape == (len(names), 2)
    for layer, pair in enumerate(features):
        for kind, feats in enumerate(pair):
            if feats is None:
                assert np.isnan(accuracy[layer, kind]) and np.isnan(ridge[layer, kind])
                continue
            lambdas, curve = gcv_naive(feats[fit], y_np[fit], classes)
            # The same grid point (neighbours are 10^0.25 apart); s_max differs by the float32 rounding of the means.
            np.testing.assert_allclose(ridge[layer, kind], lambdas[np.argmin(curve)], rtol=1e-5)
            expected = ridge_accuracy(feats[fit], y_np[fit], feats[held], y_np[held], ridge[layer, kind], classes)
            assert accuracy[layer, kind] == expected, (names[layer], kind)
    assert fields["linear_probe_examples"].tolist() == [fit.sum(), held.sum()]
    # The chance level: the same NumPy ridge (its own naive GCV λ) on the fit half's labels shuffled.
    shuffled = fields["linear_probe_shuffled"]
    assert shuffled.shape == (10, len(names), 2)
    for p in range(shuffles_checked):  # the naive GCV is slow
        y_perm = shuffled_fit_labels(y_np[fit], 0, p)
        assert np.array_equal(np.sort(y_perm), np.sort(y_np[fit])) and not np.array_equal(y_perm, y_np[fit])
        for layer, pair in enumerate(features):
            for kind, feats in enumerate(pair):
                if feats is None:
                    assert np.isnan(shuffled[p, layer, kind])
                    continue
                lambdas, curve = gcv_naive(feats[fit], y_perm, classes)
                lam = lambdas[np.argmin(curve)]
                expected = ridge_accuracy(feats[fit], y_perm, feats[held], y_np[held], lam, classes)
                assert abs(shuffled[p, layer, kind] - expected) <= 1 / held.sum() + 1e-12, (p, names[layer], kind)
    assert fields["linear_probe_chance"] == np.nanmean(shuffled)


# ----------------------------------------------------------------------------------------------- reference tests


def test_vit_with_class_token_matches_numpy_reference():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=64)
    x, y = shifted_images(90, 64, seed=1)
    engine, fields = run(model, x, y, size=13)  # 13: minibatch starts of both parities
    names = engine.models["model"].layers
    check_against_reference(model, x, y, fields, names, model.num_prefix_tokens, True, 13, shuffles_checked=4)
    accuracy = fields["linear_probe_accuracy"]
    assert np.isfinite(accuracy).all()
    assert accuracy.max() > fields["linear_probe_chance"] + 0.2  # not a trivial majority vote everywhere


def test_resnet_gap_only_matches_numpy_reference():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    x, y = shifted_images(80, 64, seed=2)
    engine, fields = run(model, x, y, size=16)
    check_against_reference(model, x, y, fields, engine.models["model"].layers, 0, False, 16)
    assert np.isnan(fields["linear_probe_accuracy"][:, 0]).all()
    assert np.isfinite(fields["linear_probe_accuracy"][:, 1]).all()


def test_register_vit_without_class_token_pools_patch_tokens_only():
    torch.manual_seed(0)
    model = timm.create_model("vit_wee_patch16_reg1_gap_256", img_size=64)
    assert model.num_prefix_tokens == 1 and not model.has_class_token
    x, y = shifted_images(30, 64, seed=3)
    layers = ["blocks.0", "blocks.6", "blocks.13"]
    engine, fields = run(model, x, y, size=15, layers=layers)
    check_against_reference(model, x, y, fields, layers, 1, False, 15)
    # The tap's features themselves: the register token is left out of the pool (and including it would differ).
    tap = LinearProbeTap(engine.models["model"].layers, engine.models["model"].layouts)
    with TapSet(model, dict(model.named_modules()), [tap]) as taps:
        model(x[:10])
        got = taps.collect()[tap.key]
    for layer, out in enumerate(manual_outputs(model, layers, x[:10], 10)):
        assert got.cls[layer] is None
        # means in float32 (the output's precision), as documented
        np.testing.assert_allclose(got.gap[layer].numpy(), out[:, 1:].mean(axis=1), rtol=1e-5, atol=1e-6)
        assert not np.allclose(got.gap[layer].numpy(), out.mean(axis=1), rtol=1e-6)


def test_fit_ridge_gcv_curve_equals_naive_hat_matrix_gcv():
    rng = np.random.default_rng(0)
    for n, d, classes in ((40, 10, 3), (30, 50, 4)):  # more and fewer examples than features
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0  # correlated, off-centre
        y = rng.integers(0, classes, size=n)
        onehot = np.eye(classes)[y]
        fit = fit_ridge(*(torch.from_numpy(a) for a in (x.T @ x, x.T @ onehot, x.sum(0), onehot.sum(0))))
        lambdas, curve = gcv_naive(x, y, classes)
        np.testing.assert_allclose(fit.lambdas.numpy(), lambdas, rtol=1e-9)
        finite = np.isfinite(curve)
        assert (np.isfinite(fit.gcv.numpy()) == finite).all()
        # n < D nearly interpolates at the smallest λ: RSS is ~1e-9 of ‖Yc‖², known to ~1e-6 from the sums
        np.testing.assert_allclose(fit.gcv.numpy()[finite], curve[finite], rtol=1e-5)
        assert fit.ridge == fit.lambdas[np.argmin(curve)]


# ----------------------------------------------------------------------------------------------- known answers


class ClsOnly(nn.Module):
    """Tokens whose CLS token is the channel means (label inside) and whose patch tokens are the pixels of the
    noise channels only."""

    def forward(self, x):
        pixels = x.flatten(2).transpose(1, 2).clone()  # (n, HW, C)
        pixels[..., 0] = 0.0
        return torch.cat([x.mean(dim=(2, 3))[:, None], pixels], dim=1)


class PatchOnly(nn.Module):
    """Tokens whose CLS token is constant and whose patch tokens are the pixels (their mean: the channel means)."""

    def forward(self, x):
        pixels = x.flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(pixels[:, :1]), pixels], dim=1)


class DropChannel0(nn.Module):
    def forward(self, x):
        out = x.clone()
        out[:, 0] = 0.0
        return out


class Toy(nn.Module):
    """Identity-like layers: maps as they are, maps without the label channel, and two token layouts."""

    num_prefix_tokens = 1
    has_class_token = True

    def __init__(self):
        super().__init__()
        self.keep, self.drop, self.cls_only, self.patch_only = nn.Identity(), DropChannel0(), ClsOnly(), PatchOnly()

    def forward(self, x):
        return sum(layer(x).mean() for layer in (self.keep, self.drop, self.cls_only, self.patch_only))


TOY_LAYERS = ["keep", "drop", "cls_only", "patch_only"]


def separable(n, seed):
    """Channel 0 is ±1.5 (plus noise) everywhere: the label is the sign of its mean, a linear feature of the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, 4, generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x[:, 0] = 1.5 * sign[:, None, None] + 0.5 * x[:, 0]
    return x, (x[:, 0].mean(dim=(1, 2)) > 0).long()


def binomial_tolerance(p, n):
    return 4 * np.sqrt(p * (1 - p) / n)


def test_linearly_separable_labels_are_decoded_where_the_feature_is():
    x, y = separable(400, seed=0)
    _, fields = run(Toy(), x, y, size=32, layers=TOY_LAYERS)
    acc, ridge, chance = fields["linear_probe_accuracy"], fields["linear_probe_ridge"], fields["linear_probe_chance"]
    scored = fields["linear_probe_examples"][1]
    tol = binomial_tolerance(0.5, scored)  # labels independent of a layer's features: Binomial(scored, 1/2) hits
    assert np.isnan(acc[:2, 0]).all()  # maps have no CLS token
    assert acc[0, 1] == 1.0  # keep: the channel mean is there
    assert abs(acc[1, 1] - 0.5) < tol  # drop: only noise channels
    assert acc[2, 0] == 1.0 and abs(acc[2, 1] - 0.5) < tol  # cls_only
    assert acc[3, 1] == 1.0  # patch_only: the pool of the patch tokens is the channel means
    y_np = y.numpy()
    majority = np.mean(y_np[1::2] == np.bincount(y_np[0::2]).argmax())
    assert acc[3, 0] == majority and np.isnan(ridge[3, 0])  # constant CLS: the majority predictor, no λ
    assert abs(chance - 0.5) < tol  # the shuffled-label probes
    assert np.isfinite(ridge[:, 1]).all()


def test_shuffled_labels_give_chance():
    x, y = separable(400, seed=1)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    _, fields = run(Toy(), x, y, size=40, layers=TOY_LAYERS)
    acc, scored = fields["linear_probe_accuracy"], fields["linear_probe_examples"][1]
    tol = binomial_tolerance(0.5, scored)
    finite = acc[np.isfinite(acc)]
    assert finite.size == 6
    assert np.all(np.abs(finite - 0.5) < tol), (finite, tol)
    assert abs(fields["linear_probe_chance"] - 0.5) < tol


def test_four_shuffled_classes_on_a_vit_give_chance():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(240, 3, 32, 32, generator=g)
    y = torch.arange(240) % 4
    y = y[torch.randperm(240, generator=g)]
    _, fields = run(model, x, y, size=60)
    acc, scored = fields["linear_probe_accuracy"], fields["linear_probe_examples"][1]
    assert np.all(np.abs(acc - 0.25) < binomial_tolerance(0.25, scored)), acc


def test_nan_features_give_nan_without_failing():
    class Poisoned(nn.Module):
        def __init__(self, row):
            super().__init__()
            self.row = row

        def forward(self, x):
            out = x.clone()
            out[self.row, 1] = torch.nan
            return out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.clean, self.fit_nan, self.score_nan = nn.Identity(), Poisoned(2), Poisoned(3)  # rows 2, 3 of batch 0

        def forward(self, x):
            return self.clean(x).mean() + self.fit_nan(x).mean() + self.score_nan(x).mean()

    x, y = separable(64, seed=2)
    _, fields = run(Model(), x, y, size=16, layers=["clean", "fit_nan", "score_nan"])
    acc, ridge = fields["linear_probe_accuracy"][:, 1], fields["linear_probe_ridge"][:, 1]
    assert acc[0] == 1.0 and np.isfinite(ridge[0])
    assert np.isnan(acc[1]) and np.isnan(ridge[1])  # NaN in the fit half: no fit
    assert np.isnan(acc[2]) and np.isfinite(ridge[2])  # NaN in the scored half only: fitted, not scored


def test_classes_only_in_the_scored_half_are_flagged():
    x, y = separable(64, seed=4)
    y[1::8] = 2  # odd probe indices only: the fit half never sees class 2
    engine = ProbeEngine([ProbedModel("model", Toy(), ["keep"])], [LinearProbe()])
    parts = batches(x, y, 16)
    engine.run(parts, len(parts), torch.device("cpu"))
    with pytest.warns(UserWarning, match="8 of the 32 scored probe images belong to classes no fitted image has"):
        fields = engine.compute()
    assert fields["linear_probe_accuracy"][0, 1] <= 24 / 32  # class 2 is never predicted


# ----------------------------------------------------------------------------------------------- DDP


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


def compute_as_ranks(engines, monkeypatch):
    world = FakeWorld(len(engines))
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", world.gather)
    monkeypatch.setattr(torchmetrics.metric, "jit_distributed_available", lambda: True)
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


@pytest.mark.parametrize("split", ["interleaved", "one_rank_empty"])
def test_ranks_with_half_the_minibatches_each_equal_one_process(monkeypatch, split):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    x, y = shifted_images(77, 32, seed=4, classes=4)
    y[y == 3] = 2  # ...and rank 0 may not see the highest class: the class axis is agreed over ranks
    y[-1] = 3
    parts = batches(x, y, 11)  # 7 minibatches, odd starts included
    single = ProbeEngine([ProbedModel("model", model)], [LinearProbe()])
    single.run(parts, len(parts), torch.device("cpu"))
    expected = single.compute()
    shares = [parts[0::2], parts[1::2]] if split == "interleaved" else [parts, []]
    engines = []
    for share in shares:
        engine = ProbeEngine([ProbedModel("model", model)], [LinearProbe()])
        engine.run(share, len(parts), torch.device("cpu"))
        engines.append(engine)
    for got in compute_as_ranks(engines, monkeypatch):
        np.testing.assert_array_equal(got["linear_probe_accuracy"], expected["linear_probe_accuracy"])
        np.testing.assert_allclose(got["linear_probe_ridge"], expected["linear_probe_ridge"], rtol=1e-9)
        assert got["linear_probe_chance"] == expected["linear_probe_chance"]
        # the shuffled-label probes too: permutations seeded by the global minibatch index, sums over ranks
        assert np.isfinite(expected["linear_probe_shuffled"]).all()
        np.testing.assert_array_equal(got["linear_probe_shuffled"], expected["linear_probe_shuffled"])
        assert got["linear_probe_examples"].tolist() == expected["linear_probe_examples"].tolist() == [39, 38]


# ----------------------------------------------------------------------------------------------- contract


def test_missing_labels_raise_naming_the_fix():
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    engine = ProbeEngine([ProbedModel("model", model)], [LinearProbe(), LayerCKA(permutations=0)])
    # The analysis fails alone (kept in engine.failures); the others go on.
    engine.run(batches(torch.randn(8, 3, 32, 32), None, 8), 1, torch.device("cpu"))
    error = engine.failures["linear_probe"]
    assert isinstance(error, ValueError)
    assert re.search(r"needs class labels.*leave the linear_probe analysis out", str(error))
    assert "cka" not in engine.failures
    assert "intra" in engine.compute(skip=list(engine.failures))
    engine.run(batches(torch.randn(8, 3, 32, 32), torch.rand(8), 8), 1, torch.device("cpu"))
    error = engine.failures["linear_probe"]
    assert isinstance(error, ValueError) and "integer class indices" in str(error)
    assert list(engine.failures) == ["linear_probe"]


def test_off_by_default_and_the_model_is_left_untouched():
    model = timm.create_model("test_vit", img_size=32, patch_size=8)
    # Off by default: not among the analyses that run when none are given (nor in "default").
    assert not LinearProbe.default
    assert "linear_probe" not in [a.name for a in default_analyses()]
    assert "linear_probe" not in [a.name for a, _ in resolve_analyses(None)]
    assert "linear_probe" not in [a.name for a, _ in resolve_analyses(["default"])]
    assert [a.name for a, _ in resolve_analyses(["default", "linear_probe"])][-1] == "linear_probe"
    x, y = shifted_images(24, 32, seed=5)
    model.train()
    model.blocks[0].eval()  # a submodule the user keeps in eval mode stays there
    torch.manual_seed(1)
    before = model.eval()(x).detach().clone()
    model.train()
    model.blocks[0].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run(model, x, y, size=8)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model.eval()(x), before, rtol=0, atol=0)


ANALYSES = (LayerCKA(), LinearProbe())  # the analyses whose fields the results below hold


def toy_result(layers, accuracy, chance=0.5, examples=(100, 100)):
    return CKAResult(
        layers=layers,
        intra=np.eye(len(layers)),
        linear_probe_accuracy=np.asarray(accuracy, dtype=np.float64),
        linear_probe_chance=chance,
        linear_probe_ridge=np.ones((len(layers), 2)),
        linear_probe_examples=np.array(examples, dtype=np.int64),
        analyses=ANALYSES,
    )


def test_figure_and_scalars_from_a_real_probe(tmp_path):
    x, y = separable(200, seed=3)
    _, fields = run(Toy(), x, y, size=25, layers=TOY_LAYERS)
    result = CKAResult({**fields, "intra": np.eye(4)}, analyses=ANALYSES)
    loaded = CKAResult.load(result.save(tmp_path / "probe.npz"))
    for key in fields:
        np.testing.assert_array_equal(np.asarray(loaded.get(key)), np.asarray(fields[key]))
    assert [a.name for a in loaded.analyses] == ["cka", "linear_probe"]
    (figure,) = LinearProbe().figures(loaded, None, View(run="toy"))
    assert figure.tag == "linear_probe/accuracy"
    (panel,) = figure.panels
    assert isinstance(panel, Curves) and panel.x == tuple(TOY_LAYERS) and panel.ylim[0] < 0 and panel.ylim[1] > 1
    assert [s.label for s in panel.series] == ["CLS token", "GAP: mean over patch tokens / positions"]
    np.testing.assert_array_equal(panel.series[1].values, fields["linear_probe_accuracy"][:, 1])
    assert "chance" in panel.lines[0].label and panel.lines[0].value == fields["linear_probe_chance"]
    assert "Raghu et al. 2021" in figure.caption
    draw_figure(figure).fig.savefig(tmp_path / "figure.png")
    scalars = LinearProbe().scalars(loaded, View())
    assert scalars["linear_probe/gap_accuracy/keep"] == 1.0
    assert scalars["linear_probe/cls_accuracy/cls_only"] == 1.0
    assert scalars["linear_probe/best_gap_accuracy"] == 1.0 == scalars["linear_probe/best_cls_accuracy"]
    assert scalars["linear_probe/chance"] == fields["linear_probe_chance"]
    assert "linear_probe/linear_probe" not in loaded.scalars()  # the file's analyses: its own scalars include ours
    assert "linear_probe/best_gap_accuracy" in loaded.scalars()


def test_figure_and_scalars_are_nan_safe():
    no_cls = toy_result(["a", "b"], [[np.nan, 0.7], [np.nan, 0.9]])
    (figure,) = LinearProbe().figures(no_cls, None, View())
    assert [s.label for s in figure.panels[0].series] == ["GAP: mean over patch tokens / positions"]
    assert "no class token" in figure.caption
    scalars = LinearProbe().scalars(no_cls, View())
    assert scalars["linear_probe/best_gap_accuracy"] == 0.9 and not any("cls" in k for k in scalars)
    all_nan = toy_result(["a", "b"], np.full((2, 2), np.nan), chance=float("nan"), examples=(0, 0))
    (figure,) = LinearProbe().figures(all_nan, None, View())
    draw_figure(figure)
    assert np.isnan(LinearProbe().scalars(all_nan, View())["linear_probe/best_gap_accuracy"])
    empty = toy_result([], np.zeros((0, 2)))
    assert LinearProbe().figures(empty, None, View()) == []
    assert LinearProbe().scalars(CKAResult(layers=["a"], intra=np.eye(1), analyses=ANALYSES), View()) == {}

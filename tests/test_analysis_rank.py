"""EffectiveRank (RankMe) against numpy's SVD of the centered features, on known cases and real timm models."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lightning_cka.analyses import LayerCKA
from lightning_cka.analyses.rank import EffectiveRank
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.render import draw_figure
from lightning_cka.figures.spec import Curves
from lightning_cka.result import CKAResult

BATCH = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: one thread is as fast, and much faster on a machine whose cores are busy with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rankme(features):
    """Garrido et al. 2022 by the book: exp entropy of the normalized singular values of the centered features."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


class Known(nn.Module):
    """Layers with known ranks: the input itself, a rank-3 linear map of it, and a constant."""

    def __init__(self, width, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.full = nn.Identity()
        self.low = nn.Linear(width, width, bias=True).to(dtype)
        with torch.no_grad():
            # Exactly rank 3 in the model's dtype (a float32 product cast to float64 would add tiny directions).
            low_rank = torch.randn(width, 3, generator=g).to(dtype) @ torch.randn(3, width, generator=g).to(dtype)
            self.low.weight.copy_(low_rank)
        self.const = nn.Linear(width, 4).to(dtype)
        with torch.no_grad():
            self.const.weight.zero_()

    def forward(self, x):
        return self.full(x).sum() + self.low(x).sum() + self.const(x).sum()


def run(model, x, reference=None, layers="auto", ref_layers="auto", batch=BATCH, engine=None):
    if engine is None:
        probed = [ProbedModel("model", model, layers)]
        if reference is not None:
            probed.append(ProbedModel("reference", reference, ref_layers, frozen=True))
        engine = ProbeEngine(probed, [EffectiveRank()])
    count = -(-x.shape[0] // batch)
    batches = [ProbeBatch(i, i * batch, x[i * batch : (i + 1) * batch]) for i in range(count)]
    engine.run(batches, num_minibatches=count, device=torch.device("cpu"))
    return engine


def manual_features(model, names, x, batch=BATCH):
    modules = dict(model.named_modules())
    out = []
    for start in range(0, x.shape[0], batch):
        seen = {}
        handles = [
            modules[n].register_forward_hook(lambda m, a, o, n=n, seen=seen: seen.__setitem__(n, o.detach().clone()))
            for n in names
        ]
        with torch.no_grad():
            model(x[start : start + batch])
        for h in handles:
            h.remove()
        out.append([seen[n].double().numpy() for n in names])
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_known_ranks_match_numpy_svd(dtype):
    width = 200  # isotropic Gaussian, far more features than examples: close to the bound n - 1
    x = torch.randn(3 * BATCH + 6, width, generator=torch.Generator().manual_seed(0)).to(dtype)  # last minibatch: 6
    model = Known(width, dtype).eval()
    fields = run(model, x, layers=["full", "low", "const"], batch=BATCH).compute()
    per_batch = manual_features(model, ["full", "low"], x)
    expected = np.array([[rankme(f) for f in feats] for feats in per_batch])  # (M, 2)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(fields["effective_rank_minibatches"][:, :2], expected, rtol=tol)
    np.testing.assert_allclose(fields["effective_rank"][:2], expected.mean(axis=0), rtol=tol)
    se = expected.std(axis=0, ddof=1) / np.sqrt(len(expected))
    np.testing.assert_allclose(fields["effective_rank_se"][:2], se, rtol=1e-6 if dtype == torch.float64 else 1e-2)
    assert np.all(fields["effective_rank_minibatches"][:, 1] <= 3.0 + 1e-9)  # rank-3 features
    assert np.all(fields["effective_rank_minibatches"][:3, 0] > 0.9 * (BATCH - 1))  # isotropic: near n - 1
    assert np.all(fields["effective_rank_minibatches"][:, 0] <= np.array([15, 15, 15, 5]) + 1e-9)
    assert np.isnan(fields["effective_rank"][2]) and np.isnan(fields["effective_rank_se"][2])  # constant layer
    assert fields["effective_rank_bound"] == pytest.approx((3 * 15 + 5) / 4)


def test_timm_model_and_frozen_reference_match_numpy_svd():
    torch.manual_seed(0)
    vit, resnet = timm.create_model("test_vit", img_size=64).eval(), timm.create_model("test_resnet").eval()
    x = torch.randn(2 * BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    engine = run(vit, x, reference=resnet)
    first = engine.compute()
    for role, model in (("model", vit), ("reference", resnet)):
        names = engine.models[role].layers
        expected = np.array([[rankme(f) for f in feats] for feats in manual_features(model, names, x)])
        prefix = "" if role == "model" else "reference_"
        np.testing.assert_allclose(first[f"{prefix}effective_rank"], expected.mean(axis=0), rtol=1e-4)
    # A second probe: the reference is not run again (its Grams and ranks are cached) and gives the same ranks.
    calls = []
    handle = resnet.register_forward_pre_hook(lambda *a: calls.append(1))
    second = run(vit, x, engine=engine).compute()
    handle.remove()
    assert calls == []
    np.testing.assert_array_equal(second["reference_effective_rank"], first["reference_effective_rank"])
    np.testing.assert_array_equal(second["effective_rank"], first["effective_rank"])


def test_non_finite_features_give_nan_not_an_error():
    model = Known(8, torch.float32).eval()
    x = torch.randn(BATCH, 8)
    x[3, 2] = float("nan")
    fields = run(model, x, layers=["full", "low"]).compute()
    assert np.isnan(fields["effective_rank"]).all()
    assert fields["effective_rank_minibatches"].shape == (1, 2)


def test_left_out_of_the_list_binds_nothing():
    # The old switch rank=False is gone: an analysis runs when it is in the engine's list, and only then.
    model = Known(8, torch.float32)
    x = torch.randn(BATCH, 8)
    engine = ProbeEngine([ProbedModel("model", model, ["full"])], [LayerCKA(permutations=0)])
    assert [a.name for a in engine.analyses] == ["cka"] and engine.skipped == {}
    fields = run(model, x, engine=engine).compute()
    assert not any("effective_rank" in key for key in fields)
    assert EffectiveRank().config() == {}  # no options left to switch it off with


def test_probe_leaves_the_model_untouched():
    model = timm.create_model("test_vit", img_size=64).train()
    x = torch.randn(BATCH, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    run(model, x).compute()
    assert model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_two_ranks_summed_equal_one_process():
    model = Known(40, torch.float64).eval()
    x = torch.randn(4 * BATCH, 40, dtype=torch.float64)
    whole = run(model, x, layers=["full", "low"]).compute()
    engines = []
    for rank in range(2):
        engine = ProbeEngine([ProbedModel("model", model, ["full", "low"])], [EffectiveRank()])
        mine = [ProbeBatch(i, i * BATCH, x[i * BATCH : (i + 1) * BATCH]) for i in range(rank, 4, 2)]
        engine.run(mine, num_minibatches=4, device=torch.device("cpu"))
        engines.append(engine)
    engines[0].analyses[0]._sums["model"].merge_state(engines[1].analyses[0]._sums["model"])
    merged = engines[0].compute()
    for key in ("effective_rank", "effective_rank_se", "effective_rank_minibatches", "effective_rank_bound"):
        np.testing.assert_allclose(merged[key], whole[key], rtol=1e-12)


ANALYSES = (LayerCKA(), EffectiveRank())  # the analyses whose fields the results below hold


def test_figure_and_scalars():
    torch.manual_seed(0)
    vit, resnet = timm.create_model("test_vit", img_size=64).eval(), timm.create_model("test_resnet").eval()
    x = torch.randn(3 * BATCH, 3, 64, 64)
    result = CKAResult(run(vit, x, reference=resnet).compute(), analyses=ANALYSES)
    (figure,) = EffectiveRank().figures(result, None, View())
    assert figure.tag == "rank/effective_rank" and len(figure.panels) == 2
    model_panel, reference_panel = figure.panels
    assert isinstance(model_panel, Curves) and model_panel.x == tuple(result.layers)
    assert reference_panel.x == tuple(result.reference_layers)
    np.testing.assert_array_equal(model_panel.series[0].values, result.effective_rank)
    np.testing.assert_array_equal(model_panel.series[0].error, result.effective_rank_se)
    assert [line.value for line in model_panel.lines] == [BATCH - 1]  # the ranks come near the bound: drawn
    assert "n - 1 = 15" in figure.caption and "ollapse" in figure.caption
    scalars = EffectiveRank().scalars(result, View())
    assert scalars["rank/mean"] == pytest.approx(result.effective_rank.mean())
    per_minibatch = result.effective_rank_minibatches.mean(axis=1)
    assert scalars["rank/mean_se"] == pytest.approx(per_minibatch.std(ddof=1) / np.sqrt(3))
    for name, value in zip(result.layers, result.effective_rank, strict=True):
        assert scalars[f"rank/effective_rank/{name}"] == pytest.approx(value)
    draw_figure(figure)


def test_far_bound_is_named_not_drawn_and_nan_is_safe():
    result = CKAResult(
        layers=["a", "b", "c"],
        effective_rank=np.array([2.0, np.nan, 3.0]),
        effective_rank_se=np.array([0.1, np.nan, np.nan]),
        effective_rank_minibatches=np.array([[2.0, np.nan, 3.0]]),
        effective_rank_bound=1023.0,
        analyses=ANALYSES,
    )
    (figure,) = EffectiveRank().figures(result, None, View())
    assert figure.panels[0].lines == () and "off the scale" in figure.caption
    scalars = EffectiveRank().scalars(result, View())
    assert scalars["rank/mean"] == pytest.approx(2.5) and np.isnan(scalars["rank/mean_se"])
    assert np.isnan(scalars["rank/effective_rank/b"])
    draw_figure(figure)
    empty = CKAResult(layers=["a"], effective_rank=np.array([np.nan]), analyses=ANALYSES)
    assert np.isnan(EffectiveRank().scalars(empty, View())["rank/mean"])
    draw_figure(EffectiveRank().figures(empty, None, View())[0])
    assert EffectiveRank().figures(CKAResult(analyses=ANALYSES), None, View()) == []
    assert EffectiveRank().scalars(CKAResult(analyses=ANALYSES), View()) == {}

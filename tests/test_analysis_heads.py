"""HeadCKA: per-head CKA with the reference, against manual hooks on attn.proj and textbook unbiased HSIC (numpy)."""

import copy

import numpy as np
import pytest
import reference as ref
import timm
import torch
from scipy.stats import spearmanr
from torch import nn

from lightning_cka.analyses import AttentionStats, LayerCKA
from lightning_cka.analyses.heads import HeadCKA
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.render import draw_figure
from lightning_cka.figures.spec import Scatter, from_json, to_json
from lightning_cka.result import CKAResult

BATCH, MINIBATCHES = 8, 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: one thread is as fast, and much faster on a machine whose cores are busy with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


@pytest.fixture(scope="module")
def models():
    # Real families at 64 px with 3 blocks: DeiT distilled (CLS + distillation token), a register ViT without a class
    # token (one register), the tiny test ViT; a test ResNet as the reference.
    return {
        "test_vit": make("test_vit", img_size=64),
        "deit": make("deit_tiny_distilled_patch16_224", img_size=64, depth=3),
        "reg": make("vit_wee_patch16_reg1_gap_256", img_size=64, depth=3),
        "resnet": make("test_resnet"),
    }


def images(dtype=torch.float32, count=BATCH * MINIBATCHES):
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(dtype)


def run(
    model,
    reference,
    x,
    *,
    reduction="flatten",
    ref_reduction="flatten",
    ref_layers="auto",
    analyses=None,
    permutations=0,
):
    probed = [ProbedModel("model", model, "auto", reduction)]
    if reference is not None:
        probed.append(ProbedModel("reference", reference, ref_layers, ref_reduction, frozen=True))
    engine = ProbeEngine(probed, analyses or [HeadCKA(permutations=permutations)])
    count = x.shape[0] // BATCH
    batches = [ProbeBatch(i, i * BATCH, x[i * BATCH : (i + 1) * BATCH]) for i in range(count)]
    engine.run(batches, num_minibatches=count, device=torch.device("cpu"))
    return engine


# --------------------------------------------------------------------------- independent reference: manual hooks


def manual_outputs(model, names, x, pre=False):
    """Inputs (pre=True) or outputs of the named modules, cloned, per minibatch, as float64 numpy."""
    modules = dict(model.named_modules())
    per_batch = []
    for i in range(x.shape[0] // BATCH):
        seen = {}
        handles = []
        for name in names:
            if pre:
                hook = lambda m, args, name=name, seen=seen: seen.__setitem__(name, args[0].detach().clone())  # noqa: E731
                handles.append(modules[name].register_forward_pre_hook(hook))
            else:
                hook = lambda m, args, out, name=name, seen=seen: seen.__setitem__(name, out.detach().clone())  # noqa: E731
                handles.append(modules[name].register_forward_hook(hook))
        with torch.no_grad():
            model(x[i * BATCH : (i + 1) * BATCH].to(next(model.parameters()).dtype))
        for handle in handles:
            handle.remove()
        per_batch.append([seen[name].double().numpy() for name in names])
    return per_batch


def manual_head_features(model, x, reduction, prefix):
    """Per minibatch, the list of every head's features: proj inputs sliced head-major, reduced by hand."""
    names = [f"blocks.{i}.attn.proj" for i in range(len(model.blocks))]
    out = []
    for inputs in manual_outputs(model, names, x, pre=True):
        heads = []
        for block, inp in zip(model.blocks, inputs, strict=True):
            num, width = block.attn.num_heads, inp.shape[-1] // block.attn.num_heads
            for h in range(num):
                f = inp[:, :, h * width : (h + 1) * width]  # (B, T, d)
                if reduction == "mean":
                    f = f[:, prefix:].mean(axis=1)
                elif reduction == "cls":
                    f = f[:, 0]
                heads.append(f.reshape(f.shape[0], -1))
        out.append(heads)
    return out


def manual_reference_features(reference, layers, x, reduction):
    out = []
    for outputs in manual_outputs(reference, layers, x):
        out.append([o.mean(axis=(2, 3)) if reduction == "mean" else o.reshape(o.shape[0], -1) for o in outputs])
    return out


def padded(model, flat):
    """(all heads, Lr) -> (layers, max heads, Lr), the layout of head_reference."""
    counts = [b.attn.num_heads for b in model.blocks]
    out = np.full((len(counts), max(counts), flat.shape[1]), np.nan)
    start = 0
    for i, c in enumerate(counts):
        out[i, :c] = flat[start : start + c]
        start += c
    return out


CASES = [  # model, reduction, reference reduction, dtype, prefix tokens excluded by "mean"
    ("test_vit", "flatten", "flatten", torch.float64, 1),
    ("test_vit", "cls", "mean", torch.float32, 1),
    ("deit", "mean", "mean", torch.float64, 2),
    ("deit", "cls", "flatten", torch.float32, 2),
    ("reg", "mean", "mean", torch.float64, 1),
    ("reg", "flatten", "mean", torch.float32, 1),
]


@pytest.mark.parametrize(("name", "reduction", "ref_reduction", "dtype", "prefix"), CASES)
def test_head_cka_equals_manual_hooks_and_textbook_unbiased_hsic(models, name, reduction, ref_reduction, dtype, prefix):
    model, reference = copy.deepcopy(models[name]).to(dtype), copy.deepcopy(models["resnet"]).to(dtype)
    x = images(dtype)
    engine = run(model, reference, x, reduction=reduction, ref_reduction=ref_reduction)
    fields = engine.compute()
    layers = engine.models["reference"].layers
    heads = manual_head_features(model, x, reduction, prefix)
    refs = manual_reference_features(reference, layers, x, ref_reduction)
    expected = padded(model, ref.minibatch_cka(heads, refs))
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    got = fields["head_reference"]
    assert got.shape == (len(model.blocks), model.blocks[0].attn.num_heads, len(layers))
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    assert fields["head_layers"] == [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    if dtype == torch.float64:  # block jackknife by hand: leave each minibatch out of every sum
        loo = np.stack(
            [ref.minibatch_cka(heads[:i] + heads[i + 1 :], refs[:i] + refs[i + 1 :]) for i in range(len(heads))]
        )
        se = np.sqrt((len(loo) - 1) / len(loo) * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
        np.testing.assert_allclose(fields["head_reference_se"], padded(model, se), rtol=1e-6, atol=1e-9)


def test_mean_of_prefix_tokens_matters(models):
    # The check above can fail: counting the distillation token as a patch gives other values.
    model, reference = models["deit"], models["resnet"]
    x = images()
    got = run(model, reference, x, reduction="mean", ref_reduction="mean").compute()["head_reference"]
    layers = ProbedModel("reference", reference).layers
    wrong = padded(
        model,
        ref.minibatch_cka(
            manual_head_features(model, x, "mean", 1), manual_reference_features(reference, layers, x, "mean")
        ),
    )
    assert np.abs(got - wrong).max() > 1e-3


# ------------------------------------------------------------------------------------------------- known answers


class HeadSlice(nn.Module):
    """A reference layer whose output is exactly one head's slice of proj's input, rotated and scaled."""

    def __init__(self, start, stop, rotation):
        super().__init__()
        self.start, self.stop = start, stop
        self.register_buffer("rotation", rotation)

    def forward(self, x):
        return 3.0 * x[..., self.start : self.stop] @ self.rotation


class ProjWithSlices(nn.Module):
    """proj, after calling one HeadSlice per head on its input (the output is proj's, so the model is unchanged)."""

    def __init__(self, proj, slices):
        super().__init__()
        self.proj, self.slices = proj, nn.ModuleList(slices)

    def forward(self, x):
        for s in self.slices:
            s(x)
        return self.proj(x)


def sliced_copy(model, dtype):
    copy_ = copy.deepcopy(model).to(dtype)
    names = []
    generator = torch.Generator().manual_seed(5)
    for i, block in enumerate(copy_.blocks):
        num, width = block.attn.num_heads, block.attn.head_dim
        rotation = [torch.linalg.qr(torch.randn(width, width, generator=generator))[0].to(dtype) for _ in range(num)]
        slices = [HeadSlice(h * width, (h + 1) * width, rotation[h]) for h in range(num)]
        block.attn.proj = ProjWithSlices(block.attn.proj, slices)
        names += [f"blocks.{i}.attn.proj.slices.{h}" for h in range(num)]
    return copy_, names


@pytest.mark.parametrize(("name", "reduction"), [("deit", "mean"), ("reg", "flatten"), ("test_vit", "cls")])
def test_a_reference_layer_that_is_one_heads_output_has_cka_one_with_that_head(models, name, reduction):
    model = copy.deepcopy(models[name]).double()
    reference, layers = sliced_copy(model, torch.float64)
    engine = run(model, reference, images(torch.float64), reduction=reduction, ref_reduction=reduction,
                 ref_layers=layers, permutations=19)  # fmt: skip
    fields = engine.compute()
    cka = fields["head_reference"]  # (La, H, La·H): column l·H + h is head h of layer l
    num_layers, num_heads = cka.shape[:2]
    diagonal = cka.reshape(num_layers * num_heads, -1).diagonal()
    np.testing.assert_allclose(diagonal, 1.0, atol=1e-9)
    off = cka.reshape(num_layers * num_heads, -1)[~np.eye(num_layers * num_heads, dtype=bool)]
    assert np.all(off < 0.999)  # other heads are other representations
    se = fields["head_reference_se"].reshape(num_layers * num_heads, -1).diagonal()
    np.testing.assert_allclose(se, 0.0, atol=1e-7)
    null = fields["head_reference_null"].reshape(num_layers * num_heads, -1).diagonal()
    assert np.all(np.isfinite(null)) and np.all(null < 0.9)  # CKA 1 is far above what unrelated pairings give


def test_heads_pad_with_nan_where_a_layer_has_fewer_heads(models):
    model = copy.deepcopy(models["test_vit"])
    # Block 1 with one head of 64 channels instead of two of 32: same attention width, fewer heads.
    block = model.blocks[1].attn
    block.num_heads, block.head_dim = 1, 64
    fields = run(model, models["resnet"], images()).compute()
    cka = fields["head_reference"]
    assert cka.shape[:2] == (6, 2)
    assert np.isnan(cka[1, 1]).all() and np.isfinite(cka[1, 0]).all() and np.isfinite(cka[0]).all()
    assert np.isnan(fields["head_reference_se"][1, 1]).all()


# --------------------------------------------------------------------------------------- binding and safety


def test_bind_rules(models):
    vit, resnet = models["test_vit"], models["resnet"]
    # Where it does not apply, the engine leaves it out and says why (no error: the other analyses go on).
    for model, reference, reason in ((vit, None, "reference"), (resnet, resnet, "no attention module it reads")):
        engine = run(model, reference, images())
        assert engine.analyses == [] and list(engine.skipped) == ["heads"]
        assert reason in engine.skipped["heads"]
        assert engine.failures == {} and not any(key.startswith("head_") for key in engine.compute())
    probed = [ProbedModel("model", vit), ProbedModel("reference", resnet)]
    engine = ProbeEngine(probed, [HeadCKA()])
    assert len(engine.analyses) == 1 and engine.skipped == {}
    assert ProbeEngine(probed, [LayerCKA()]).skipped == {}  # not in the list: not bound, not skipped
    with pytest.raises(ValueError, match="permutations"):
        HeadCKA(permutations=-1)
    with pytest.raises(ValueError, match="minibatch_weights"):
        HeadCKA(minibatch_weights="rows")


def test_cls_reduction_without_class_token_is_refused_before_any_probe(models):
    with pytest.raises(ValueError, match=r"reduction='cls' needs a class token, but layer 'blocks.0'"):
        run(models["reg"], models["resnet"], images(), reduction="cls", ref_reduction="mean")


def test_probe_leaves_the_model_untouched(models):
    model, reference = copy.deepcopy(models["test_vit"]).train(), models["resnet"]
    x = images()
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run(model, reference, x, permutations=3).compute()
    assert model.training and all(m.training for m in model.modules())
    assert all(b.attn.fused_attn for b in model.blocks)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_two_ranks_summed_equal_one_process(models):
    vit, resnet = models["test_vit"], models["resnet"]
    x = images()
    whole = run(vit, resnet, x, permutations=5).compute()
    engines = []
    for rank in range(2):  # rank r gets minibatches r, r + 2
        probed = [ProbedModel("model", vit), ProbedModel("reference", resnet, frozen=True)]
        engine = ProbeEngine(probed, [HeadCKA(permutations=5)])
        mine = [ProbeBatch(i, i * BATCH, x[i * BATCH : (i + 1) * BATCH]) for i in range(rank, MINIBATCHES, 2)]
        engine.run(mine, num_minibatches=MINIBATCHES, device=torch.device("cpu"))
        engines.append(engine)
    engines[0].analyses[0]._metric.merge_state(engines[1].analyses[0]._metric)
    merged = engines[0].compute()
    for key in ("head_reference", "head_reference_se", "head_reference_null"):
        np.testing.assert_allclose(merged[key], whole[key], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- figure and scalars


def analyses(local_threshold=0.5):
    """The analyses whose fields the results below hold."""
    return [LayerCKA(), AttentionStats(local_threshold=local_threshold), HeadCKA()]


def test_figure_and_scalars_from_a_real_probe(models):
    probe = [LayerCKA(permutations=0), AttentionStats(), HeadCKA(permutations=0)]
    engine = run(models["test_vit"], models["resnet"], images(), analyses=probe)
    result = CKAResult(engine.compute(), analyses=analyses())
    (figure,) = HeadCKA().figures(result, None, View(run="r"))
    assert figure.tag == "attention/heads_vs_reference"
    (panel,) = figure.panels
    assert isinstance(panel, Scatter) and len(panel.series) == 6
    cka, distance = result.head_reference, result.mean_attention_distance
    lower = cka[:, :, :1].mean(axis=2)  # 4 reference layers: the first third is layer1.0
    for i, series in enumerate(panel.series):
        assert series.label == f"blocks.{i}.attn"
        np.testing.assert_allclose(series.values, np.stack([distance[i], lower[i]], axis=1))
    assert "layer1.0" in panel.title and "0.6" in figure.caption and "Spearman" in figure.caption
    scalars = HeadCKA().scalars(result, View())
    expected = spearmanr(distance.ravel(), lower.ravel()).statistic
    assert scalars["heads/distance_cka_spearman"] == pytest.approx(expected, abs=1e-12)
    for i in range(6):
        assert scalars[f"heads/lower_reference_cka/blocks.{i}.attn"] == pytest.approx(lower[i].mean())
    assert from_json(to_json(figure)).panels[0].series[0].values.shape == (2, 2)
    draw_figure(figure)


def test_lower_layers_are_the_first_third_rounded_down():
    cka = np.arange(2 * 2 * 7, dtype=float).reshape(2, 2, 7) / 100
    result = CKAResult(
        head_reference=cka, head_layers=["a", "b"], reference_layers=list("pqrstuv"), analyses=analyses()
    )
    scalars = HeadCKA().scalars(result, View())
    assert scalars["heads/lower_reference_cka/a"] == pytest.approx(cka[0, :, :2].mean())
    assert "heads/distance_cka_spearman" not in scalars  # no attention distances: no correlation
    assert HeadCKA().figures(result, None, View()) == []


def test_nan_and_missing_values_do_not_crash():
    nan = np.full((2, 3, 4), np.nan)
    result = CKAResult(
        head_reference=nan,
        head_layers=["a", "b"],
        reference_layers=list("pqrs"),
        attention_layers=["b"],  # layer "a" was left out of the attention analysis
        mean_attention_distance=np.array([[1.0, np.inf, np.nan]]),
        uniform_attention_distance=float("nan"),
        analyses=analyses(),
    )
    assert HeadCKA().figures(result, None, View()) == []
    scalars = HeadCKA().scalars(result, View())
    assert np.isnan(scalars["heads/distance_cka_spearman"]) and np.isnan(scalars["heads/lower_reference_cka/a"])
    cka = np.random.default_rng(0).uniform(size=(2, 3, 4))
    result.head_reference = cka
    (figure,) = HeadCKA().figures(result, None, View())
    assert [s.label for s in figure.panels[0].series] == ["b"]  # only layer b has distances
    assert "not defined" in figure.caption  # one finite head: no rank correlation
    draw_figure(figure)
    empty = CKAResult(analyses=analyses())
    assert HeadCKA().scalars(empty, View()) == {} and HeadCKA().figures(empty, None, View()) == []


def test_many_layers_name_the_ramp_ends_and_the_local_line_stays_on_the_axis():
    rng = np.random.default_rng(1)
    layers = [f"blocks.{i}.attn" for i in range(12)]
    distances = rng.uniform(10.0, 30.0, size=(12, 3))
    result = CKAResult(
        head_reference=rng.uniform(size=(12, 3, 6)),
        head_layers=layers,
        reference_layers=list("abcdef"),
        attention_layers=layers,
        mean_attention_distance=distances,
        uniform_attention_distance=40.0,
        analyses=analyses(),
    )
    (figure,) = HeadCKA().figures(result, None, View(local_threshold=0.5))  # threshold 20 px, inside 10..30
    (panel,) = figure.panels
    assert [s.label for s in panel.series] == ["blocks.0.attn", *[""] * 10, "blocks.11.attn"]
    assert figure.meta["series_layers"] == layers
    assert [(line.value, line.axis) for line in panel.lines] == [(20.0, "x")]
    assert "a and b" in panel.title  # 6 reference layers: the first third is two
    (figure,) = HeadCKA().figures(result, None, View(local_threshold=0.1))  # 4 px: left of every head
    assert figure.panels[0].lines == () and "Every head is above the local threshold (4.0 px)" in figure.caption
    draw_figure(figure)
    # Without an override the threshold is the attention analysis's own (it made the distances of the result).
    fields = {key: result.get(key) for key in result}
    (figure,) = HeadCKA().figures(CKAResult(fields, analyses=analyses(local_threshold=0.1)), None, View())
    assert figure.panels[0].lines == () and "(4.0 px)" in figure.caption
    (figure,) = HeadCKA().figures(
        CKAResult(fields, analyses=analyses(local_threshold=0.1)), None, View(local_threshold=0.5)
    )
    assert [(line.value, line.axis) for line in figure.panels[0].lines] == [(20.0, "x")]

import re
import warnings

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from lightning_cka.analyses import default_analyses
from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.analyses.residual import ResidualRatio
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.render import draw_figure
from lightning_cka.figures.spec import Curves, Heatmap
from lightning_cka.result import CKAResult

SWIN = dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other (80x slower convs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ANALYSES = (LayerCKA(), ResidualRatio())  # the analyses whose fields the results below hold


def batches(x, size=8):
    return [ProbeBatch(i, s, x[s : s + size]) for i, s in enumerate(range(0, x.shape[0], size))]


def run(model, x, reference=None, size=8, layers="auto"):
    models = [ProbedModel("model", model, layers)]
    if reference is not None:
        models.append(ProbedModel("reference", reference, frozen=True))
    engine = ProbeEngine(models, [ResidualRatio()])
    assert engine.skipped == {}, engine.skipped
    parts = batches(x, size)
    engine.run(parts, len(parts), torch.device("cpu"))
    assert engine.failures == {}, engine.failures  # kept by the engine, not raised
    fields = engine.compute()
    assert engine.finalize_failures == {}, engine.finalize_failures
    return engine, fields


def images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_norms(model, seed=0):
    """Non-trivial BatchNorm / layer-scale values, so no branch is zero or tiny (timm zero-inits several)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if getattr(m, "gamma", None) is not None and isinstance(m.gamma, nn.Parameter):
                m.gamma.fill_(0.5)
    return model.eval()


# --------------------------------------------------------------------------- independent reference: manual hooks


def capture_blocks(model, names, x):
    """Each block's input and output (clones), from plain hooks in one eval forward."""
    modules = dict(model.named_modules())
    inputs, outputs, handles = {}, {}, []
    for name in names:
        block = modules[name]
        handles.append(block.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0].clone())))
        handles.append(block.register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o.clone())))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return modules, inputs, outputs


def vit_streams(block, x, out):
    """timm Block by its source: x + a = mid, mid + m = out. Returns [(stream, branch)] per branch."""
    a = block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    mid = x + a
    m = block.drop_path2(block.ls2(block.mlp(block.norm2(mid))))
    torch.testing.assert_close(mid + m, out)  # the reference itself follows the block
    return [(x, a), (mid, m)]


def swin_streams(block, x, out):
    b, h, w, c = x.shape
    a = block.drop_path1(block._attn(block.norm1(x)))
    mid = (x + a).reshape(b, -1, c)
    m = block.drop_path2(block.mlp(block.norm2(mid)))
    torch.testing.assert_close((mid + m).reshape(b, h, w, c), out)
    return [(x.reshape(b, -1, c), a.reshape(b, -1, c)), (mid, m)]


def resnet_streams(block, x, out):
    """timm / torchvision ResNet blocks recomputed from their modules, as their sources read; out = relu(skip + y)."""
    if hasattr(block, "drop_block"):  # timm
        if hasattr(block, "bn3"):
            y = block.act1(block.bn1(block.conv1(x)))
            y = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(y)))))
            y = block.bn3(block.conv3(y))
        else:
            y = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
            y = block.bn2(block.conv2(y))
        if block.se is not None:
            y = block.se(y)
        if block.drop_path is not None:
            y = block.drop_path(y)
    else:  # torchvision
        y = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        if hasattr(block, "bn3"):
            y = block.bn3(block.conv3(torch.relu(y)))
    skip = block.downsample(x) if block.downsample is not None else x
    torch.testing.assert_close(torch.relu(skip + y), out)
    return [(skip, y)]


def difference_streams(skip_of):
    def streams(block, x, out):
        skip = skip_of(block, x)
        return [(skip, out - skip)]  # out = branch + skip: the branch by difference, no hook on it

    return streams


def reference_ratios(model, names, x, streams, maps, size=8):
    """(blocks, branches, tokens) mean over images of ‖stream‖ / ‖branch‖, with torch.linalg.norm, padded with NaN."""
    sums = {}
    for start in range(0, x.shape[0], size):
        modules, inputs, outputs = capture_blocks(model, names, x[start : start + size])
        for name in names:
            with torch.no_grad():
                pairs = streams(modules[name], inputs[name], outputs[name])
            ratios = []
            for skip, branch in pairs:
                skip, branch = skip.double(), branch.double()
                dim = 1 if maps else -1
                r = torch.linalg.norm(skip, dim=dim) / torch.linalg.norm(branch, dim=dim)
                r = r.reshape(r.shape[0], -1)
                ratios.append(r.mean(dim=1, keepdim=True) if maps else r)
            stacked = torch.stack(ratios, dim=1).sum(dim=0)  # (K, T)
            sums[name] = stacked if name not in sums else sums[name] + stacked
    per_block = [(sums[name] / x.shape[0]).numpy() for name in names]
    tokens = max(r.shape[1] for r in per_block)
    out = np.full((len(names), per_block[0].shape[0], tokens), np.nan)
    for i, r in enumerate(per_block):
        out[i, :, : r.shape[1]] = r
    return out


def test_vit_ratios_equal_the_manual_reference_per_token():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32).eval()
    x = images(24, 32)
    _, fields = run(model, x)
    names = [f"blocks.{i}" for i in range(6)]
    expected = reference_ratios(model, names, x, vit_streams, maps=False)
    assert fields["residual_blocks"] == names and fields["residual_branches"] == ["attention", "mlp"]
    assert fields["residual_ratio"].shape == (6, 2, 5)  # 1 CLS + 2 x 2 patches
    np.testing.assert_allclose(fields["residual_ratio"], expected, rtol=2e-5)
    np.testing.assert_allclose(fields["residual_ratio_cls"], expected[:, :, 0], rtol=2e-5)
    np.testing.assert_allclose(fields["residual_ratio_patch"], expected[:, :, 1:].mean(axis=2), rtol=2e-5)


def test_deit_two_prefix_tokens_are_not_patches():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=3).eval()
    x = images(16, 32, seed=1)
    _, fields = run(model, x)
    expected = reference_ratios(model, ["blocks.0", "blocks.1", "blocks.2"], x, vit_streams, maps=False)
    assert fields["residual_ratio"].shape == (3, 2, 18)  # cls + dist + 16 patches
    assert fields["residual_prefix_tokens"].tolist() == [2, 2, 2]
    np.testing.assert_allclose(fields["residual_ratio"], expected, rtol=2e-5)
    np.testing.assert_allclose(fields["residual_ratio_cls"], expected[:, :, 0], rtol=2e-5)
    np.testing.assert_allclose(fields["residual_ratio_patch"], expected[:, :, 2:].mean(axis=2), rtol=2e-5)


def test_swin_positions_are_tokens_and_later_stages_are_padded():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", **SWIN).eval()
    x = images(8, 64, seed=2)
    _, fields = run(model, x)
    names = [f"layers.{i}.blocks.0" for i in range(4)]
    expected = reference_ratios(model, names, x, swin_streams, maps=False)
    assert fields["residual_ratio"].shape == (4, 2, 256)  # 16 x 16 positions at stage 0, then 64, 16, 4
    assert (
        np.isnan(fields["residual_ratio"][1, :, 64:]).all() and np.isfinite(fields["residual_ratio"][1, :, :64]).all()
    )
    np.testing.assert_allclose(fields["residual_ratio"], expected, rtol=2e-5)
    assert np.isnan(fields["residual_ratio_cls"]).all()  # no class token
    np.testing.assert_allclose(fields["residual_ratio_patch"], np.nanmean(expected, axis=2), rtol=2e-5)


def test_timm_resnet_mixed_blocks_average_positions_into_one_token():
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("test_resnet"))  # BasicBlock and Bottleneck, with downsamples
    x = images(16, 32, seed=3)
    _, fields = run(model, x)
    names = ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    expected = reference_ratios(model, names, x, resnet_streams, maps=True)
    assert fields["residual_branches"] == ["branch"] and fields["residual_ratio"].shape == (4, 1, 1)
    np.testing.assert_allclose(fields["residual_ratio"], expected, rtol=2e-5)
    np.testing.assert_allclose(fields["residual_ratio_patch"], expected[:, :, 0], rtol=2e-5)
    assert np.isnan(fields["residual_ratio_cls"]).all()


def test_torchvision_resnet18_blocks():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18(num_classes=10))
    x = images(8, 32, seed=4)
    _, fields = run(model, x)
    names = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert fields["residual_blocks"] == names
    np.testing.assert_allclose(
        fields["residual_ratio"], reference_ratios(model, names, x, resnet_streams, True), rtol=2e-5
    )


def test_convnext_branch_is_output_minus_shortcut():
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("test_convnext"))
    x = images(8, 32, seed=5)
    _, fields = run(model, x)
    names = fields["residual_blocks"]
    streams = difference_streams(lambda block, x: block.shortcut(x))
    np.testing.assert_allclose(fields["residual_ratio"], reference_ratios(model, names, x, streams, True), rtol=1e-4)


def test_efficientnet_blocks_without_skip_are_left_out_silently():
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("efficientnet_b0", num_classes=10))
    x = images(8, 32, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # leaving out blocks without a skip is no reason to warn
        _, fields = run(model, x)
    modules = dict(model.named_modules())
    with_skip = [n for n in ProbedModel("model", model).layers if modules[n].has_skip]
    assert fields["residual_blocks"] == with_skip and len(with_skip) == 9
    assert len(fields["residual_skipped"]) == 7 and all("no skip" in s for s in fields["residual_skipped"])
    streams = difference_streams(lambda block, x: x)
    np.testing.assert_allclose(
        fields["residual_ratio"], reference_ratios(model, with_skip, x, streams, True), rtol=1e-4
    )


# --------------------------------------------------------------------------------------------- known answers


class Scaled(nn.Module):
    """An attention stand-in whose output is its input times ``factor``."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x, attn_mask=None, is_causal=False):
        return self.factor * x


def test_zeroed_mlp_branch_is_inf_and_scaled_attention_branch_is_exact():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32).eval()
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight.zero_()
        model.blocks[2].mlp.fc2.bias.zero_()
    model.blocks[4].norm1 = nn.Identity()
    model.blocks[4].attn = Scaled(4.0)  # branch = 4 x stream: ratio 1/4 at every token
    _, fields = run(model, images(16, 32, seed=7))
    ratio = fields["residual_ratio"]
    assert np.isposinf(ratio[2, 1]).all() and np.isposinf(fields["residual_ratio_patch"][2, 1])
    assert np.isfinite(np.delete(ratio.reshape(12, -1), 5, axis=0)).all()  # every other (block, branch) is finite
    np.testing.assert_allclose(ratio[4, 0], 0.25, rtol=1e-6)
    assert fields["residual_ratio_cls"][4, 0] == pytest.approx(0.25)


def test_torchvision_block_whose_branch_is_its_input_scaled():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    block = model.layer1[1]  # its input is post-ReLU (>= 0), so relu(conv1(x)) = x for identity convolutions
    with torch.no_grad():
        for conv in (block.conv1, block.conv2):
            nn.init.dirac_(conv.weight)
        for bn, scale in ((block.bn1, 1.0), (block.bn2, 0.5)):
            bn.weight.fill_(scale)
            bn.bias.zero_()
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    _, fields = run(model, images(8, 32, seed=8), layers=["layer1.1"])
    assert fields["residual_ratio"][0, 0, 0] == pytest.approx(2.0, rel=1e-5)  # ‖x‖ / ‖x / 2‖


def test_timm_resnet_zero_init_is_inf_and_figures_and_scalars_cope():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)  # zero_init_last: every branch is exactly 0 at init
    _, fields = run(model, images(8, 32, seed=9))
    assert np.isposinf(fields["residual_ratio"]).all()
    result = CKAResult(fields, analyses=ANALYSES)
    scalars = ResidualRatio().scalars(result, View())
    assert scalars["residual/zero_branches"] == 8.0 and np.isnan(scalars["residual/mean_ratio"])
    assert all(np.isposinf(v) for k, v in scalars.items() if k.startswith("residual/patch_ratio/"))
    (figure,) = ResidualRatio().figures(result, None, View())
    (curves,) = figure.panels  # one token per block: no heatmap
    assert isinstance(curves, Curves) and all(np.isnan(s.values).all() for s in curves.series)
    assert "8 branch(es) are exactly zero" in figure.caption
    draw_figure(figure)


# --------------------------------------------------------------------------------------------- contract


class Custom(Block):
    """A ViT block whose forward is its own: where its branches are is not known."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return x + self.mlp(self.norm2(x))


def test_unlocated_layers_get_one_warning_naming_them():
    model = timm.create_model("test_vit", img_size=32)
    layers = ["blocks.0.attn", "blocks.1", "blocks.2.mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an attention or MLP module among chosen layers is simply not a block
        engine = ProbeEngine([ProbedModel("model", model, layers)], [ResidualRatio()])
    parts = batches(images(8, 32))
    engine.run(parts, 1, torch.device("cpu"))
    fields = engine.compute()
    assert fields["residual_blocks"] == ["blocks.1"] and len(fields["residual_skipped"]) == 2
    # The model's own residual blocks whose branches cannot be located: one warning naming them all.
    model.blocks[0].__class__ = model.blocks[2].__class__ = Custom
    with pytest.warns(UserWarning, match=r"leave out 2 model layer\(s\).*blocks\.0 \(Custom overrides") as record:
        engine = ProbeEngine([ProbedModel("model", model)], [ResidualRatio()])
    assert len([w for w in record if "residual" in str(w.message)]) == 1
    assert "blocks.2 (Custom overrides" in str(record[0].message)
    engine.run(parts, 1, torch.device("cpu"))
    fields = engine.compute()
    assert fields["residual_blocks"] == [f"blocks.{i}" for i in (1, 3, 4, 5)] and len(fields["residual_skipped"]) == 2


def test_overridden_forward_is_not_recognized():
    model = timm.create_model("test_vit", img_size=32, block_fn=Custom, depth=2)
    with pytest.warns(UserWarning, match="overrides its forward"):
        engine = ProbeEngine([ProbedModel("model", model)], [ResidualRatio()])
    assert engine.analyses == []
    assert re.search(r"overrides its forward.*monitor the residual blocks", engine.skipped["residual"])


def test_a_model_without_residual_blocks_is_skipped_with_the_reason():
    model = timm.create_model("test_efficientnet")  # no block has a skip connection
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # blocks without a skip are not residual blocks: no reason to warn
        engine = ProbeEngine([ProbedModel("model", model)], [ResidualRatio()])
    assert engine.analyses == []
    assert re.search(r"no skip connection.*monitor the residual blocks", engine.skipped["residual"])
    assert ProbeEngine([ProbedModel("model", model)], [LayerCKA()]).skipped == {}  # not in the list: not bound
    assert "residual" in [a.name for a in default_analyses()]  # on by default where it applies


def test_reference_fields_get_the_prefix():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32)
    reference = randomize_norms(timm.create_model("test_resnet"))
    _, fields = run(model, images(16, 32, seed=10), reference=reference)
    assert fields["reference_residual_blocks"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert fields["reference_residual_ratio"].shape == (4, 1, 1) and fields["residual_ratio"].shape == (6, 2, 5)


def test_the_model_is_left_untouched():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    x = images(8, 32, seed=11)
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
    model = timm.create_model("test_vit", img_size=32)
    parts = batches(images(40, 32, seed=12))
    single = ProbeEngine([ProbedModel("model", model)], [ResidualRatio()])
    single.run(parts, len(parts), torch.device("cpu"))
    expected = single.compute()
    engines = [ProbeEngine([ProbedModel("model", model)], [ResidualRatio()]) for _ in range(2)]
    engines[0].run(parts[0::2], len(parts), torch.device("cpu"))
    engines[1].run(parts[1::2], len(parts), torch.device("cpu"))
    engines[0].analyses[0]._sums["model"].merge_state(engines[1].analyses[0]._sums["model"])
    got = engines[0].compute()
    for key in ("residual_ratio", "residual_ratio_cls", "residual_ratio_patch"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12)


# --------------------------------------------------------------------------------------------- figures, scalars


def test_figure_panels_hold_log10_with_inf_marked():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32).eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight.zero_()
        model.blocks[1].mlp.fc2.bias.zero_()
    _, fields = run(model, images(16, 32, seed=13))
    result = CKAResult(fields, analyses=ANALYSES)
    (figure,) = ResidualRatio().figures(result, None, View(run="r"))
    assert figure.tag == "residual/norm_ratio"
    attention, mlp, curves = figure.panels
    assert isinstance(attention, Heatmap) and "log10" in attention.colorbar
    np.testing.assert_allclose(attention.values, np.log10(fields["residual_ratio"][:, 0]))
    assert attention.cols[0] == "CLS" and attention.marked is None
    assert np.isnan(mlp.values[1]).all() and mlp.marked[1].all() and mlp.marked.sum() == 5
    assert [s.label for s in curves.series] == [
        "attention: CLS",
        "attention: patch tokens",
        "mlp: CLS",
        "mlp: patch tokens",
    ]
    np.testing.assert_allclose(curves.series[1].values, np.log10(fields["residual_ratio_patch"][:, 0]))
    assert np.isnan(curves.series[3].values[1])
    draw_figure(figure)
    scalars = ResidualRatio().scalars(result, View())
    assert np.isposinf(scalars["residual/patch_ratio/blocks.1"]) and scalars["residual/zero_branches"] == 1.0
    patch0 = fields["residual_ratio_patch"][0]
    assert scalars["residual/patch_ratio/blocks.0"] == pytest.approx(np.sqrt(patch0[0] * patch0[1]))
    cls, patch = fields["residual_ratio_cls"], fields["residual_ratio_patch"]
    with np.errstate(invalid="ignore"):
        excess = np.log10(cls[:3]) - np.log10(patch[:3])
    assert scalars["residual/cls_vs_patch_lower"] == pytest.approx(excess[np.isfinite(excess)].mean())


def test_scalars_and_figures_are_nan_safe():
    empty = CKAResult(layers=["a"], analyses=ANALYSES)
    assert ResidualRatio().scalars(empty, View()) == {} and ResidualRatio().figures(empty, None, View()) == []
    nan = CKAResult(
        layers=["a"],
        residual_blocks=["a"],
        residual_branches=["branch"],
        residual_ratio=np.full((1, 1, 1), np.nan),
        residual_ratio_cls=np.full((1, 1), np.nan),
        residual_ratio_patch=np.full((1, 1), np.nan),
        residual_prefix_tokens=np.zeros(1, dtype=np.int64),
        analyses=ANALYSES,
    )
    scalars = ResidualRatio().scalars(nan, View())
    assert np.isnan(scalars["residual/patch_ratio/a"]) and np.isnan(scalars["residual/mean_ratio"])
    for figure in ResidualRatio().figures(nan, None, View()):
        draw_figure(figure)

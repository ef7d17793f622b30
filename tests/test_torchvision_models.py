"""torchvision's ViT, Swin, ResNet, EfficientNet and ConvNeXt against what the models themselves compute:
``nn.MultiheadAttention(need_weights=True)``, the softmax inside Swin's shifted-window attention, the blocks' own
outputs, and loops over patches (tests/reference.py).
"""

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from attention_taps import randomize_position_bias, tapped
from torch import nn

from lightning_cka import compare_models
from lightning_cka.engine.models import ProbedModel
from lightning_cka.taps.attention import attention_sites
from lightning_cka.taps.attention_capture import head_outputs
from lightning_cka.taps.layers import named_modules
from lightning_cka.taps.residual import NO_SKIP, locate_branches, residual_sites

torchvision = pytest.importorskip("torchvision")
from torchvision.models import swin_transformer  # noqa: E402
from torchvision.models.convnext import CNBlockConfig  # noqa: E402


def vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    ).eval()


def swin(block=None):
    torch.manual_seed(0)
    kwargs = {} if block is None else {"block": block}
    model = swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=4, **kwargs
    ).eval()
    return randomize_position_bias(model)


def images(n=4, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def mha_weights(model, x):
    """Every nn.MultiheadAttention's per-head weights, asked of the module itself (need_weights=True)."""
    weights, handles = [], []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):

            def hook(mha, args, kwargs):
                _, w = nn.MultiheadAttention.forward(mha, *args[:3], need_weights=True, average_attn_weights=False)
                weights.append(w)

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return weights


def swin_softmax(model, x, monkeypatch):
    """The probabilities Swin's shifted-window attention computes: every 4-D softmax of its forward, in order."""
    found, real = [], F.softmax

    def spy(t, dim=None, **kwargs):
        out = real(t, dim=dim, **kwargs)
        if t.dim() == 4:
            found.append(out)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(F, "softmax", spy)
        with torch.no_grad():
            model(x)
    return found


# --------------------------------------------------------------------------------------------------- attention


def test_vit_probabilities_equal_need_weights_and_the_fast_path_stays(monkeypatch):
    model, x = vit(), images()
    calls = []
    real = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        plain = model(x)
    fast = len(calls)
    tap, got, out = tapped(model, x)
    assert fast == 2 and len(calls) == 4  # the probe's forward kept the fused kernel, block by block
    assert torch.equal(out, plain)
    expected = mha_weights(model, x)
    assert [s.kind for s in tap.sites] == ["torchvision_mha"] * 2 and not tap.skipped
    for g, e in zip(got, expected, strict=True):
        assert g.shape == (4, 2, 17, 17)
        assert (g - e).abs().max() <= 1e-6
    # Outside a probe no hook is left on the attention: training runs as if the monitor were not there.
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_vit_distances_are_those_of_a_loop_over_patches():
    model, x = vit(), images(8)
    result = compare_models(model, data=x, batch_size=4, analyses=["attention"])
    expected = [ref.mean_attention_distance(w.numpy(), (4, 4), 8, 1) for w in mha_weights(model, x)]
    np.testing.assert_allclose(result.mean_attention_distance, np.stack(expected), rtol=1e-5)


@pytest.mark.parametrize("size", [32, 64])
def test_swin_probabilities_equal_its_own_softmax(monkeypatch, size):
    model, x = swin(), images(size=size)
    tap, got, out = tapped(model, x)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    expected = swin_softmax(model, x, monkeypatch)
    assert len(got) == len(expected) == 4 and not tap.skipped
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert (g - e).abs().max() <= 1e-6


def test_swin_distances_are_measured_in_windows_and_padded_stages_are_left_out(monkeypatch):
    model, x = swin(), images(4)
    result = compare_models(model, data=x, batch_size=4, analyses=["attention"])
    weights = swin_softmax(model, x, monkeypatch)
    strides = [4, 4, 8, 8]
    expected = [ref.mean_attention_distance(w.numpy(), (4, 4), s, 0) for w, s in zip(weights, strides, strict=True)]
    np.testing.assert_allclose(result.mean_attention_distance, np.stack(expected), rtol=1e-5)
    # 48 px: the second stage's 6 x 6 grid needs padding to fit 4 x 4 windows; padded tokens have no place in the image.
    tap, got, _ = tapped(model, images(2, size=48))
    assert set(tap.skipped) == {s.name for s in tap.sites[2:]} and "padded" in next(iter(tap.skipped.values()))
    assert len(got) == 2


def test_swin_v2_attention_is_not_read():
    model = swin(swin_transformer.SwinTransformerBlockV2)
    assert attention_sites(named_modules(model)) == []


# ------------------------------------------------------------------------------------------------------ heads


def test_vit_heads_through_the_output_projection_give_the_attention_output():
    model = vit()
    mha = model.encoder.layers[0].self_attention
    site = attention_sites(named_modules(model))[0]
    with torch.no_grad():
        tokens = torch.randn(4, 17, 32)
        heads = head_outputs(site, mha, (tokens, tokens, tokens), {"need_weights": False})
        expected, _ = mha(tokens, tokens, tokens, need_weights=False)
    torch.testing.assert_close(F.linear(heads, mha.out_proj.weight, mha.out_proj.bias), expected, rtol=1e-5, atol=1e-6)


def test_swin_heads_through_the_projection_have_the_gram_of_the_attention_output():
    """The heads come out window by window; a Gram over all of an image's tokens does not depend on their order."""
    model = swin()
    attn = model.features[1][1].attn  # a shifted block
    site = attention_sites(named_modules(model))[1]
    with torch.no_grad():
        x = torch.randn(3, 8, 8, 16)
        heads = head_outputs(site, attn, (x,), {})  # (3, windows x tokens, 16)
        projected = F.linear(heads, attn.proj.weight, attn.proj.bias).reshape(3, -1).double()
        expected = attn(x).reshape(3, -1).double()
    torch.testing.assert_close(projected @ projected.T, expected @ expected.T, rtol=1e-4, atol=1e-4)


def test_heads_cka_runs_on_torchvision_attention_next_to_a_reference():
    model, x = vit(), images(8)
    result = compare_models(model, swin(), data=x, batch_size=4, analyses=["heads", "attention"])
    assert result.head_reference.shape == (2, 2, 4) and np.isfinite(result.head_reference).all()


# --------------------------------------------------------------------------------------------------- residual


MODELS = {
    "vit": (vit, 32),
    "swin": (swin, 32),
    "swin_v2": (lambda: swin(swin_transformer.SwinTransformerBlockV2), 32),
    "resnet": (lambda: torchvision.models.resnet18(num_classes=4).eval(), 64),
    "efficientnet": (lambda: torchvision.models.efficientnet_b0(num_classes=4).eval(), 64),
    "convnext": (
        lambda: torchvision.models.convnext.ConvNeXt(
            [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=4
        ).eval(),
        64,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_residual_branches_add_up_to_the_block_output(name):
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build()
    probed = ProbedModel("model", model)
    sites, skipped = residual_sites(probed)
    assert sites and all(why == NO_SKIP for why in skipped.values()), skipped
    if name == "efficientnet":  # the stride-2 / widening MBConv blocks have no skip connection
        assert {probed.modules[n].use_res_connect for n in skipped} == {False}
    seen, handles = {}, []

    def keep(key):
        def hook(module, args, output=None):
            seen[key] = (args[0] if output is None else output).detach().clone()  # clone: += comes after

        return hook

    for site in sites:
        handles.append(probed.modules[site.name].register_forward_hook(keep((site.name, "out"))))
        for branch in site.branches:
            for role, (module_name, side) in (("skip", branch.skip), ("branch", branch.branch)):
                module = probed.modules[module_name]
                hook = keep((site.name, branch.name, role))
                register = module.register_forward_pre_hook if side == "in" else module.register_forward_hook
                handles.append(register(hook))
    with torch.no_grad():
        model(images(2, size=size))
    for handle in handles:
        handle.remove()
    for site in sites:
        total = None
        for branch in site.branches:
            stream, added = seen[(site.name, branch.name, "skip")], seen[(site.name, branch.name, "branch")]
            if total is not None:
                torch.testing.assert_close(stream, total)
            total = stream + added
        if name == "resnet":
            total = torch.relu(total)
        torch.testing.assert_close(seen[(site.name, "out")], total)


def test_fused_mbconv_with_a_skip_is_a_residual_block():
    from torchvision.models.efficientnet import FusedMBConv, FusedMBConvConfig

    block = FusedMBConv(FusedMBConvConfig(2, 3, 1, 8, 8, 1), 0.1, nn.BatchNorm2d).eval()
    branches, maps = locate_branches("0", block)
    assert maps and [b.branch for b in branches] == [("0.stochastic_depth", "out")]
    x = torch.randn(2, 8, 8, 8)
    seen = {}
    block.stochastic_depth.register_forward_hook(lambda m, a, o: seen.__setitem__("branch", o.clone()))
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, x + seen["branch"])


def test_convnext_residual_ratio_is_the_mean_over_positions_and_images_of_channel_norm_ratios():
    build, size = MODELS["convnext"]
    torch.manual_seed(0)
    model, x = build(), images(8, size=size)
    result = compare_models(model, data=x, batch_size=4, analyses=["residual"])
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.convnext.CNBlock)]
    ratios, handles = {i: [] for i in range(len(blocks))}, []
    for i, block in enumerate(blocks):
        state = {}
        handles.append(block.register_forward_pre_hook(lambda m, a, s=state: s.__setitem__("in", a[0].norm(dim=1))))
        handles.append(
            block.stochastic_depth.register_forward_hook(
                lambda m, a, o, s=state, i=i: ratios[i].append((s["in"] / o.norm(dim=1)).flatten())
            )
        )
    with torch.no_grad():
        for batch in x.split(4):
            model(batch)
    for handle in handles:
        handle.remove()
    expected = [torch.cat(ratios[i]).double().mean().item() for i in range(len(blocks))]
    np.testing.assert_allclose(result.residual_ratio[:, 0, 0], expected, rtol=1e-5)

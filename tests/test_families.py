"""Real timm families beyond the test_* models, created without weights at small sizes: where bugs hid before."""

import warnings

import numpy as np
import pytest
import reference as ref
import timm
import torch

from lightning_cka import compare_models, find_layers
from lightning_cka.analyses import AttentionStats, EffectiveRank, LayerCKA, ResidualRatio

FAST = [LayerCKA(permutations=0), AttentionStats(), ResidualRatio(), EffectiveRank()]  # the defaults without a null


def mean_pairwise_distance(gh, gw, stride):
    coords = [(r, c) for r in range(gh) for c in range(gw)]
    return stride * np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords])


def block_outputs(model, names, inputs, reduce):
    """Manual hooks: each named module's reduced output, per minibatch (a list over minibatches of lists of layers)."""
    modules = dict(model.named_modules())
    out, current = [], {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: current.__setitem__(n, reduce(o))) for n in names]
    model.eval()
    with torch.no_grad():
        for batch in inputs.split(8):
            current.clear()
            model(batch)
            out.append([current[n].double().numpy() for n in names])
    for h in handles:
        h.remove()
    return out


def test_pit_blocks_are_all_found_and_pooled_stages_leave_attention_with_one_warning():
    model = timm.create_model("pit_ti_224", img_size=64, num_classes=4)
    layers = find_layers(model)
    assert len(layers) == 12 and layers[0] == "transformers.0.blocks.0" and layers[-1] == "transformers.2.blocks.3"
    with pytest.warns(UserWarning, match="attention left out") as record:
        result = compare_models(model, data=torch.randn(16, 3, 64, 64), batch_size=8, analyses=FAST)
    assert len([w for w in record if "attention left out" in str(w.message)]) == 1
    assert result.attention_layers == ["transformers.0.blocks.0.attn", "transformers.0.blocks.1.attn"]
    assert len(result.attention_skipped) == 10
    # Stage 0: a 7 x 7 grid of overlapping 16 px patches at a stride of 8 px.
    np.testing.assert_allclose(result.uniform_attention_distance, mean_pairwise_distance(7, 7, 8), rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "grid", "stride"), [("vit_tiny_r_s16_p8_224", 2, 32), ("vit_small_r26_s32_224", 2, 32)]
)
def test_hybrid_vits_measure_distances_in_input_pixels(name, grid, stride):
    model = timm.create_model(name, img_size=64, num_classes=4)
    result = compare_models(model, data=torch.randn(8, 3, 64, 64), batch_size=8, analyses=FAST)
    np.testing.assert_allclose(result.uniform_attention_distance, mean_pairwise_distance(grid, grid, stride))
    assert np.all(result.mean_attention_distance <= stride * np.sqrt(2) * (grid - 1) + 1e-6)


def test_dynamic_image_size_vits_use_the_grid_of_the_probe_images():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True, num_classes=4)
    result = compare_models(model, data=torch.randn(8, 3, 96, 64), batch_size=8, analyses=FAST)
    np.testing.assert_allclose(result.uniform_attention_distance, mean_pairwise_distance(6, 4, 16), rtol=1e-6)
    assert result.attention_skipped is None


def test_swin_mean_reduction_averages_over_positions_of_channels_last_maps():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, num_classes=4)
    names = find_layers(model)[:3]
    inputs = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = compare_models(
        model, data=inputs, layers_a=names, batch_size=8, reduction="mean", analyses=[LayerCKA(permutations=0)]
    )
    outputs = block_outputs(model, names, inputs, lambda o: o.mean(dim=(1, 2)))  # (B, H, W, C) -> (B, C)
    np.testing.assert_allclose(result.intra, ref.minibatch_cka(outputs, outputs), rtol=1e-4, atol=1e-6)


def test_cls_reduction_on_a_model_without_a_class_token_is_an_error():
    model = timm.create_model("vit_wee_patch16_reg1_gap_256", img_size=64, num_classes=4)
    with pytest.raises(ValueError, match=r"needs a class token, but layer 'blocks.0'"):
        compare_models(model, data=torch.randn(8, 3, 64, 64), batch_size=8, reduction="cls")


def test_deit_mean_reduction_leaves_both_prefix_tokens_out():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, num_classes=4)
    names = find_layers(model)[:3]
    inputs = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = compare_models(model, data=inputs, layers_a=names, batch_size=8, reduction="mean", analyses=FAST)
    outputs = block_outputs(model, names, inputs, lambda o: o[:, 2:].mean(dim=1))
    np.testing.assert_allclose(result.intra, ref.minibatch_cka(outputs, outputs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_cnn_families_probe_end_to_end_against_manual_hooks(name):
    model = timm.create_model(name, num_classes=4)
    names = find_layers(model)[:4]
    inputs = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # 4 minibatches: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer should be NaN or skipped
        result = compare_models(model, data=inputs, layers_a=names, batch_size=8, analyses=[*FAST[:1], *FAST[2:]])
    outputs = block_outputs(model, names, inputs, lambda o: o.reshape(o.shape[0], -1))
    np.testing.assert_allclose(result.intra, ref.minibatch_cka(outputs, outputs), rtol=1e-4, atol=1e-6)
    assert result.mean_attention_distance is None

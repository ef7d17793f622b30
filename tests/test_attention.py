import numpy as np
import pytest
import reference as ref
import timm
import torch
import torch.nn.functional as F
from attention_taps import Collect, tapped

from lightning_cka import MeanAttentionDistance, compare_models
from lightning_cka.analyses import AttentionStats
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.functional import mean_attention_distance, patch_distances
from lightning_cka.taps.attention import AttentionSite


def grid_mean_pairwise_distance(gh, gw, patch):
    coords = [(r, c) for r in range(gh) for c in range(gw)]
    return patch * np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords])


def manual_attention_maps(model, inputs):
    """Non-fused reference: switch timm's fused path off and read the softmax output going into attn_drop."""
    maps, handles = [], []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out.clone())))
    model.eval()
    with torch.no_grad():
        model(inputs)
    for h in handles:
        h.remove()
    for block in model.blocks:
        block.attn.fused_attn = True
    return maps


def tapped_attention_maps(model, inputs):
    _, maps, _ = tapped(model, inputs)
    assert len(maps) == len(model.blocks)
    return maps


@pytest.mark.parametrize("kwargs", [{}, {"qk_norm": True}, {"class_token": False, "global_pool": "avg"}])
def test_tapped_maps_equal_non_fused_manual_attention(kwargs):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", **kwargs)
    if kwargs.get("qk_norm"):  # make the norms do something
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.q_norm.weight, 1.0, 0.5)
            torch.nn.init.normal_(block.attn.k_norm.weight, 1.0, 0.5)
    assert all(b.attn.fused_attn for b in model.blocks)
    inputs = torch.randn(3, 3, 160, 160)
    expected = manual_attention_maps(model, inputs)
    got = tapped_attention_maps(model, inputs)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_the_forward_keeps_its_fused_kernel_during_the_probe(monkeypatch):
    model = timm.create_model("test_vit")
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    inputs = torch.randn(2, 3, 160, 160)
    model.eval()
    with torch.no_grad():
        plain = model(inputs)
    outputs = []
    probed = ProbedModel("model", model, call=lambda x: outputs.append(model(x)))
    engine = ProbeEngine([probed], [AttentionStats()])
    engine.run([ProbeBatch(0, 0, inputs)], 1, torch.device("cpu"))
    assert engine.failures == {}
    fields = engine.compute()
    assert len(calls) == 2 * len(model.blocks)
    assert torch.equal(plain, outputs[0])
    assert all(b.attn.fused_attn for b in model.blocks)
    assert fields["mean_attention_distance"].shape == (6, 2)


def test_tapped_maps_are_chunked_without_changing_them():
    model = timm.create_model("test_vit")
    inputs = torch.randn(40, 3, 160, 160)  # chunk = batch * head_dim // tokens = 40 * 32 // 101 = 12 images
    got = tapped_attention_maps(model, inputs)
    assert got[0].shape == (40, 2, 101, 101)
    torch.testing.assert_close(got[0], manual_attention_maps(model, inputs)[0], rtol=1e-5, atol=1e-6)


def test_attention_mask_is_respected():
    model = timm.create_model("test_vit")
    attn = model.blocks[0].attn
    x = torch.randn(2, 101, 64)
    mask = torch.rand(101, 101) > 0.3
    mask.fill_diagonal_(True)
    tap = Collect([AttentionSite("a", attn.num_heads, 1, (10, 10), (16.0, 16.0), "patch_embed")])
    handles = tap.hooks({"a": attn, "patch_embed": torch.nn.Identity()})
    with torch.no_grad():
        attn(x, attn_mask=mask)
    for h in handles:
        h.remove()
    got = torch.cat(tap.maps[0])
    assert torch.all(got[..., ~mask] == 0)
    attn.fused_attn = False
    captured = []
    h = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        attn(x, attn_mask=mask)
    h.remove()
    torch.testing.assert_close(got, captured[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("grid", "patch"), [((4, 4), 16), ((3, 5), 8)])
def test_uniform_attention_gives_the_mean_pairwise_patch_distance(grid, patch):
    num = grid[0] * grid[1]
    uniform = torch.full((2, 3, num, num), 1.0 / num)
    got = mean_attention_distance(uniform, grid, patch, num_prefix_tokens=0)
    np.testing.assert_allclose(got.numpy(), grid_mean_pairwise_distance(*grid, patch), rtol=1e-6)


def test_attention_to_self_gives_zero():
    eye = torch.eye(17).expand(2, 4, 17, 17)  # CLS + 4x4 patches
    assert torch.equal(mean_attention_distance(eye, 4, 16), torch.zeros(4, dtype=torch.float64))


def test_attention_to_one_fixed_neighbour_gives_exactly_its_distance():
    gh, gw, patch = 4, 5, 8
    attn = torch.zeros(1, 2, 1 + gh * gw, 1 + gh * gw)
    for q in range(gh * gw):
        r, c = divmod(q, gw)
        # head 0: the patch below (the one above on the last row); head 1: one row and one column away
        attn[0, 0, 1 + q, 1 + (r + 1 if r < gh - 1 else r - 1) * gw + c] = 1.0
        attn[0, 1, 1 + q, 1 + (r + 1 if r < gh - 1 else r - 1) * gw + (c + 1 if c < gw - 1 else c - 1)] = 1.0
    got = mean_attention_distance(attn, (gh, gw), patch)
    np.testing.assert_allclose(got.numpy(), [patch, patch * np.sqrt(2)], rtol=1e-6)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_random_attention_matches_the_loop_reference(rng, num_prefix):
    attn = torch.softmax(torch.randn(3, 2, num_prefix + 12, num_prefix + 12, generator=rng), dim=-1)
    got = mean_attention_distance(attn, (3, 4), 16, num_prefix_tokens=num_prefix)
    np.testing.assert_allclose(
        got.numpy(), ref.mean_attention_distance(attn.numpy(), (3, 4), 16, num_prefix), rtol=1e-5
    )


def test_prefix_weight_counts_as_distance_zero_unless_renormalized():
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 1:, 0] = 0.5  # half of every patch query's attention goes to CLS
    attn[0, 0, 1:, 1:] = 0.125
    plain = mean_attention_distance(attn, 2, 16)
    renormalized = mean_attention_distance(attn, 2, 16, renormalize=True)
    np.testing.assert_allclose(renormalized.numpy(), 2 * plain.numpy())
    np.testing.assert_allclose(renormalized.numpy(), grid_mean_pairwise_distance(2, 2, 16))


def test_mismatched_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="1 prefix tokens \\+ 16 patches"):
        mean_attention_distance(torch.ones(1, 1, 10, 10) / 10, 4, 16)
    with pytest.raises(ValueError, match="grid_size"):
        patch_distances(0, 16)


def test_metric_averages_over_all_images_of_all_minibatches(rng):
    metric = MeanAttentionDistance(num_layers=2, num_heads=3, grid_size=(3, 4), patch_size=16)
    chunks = [torch.softmax(torch.randn(b, 3, 13, 13, generator=rng), -1) for b in (2, 5)]
    for c in chunks:
        metric.update(c, layer=1)
    metric.update(chunks[0][:, :2], layer=0)  # a layer with fewer heads
    out = metric.compute()
    everything = torch.cat(chunks)
    np.testing.assert_allclose(
        out[1].numpy(), ref.mean_attention_distance(everything.numpy(), (3, 4), 16, 1), rtol=1e-5
    )
    assert torch.isnan(out[0, 2]) and not torch.isnan(out[0, :2]).any()
    with pytest.raises(IndexError):
        metric.update(chunks[0], layer=2)


def test_the_probe_takes_geometry_from_the_model():
    model = timm.create_model("test_vit")
    engine = ProbeEngine([ProbedModel("model", model)], [AttentionStats()])
    engine.run([ProbeBatch(0, 0, torch.randn(4, 3, 160, 160))], 1, torch.device("cpu"))
    assert engine.failures == {}
    fields = engine.compute()
    names = [f"blocks.{i}.attn" for i in range(6)]
    assert fields["attention_layers"] == names
    (tap,) = engine.taps["model"]
    assert [site.name for site in tap.sites] == names
    assert all(site.num_prefix_tokens == 1 and site.stride == (16.0, 16.0) for site in tap.sites)
    assert tap.measured_grids == dict.fromkeys(names, (10, 10))
    distances = tap.distances(tap.sites[0], (10, 10), torch.device("cpu"))
    assert distances.shape == (100, 100)
    assert torch.isclose(distances[0, 1], torch.tensor(16.0, dtype=distances.dtype))
    assert fields["uniform_attention_distance"] == pytest.approx(grid_mean_pairwise_distance(10, 10, 16))
    out = fields["mean_attention_distance"]
    assert out.shape == (6, 2) and np.all((out > 0) & (out < 160 * np.sqrt(2)))


def test_attention_entropy_matches_the_textbook_formula_on_manual_maps():
    torch.manual_seed(0)
    model = timm.create_model("test_vit")
    inputs = torch.randn(6, 3, 160, 160)
    maps = [m.double().numpy() for m in manual_attention_maps(model, inputs)]  # (B, H, T, T) per layer
    expected = [(-(m * np.log(np.where(m > 0, m, 1.0))).sum(-1)).mean(axis=(0, 2)) for m in maps]  # per head
    result = compare_models(model, data=inputs, batch_size=6, analyses=[AttentionStats()])
    np.testing.assert_allclose(result.attention_entropy, np.stack(expected), rtol=1e-5)
    assert np.all(result.attention_entropy <= np.log(101) + 1e-6)  # at most uniform attention over 101 tokens

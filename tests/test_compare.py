import numpy as np
import pytest
import reference as ref
import timm
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_cka import CKAResult, compare_models, find_layers
from lightning_cka.functional import patch_distances
from lightning_cka.taps.attention import patch_geometry


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return timm.create_model("test_vit"), timm.create_model("test_resnet")


@pytest.fixture(scope="module")
def images():
    return torch.randn(20, 3, 160, 160, generator=torch.Generator().manual_seed(3))


def stored_batches(model, images, batch_size):
    """Per minibatch, the full stored outputs of each auto layer (reference path)."""
    names = find_layers(model)
    modules = dict(model.named_modules())
    out = []
    model.eval()
    for start in range(0, images.shape[0], batch_size):
        store = {}
        handles = [
            modules[n].register_forward_hook(lambda m, a, o, n=n, store=store: store.__setitem__(n, o)) for n in names
        ]
        with torch.no_grad():
            model(images[start : start + batch_size])
        for h in handles:
            h.remove()
        out.append([store[n].to(torch.float64).numpy() for n in names])
    return out


def test_matches_the_minibatch_reference_over_all_minibatches(models, images):
    vit, resnet = models
    result = compare_models(vit, resnet, data=images, batch_size=8)  # minibatches of 8, 8 and 4 images
    batches_a, batches_b = stored_batches(vit, images, 8), stored_batches(resnet, images, 8)
    np.testing.assert_allclose(result.intra, ref.minibatch_cka(batches_a, batches_a), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.reference, ref.minibatch_cka(batches_a, batches_b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.reference_intra, ref.minibatch_cka(batches_b, batches_b), rtol=1e-4, atol=1e-5)
    last_only = ref.minibatch_cka(batches_a[-1:], batches_b[-1:])
    assert np.abs(result.reference - last_only).max() > 1e-3  # not the "last minibatch wins" bug
    assert result.num_examples == 20
    assert result.layers == find_layers(vit) and result.reference_layers == find_layers(resnet)
    assert result.mean_attention_distance.shape == (6, 2) and result.reference_mean_attention_distance.size == 0


def test_tokens_are_compared_across_images_not_as_per_image_token_grams(models, images):
    vit, _ = models
    result = compare_models(vit, data=images[:8], layers_a=["blocks.0", "blocks.5"], batch_size=8)
    (outputs,) = stored_batches(vit, images[:8], 8)
    flat = ref.cka_matrix([outputs[0]], [outputs[-1]], unbiased=True)[0, 0]  # (n, T*D) across images
    assert result.intra[0, 1] == pytest.approx(flat, rel=1e-4)


class DictDataset(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i}


def test_tensor_dataset_and_dataloader_inputs_agree(models, images):
    vit, resnet = models
    from_tensor = compare_models(vit, resnet, data=images, batch_size=10, attention=False)
    from_dataset = compare_models(vit, resnet, data=TensorDataset(images, torch.zeros(20)), batch_size=10)
    from_loader = compare_models(vit, resnet, data=DataLoader(DictDataset(images), batch_size=10))
    for other in (from_dataset, from_loader):
        np.testing.assert_allclose(other.intra, from_tensor.intra, rtol=1e-6)
        np.testing.assert_allclose(other.reference, from_tensor.reference, rtol=1e-6)


def test_small_last_minibatches_are_merged_or_skipped(models, images):
    vit, _ = models
    merged = compare_models(vit, data=images[:18], batch_size=8, attention=False)  # 8 + 10: the 2 join the last 8
    assert merged.num_examples == 18
    with pytest.warns(UserWarning, match="skipped a minibatch of 2 examples"):
        skipped = compare_models(vit, data=DataLoader(TensorDataset(images[:18]), batch_size=8), attention=False)
    assert skipped.num_examples == 16
    with pytest.raises(ValueError, match="at least 4"):
        compare_models(vit, data=images, batch_size=3)


def test_save_load_roundtrip_and_plot(models, images, tmp_path):
    vit, resnet = models
    result = compare_models(vit, resnet, data=images[:8], batch_size=8)
    path = result.save(tmp_path / "sub" / "result.npz")
    loaded = CKAResult.load(path)
    assert loaded.layers == result.layers and loaded.reference_layers == result.reference_layers
    assert loaded.attention_layers == result.attention_layers
    for field in ("intra", "reference", "reference_intra", "mean_attention_distance"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(result, field))
    assert loaded.step == -1 and loaded.num_examples == 8
    geometry = patch_geometry(vit)
    uniform = patch_distances(geometry.grid_size, geometry.patch_size).mean().item()
    assert loaded.uniform_attention_distance == pytest.approx(uniform)  # the scale of "local" heads travels along
    assert np.isnan(loaded.reference_uniform_attention_distance)  # the ResNet has no attention
    with np.load(path, allow_pickle=False) as raw:  # plain arrays, no pickle needed
        assert raw["layers"].dtype.kind == "U"
    fig = loaded.plot()
    assert len(fig.axes) >= 4  # three heatmaps (+ colour bars) and the distance plot


def test_load_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a lightning-cka array file"):
        CKAResult.load(tmp_path / "x.npz")

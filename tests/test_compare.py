import warnings

import numpy as np
import pytest
import reference as ref
import timm
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_cka import CKAResult, compare_models, find_layers
from lightning_cka.analyses import EffectiveRank, HeadCKA, LayerCKA, Localization, ResidualRatio
from lightning_cka.functional import patch_distances


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return timm.create_model("test_vit"), timm.create_model("test_resnet")


def without_attention(reference=False):
    """What attention=False ran: the default analyses but attention (heads only apply next to a reference)."""
    return [LayerCKA(), *([HeadCKA()] if reference else []), ResidualRatio(), EffectiveRank()]


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
    assert result.mean_attention_distance.shape == (6, 2) and result.reference_mean_attention_distance is None


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
    from_tensor = compare_models(vit, resnet, data=images, batch_size=10, analyses=without_attention(reference=True))
    from_dataset = compare_models(vit, resnet, data=TensorDataset(images, torch.zeros(20)), batch_size=10)
    from_loader = compare_models(vit, resnet, data=DataLoader(DictDataset(images), batch_size=10))
    for other in (from_dataset, from_loader):
        np.testing.assert_allclose(other.intra, from_tensor.intra, rtol=1e-6)
        np.testing.assert_allclose(other.reference, from_tensor.reference, rtol=1e-6)


def test_small_last_minibatches_are_merged_or_skipped(models, images):
    vit, _ = models
    merged = compare_models(
        vit, data=images[:18], batch_size=8, analyses=without_attention()
    )  # 8 + 10: the 2 join the last 8
    assert merged.num_examples == 18
    with pytest.warns(UserWarning, match="skipped a minibatch of 2 examples"):
        loader = DataLoader(TensorDataset(images[:18]), batch_size=8)
        skipped = compare_models(vit, data=loader, analyses=without_attention())
    assert skipped.num_examples == 16
    with pytest.raises(ValueError, match="batch_size must be an int >= 4"):
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
    uniform = patch_distances((10, 10), 16).mean().item()  # test_vit: 160 px images in 16 px patches
    assert loaded.uniform_attention_distance == pytest.approx(uniform)  # the scale of "local" heads travels along
    assert loaded.reference_uniform_attention_distance is None  # the ResNet has no attention
    with np.load(path, allow_pickle=False) as raw:  # plain arrays, no pickle needed
        assert raw["layers"].dtype.kind == "U"
    fig = loaded.plot()
    assert len(fig.axes) >= 4  # three heatmaps (+ colour bars) and the distance plot


def test_load_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a lightning-cka probe file"):
        CKAResult.load(tmp_path / "x.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot be read.*cut short"):
        CKAResult.load(tmp_path / "empty.npz")
    np.savez(tmp_path / "future.npz", layers=np.array(["a"]), intra=np.eye(1), format_version=np.array(99))
    with pytest.raises(ValueError, match="newer lightning-cka"):
        CKAResult.load(tmp_path / "future.npz")


def test_files_of_version_one_still_load(tmp_path):
    """lightning-cka 0.1 wrote every field, absent ones as empty arrays or NaN."""
    np.savez(
        tmp_path / "step_0000010.npz",
        layers=np.array(["blocks.0", "blocks.1"]),
        intra=np.array([[1.0, 0.5], [0.5, 1.0]]),
        reference_layers=np.array([], dtype=str),
        reference=np.zeros((0, 0)),
        reference_intra=np.zeros((0, 0)),
        previous=np.zeros((0, 0)),
        attention_layers=np.array(["blocks.0.attn"]),
        mean_attention_distance=np.array([[3.0, 9.0]]),
        reference_attention_layers=np.array([], dtype=str),
        reference_mean_attention_distance=np.zeros((0, 0)),
        uniform_attention_distance=np.array(16.5),
        reference_uniform_attention_distance=np.array(np.nan),
        step=np.array(10),
        epoch=np.array(1),
        num_examples=np.array(64),
    )
    result = CKAResult.load(tmp_path / "step_0000010.npz")
    assert result.step == 10 and result.epoch == 1 and result.num_examples == 64
    assert result.reference is None and result.previous is None and result.reference_layers is None
    assert result.uniform_attention_distance == 16.5 and result.reference_uniform_attention_distance is None
    assert result.intra_se is None and result.probe_hash is None
    assert [f.tag for f in result.figures()] == ["cka/intra", "attention/mean_distance"]


def test_a_failed_write_leaves_no_file_under_the_final_name(models, images, tmp_path, monkeypatch):
    vit, _ = models
    result = compare_models(vit, data=images[:8], batch_size=8, analyses=without_attention())
    path = result.save(tmp_path / "step_0000001.npz")
    before = path.read_bytes()

    def killed(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as a kill mid-write would stop it

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        result.save(path)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "step_0000002.npz")
    assert path.read_bytes() == before  # the earlier, complete file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001.npz"]  # nothing half-written is left


def test_unknown_fields_are_an_error_that_names_them():
    with pytest.raises(TypeError, match=r"no field.*'intar'"):
        CKAResult(layers=["a"], intar=np.eye(1))


def test_compare_models_errors_name_the_fix(models):
    vit, _ = models
    data = torch.randn(8, 3, 160, 160)
    with pytest.raises(ValueError, match="permutations"):
        compare_models(vit, data=data, analyses=[LayerCKA(permutations=-1)])
    with pytest.raises(ValueError, match="minibatch_weights"):
        compare_models(vit, data=data, analyses=[LayerCKA(minibatch_weights="rows")])
    with pytest.raises(ValueError, match="no analysis is called 'nope'"):
        compare_models(vit, data=data, analyses=["cka", "nope"])
    with pytest.raises(ValueError, match="cka given more than once"):
        compare_models(vit, data=data, analyses=["cka", LayerCKA(permutations=0)])
    with pytest.raises(ValueError, match="batch_size"):
        compare_models(vit, data=data, batch_size=3)


def test_named_analyses_that_do_not_apply_or_fail_are_left_out_with_a_warning(models, images):
    vit, _ = models
    analyses = [LayerCKA(permutations=0), "heads", Localization(layer="head", permutations=0)]
    with pytest.warns(UserWarning) as record:
        result = compare_models(vit, data=images[:8], batch_size=8, analyses=analyses)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("compare_models: the heads analysis is left out: ") and "reference" in m for m in messages)
    assert any(
        m.startswith("compare_models: the localization analysis failed (") and "no positions" in m for m in messages
    )
    assert [a.name for a in result.analyses] == ["cka"]
    assert result.intra.shape == (6, 6) and "head_reference" not in result and "localization" not in result
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defaults that do not apply (heads without a reference) are left out quietly
        result = compare_models(vit, data=images[:16])  # the default batch size: 4 minibatches of 4, no warning
    assert [a.name for a in result.analyses] == ["cka", "attention", "residual", "rank"]


def test_the_default_batch_size_gives_8_or_9_minibatches_up_to_256_images_each():
    from lightning_cka.compare import default_batch_size
    from lightning_cka.probe_data.batches import minibatch_slices

    for n in (16, 20, 31, 32, 100, 256, 257, 1000, 2047, 2048, 5000):
        size = default_batch_size(n)
        count = len(minibatch_slices(n, size))
        assert 4 <= size <= 256
        if n >= 32:  # the data allow 8 minibatches of at least 4
            assert count >= 8 and (size == 256 or count <= 9), (n, size, count)  # as large as 8 minibatches allow
        else:
            assert size == 4 and count >= 4
    assert default_batch_size(256) == 32 and default_batch_size(5000) == 256


def test_default_batch_size_is_used_and_recorded_and_few_minibatches_warn(models, images):
    import json

    vit, _ = models
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compare_models(vit, data=images, analyses=[LayerCKA(permutations=0)])
    assert result.num_minibatches == 5 and json.loads(result.settings)["batch_size"] == 4  # 20 // 8 -> 4
    with pytest.warns(
        UserWarning,
        match=r"2 minibatch\(es\).*1 degree\(s\) of freedom.*± 12\.7 se.*use batch_size "
        r"<= N/4 \(here <= 4\)",
    ):
        few = compare_models(vit, data=images[:16], batch_size=8, analyses=[LayerCKA(permutations=0)])
    assert few.num_minibatches == 2
    loader = DataLoader(TensorDataset(images[:16]), batch_size=16)
    with pytest.warns(
        UserWarning, match="1 minibatch\\(es\\), so it has no standard errors at all; use the DataLoader"
    ):
        compare_models(vit, data=loader, analyses=[LayerCKA(permutations=0)])

"""Hugging Face transformers vision models, built from small random configs (no weights), against what the models
themselves report: ``output_attentions=True`` under eager attention, ``output_hidden_states=True``, and loops over
pixels, windows and images (tests/reference.py).

Runs with the installed major version of transformers (4.x names the blocks ``encoder.layer.N`` and the attention
``attention.attention`` with ``query`` / ``key``; 5.x ``layers.N`` and ``attention`` with ``q_proj`` / ``k_proj``).
"""

import ast
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from attention_taps import randomize_position_bias, tapped
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_cka import compare_models, find_layers
from lightning_cka.engine.models import ProbedModel
from lightning_cka.taps.attention import attention_sites
from lightning_cka.taps.base import TapSet
from lightning_cka.taps.grams import token_layout
from lightning_cka.taps.heads import HeadGrams, head_dim
from lightning_cka.taps.layers import named_modules
from lightning_cka.taps.residual import residual_sites

transformers = pytest.importorskip("transformers")
MAJOR = int(transformers.__version__.split(".")[0])

VIT = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_labels": 4,
}
SWIN = {
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [2, 2],
    "num_heads": [2, 2],
    "window_size": 4,
    "num_labels": 4,
}
FAMILIES = {
    "vit": ("ViTForImageClassification", "ViTConfig", VIT),
    "deit": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", VIT),
    "dinov2": (
        "Dinov2WithRegistersForImageClassification",
        "Dinov2WithRegistersConfig",
        {**VIT, "num_register_tokens": 3},
    ),
    "swin": ("SwinForImageClassification", "SwinConfig", SWIN),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        {"hidden_sizes": [8, 16], "depths": [1, 2], "num_stages": 2, "num_labels": 4},
    ),
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 2], "layer_type": "basic", "num_labels": 4},
    ),
}
ATTENTION = ("vit", "deit", "dinov2", "swin")
PREFIX = {"vit": 1, "deit": 2, "dinov2": 4, "swin": 0, "convnext": 0, "resnet": 0}  # CLS, distillation, registers


def build(family, attn_implementation=None, seed=0):
    model_cls, config_cls, config = FAMILIES[family]
    if attn_implementation is not None:
        config = {**config, "attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    return randomize_position_bias(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval())


def images(n=8, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def eager_weights(model, sites, x):
    """Each attention module's own weights under eager attention with output_attentions=True (and the output)."""
    modules, weights, handles = named_modules(model), {}, []
    for i, site in enumerate(sites):
        hook = lambda m, a, out, i=i: weights.__setitem__(i, out[1].detach().clone())  # noqa: E731
        handles.append(modules[site.name].register_forward_hook(hook))
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
    for handle in handles:
        handle.remove()
    return [weights[i] for i in range(len(sites))], out


# ------------------------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_layers_are_the_encoder_blocks_and_their_outputs_the_hidden_states(family):
    model = build(family)
    names = find_layers(model)
    modules = dict(model.named_modules())
    outputs = {}
    handles = [
        modules[n].register_forward_hook(
            lambda m, a, o, n=n: outputs.__setitem__(n, o if torch.is_tensor(o) else o[0])  # Swin: (hidden, weights)
        )
        for n in names
    ]
    with torch.no_grad():
        out = model(pixel_values=images(2), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    hidden = out.hidden_states
    if family in ("vit", "deit", "dinov2"):  # one hidden state per block, after the embeddings
        assert len(names) == len(hidden) - 1 == 2
        for name, state in zip(names, hidden[1:], strict=True):
            torch.testing.assert_close(outputs[name], state, rtol=0, atol=0)
    elif family in ("convnext", "resnet"):  # one per stage: the last block of each stage
        assert len(names) == 3
        stage_ends = [names[0], names[2]]
        for name, state in zip(stage_ends, hidden[1:], strict=True):
            torch.testing.assert_close(outputs[name], state, rtol=0, atol=0)
        assert names[2].endswith("stages.1.layers.1")
    else:  # Swin: stage outputs are merged after the last block; the blocks are encoder.layers.s.blocks.j
        assert [n.split("encoder.")[1] for n in names] == [f"layers.{s}.blocks.{j}" for s in (0, 1) for j in (0, 1)]
        assert outputs[names[0]].shape == (2, 64, 16)
    expected = "layers." if MAJOR >= 5 else "encoder.layer."
    if family in ("vit", "deit"):
        assert names[0] == f"{family}.{expected}0"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_layouts_count_class_distillation_and_register_tokens(family):
    """The prefix tokens are where the model puts its tokens: planted token vectors come out at those positions."""
    model = build(family)
    modules = named_modules(model)
    names = find_layers(model)
    layouts = [token_layout(modules, name) for name in names]
    assert {(layout.num_prefix_tokens, layout.has_class_token) for layout in layouts} == {
        (PREFIX[family], PREFIX[family] > 0)
    }
    embeddings = getattr(getattr(model, model.base_model_prefix), "embeddings", None)
    if PREFIX[family]:
        planted = [embeddings.cls_token]
        planted += [embeddings.distillation_token] if family == "deit" else []
        planted += [embeddings.register_tokens] if family == "dinov2" else []
        with torch.no_grad():
            for param in planted:
                param.copy_(torch.randn_like(param) * 1000)
            rows = torch.cat([p.reshape(-1, p.shape[-1]) for p in planted])
            first = model.get_submodule(names[0])
            seen = {}
            handle = first.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
            model(images(1))
            handle.remove()
        tokens = seen["x"][0]  # the input of the first block: the embeddings' output
        similar = F.cosine_similarity(tokens[:, None], rows[None], dim=-1) > 0.99  # (T, planted)
        assert similar[: PREFIX[family]].diagonal().all() and not similar[PREFIX[family] :].any()


# --------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("family", ATTENTION)
def test_attention_probabilities_equal_output_attentions_under_eager(family):
    model = build(family, "eager")
    x = images(3)
    tap, got, _ = tapped(model, x)
    expected, out = eager_weights(model, tap.sites, x)
    assert len(tap.sites) == 2 if family != "swin" else 4
    assert not tap.skipped
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert (g - e).abs().max() <= 1e-6
    if family != "swin":  # the model's own output_attentions hold the same weights, layer by layer
        for g, e in zip(got, out.attentions, strict=True):
            assert (g - e).abs().max() <= 1e-6
    else:  # Swin reports the last block of each stage
        for g, e in zip((got[1], got[3]), out.attentions, strict=True):
            assert (g - e).abs().max() <= 1e-6


@pytest.mark.parametrize("family", ATTENTION)
def test_under_the_default_implementation_the_probe_changes_nothing_and_reads_the_same_probabilities(family):
    model = build(family)  # the implementation transformers picks (SDPA where the model supports it)
    x = images(3)
    with torch.no_grad():
        plain = model(x).logits
    tap, got, out = tapped(model, x)
    assert torch.equal(out.logits, plain)  # bit-identical: nothing the model computes changed
    eager = build(family, "eager")
    expected, _ = eager_weights(eager, tap.sites, x)
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max() <= 1e-6


def test_attention_distances_are_those_of_a_loop_over_patches():
    model = build("deit", "eager")
    x = images(8)
    result = compare_models(model, data=x, batch_size=4, analyses=["attention"])
    with torch.no_grad():
        attentions = model(pixel_values=x, output_attentions=True).attentions
    expected = [ref.mean_attention_distance(a.numpy(), (4, 4), 8, 2) for a in attentions]
    np.testing.assert_allclose(result.mean_attention_distance, np.stack(expected), rtol=1e-5)
    assert result.uniform_attention_distance == pytest.approx(8 * ref_grid_mean((4, 4)))


def ref_grid_mean(grid):
    coords = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    return np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords])


def test_swin_distances_are_measured_in_each_window_at_the_stride_of_its_stage():
    model = build("swin", "eager")
    x = images(4)
    result = compare_models(model, data=x, batch_size=4, analyses=["attention"])
    sites = attention_sites(named_modules(model))
    weights, _ = eager_weights(model, sites, x)  # (images x windows, H, 16, 16)
    strides = [4, 4, 8, 8]  # patch 4, then 2x downsampling
    expected = [ref.mean_attention_distance(w.numpy(), (4, 4), s, 0) for w, s in zip(weights, strides, strict=True)]
    np.testing.assert_allclose(result.mean_attention_distance, np.stack(expected), rtol=1e-5)
    # The shifted blocks mask tokens from other regions: their heads attend to fewer, closer tokens.
    assert result.mean_attention_distance[1].mean() < result.mean_attention_distance[0].mean()


def test_dinov2_distances_use_the_grid_of_the_images_it_interpolates_to():
    model = build("dinov2", "eager")
    x = images(4, size=48)  # 6 x 6 patches of 8 px; the config says 32 px
    result = compare_models(model, data=x, batch_size=4, analyses=["attention", "localization"])
    with torch.no_grad():
        attentions = model(pixel_values=x, output_attentions=True).attentions
    expected = [ref.mean_attention_distance(a.numpy(), (6, 6), 8, 4) for a in attentions]
    np.testing.assert_allclose(result.mean_attention_distance, np.stack(expected), rtol=1e-5)
    assert result.uniform_attention_distance == pytest.approx(8 * ref_grid_mean((6, 6)))
    assert tuple(result.localization_grid) == (6, 6)


# ------------------------------------------------------------------------------------------------------ grams


def block_features(model, names, batches):
    modules, current, out = dict(model.named_modules()), {}, []
    handles = [
        modules[n].register_forward_hook(
            lambda m, a, o, n=n: current.__setitem__(n, (o if torch.is_tensor(o) else o[0]).detach().clone())
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
            out.append([current[n].reshape(batch.shape[0], -1).double().numpy() for n in names])
    for handle in handles:
        handle.remove()
    return out


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_layer_cka_is_that_of_the_hidden_states(family):
    model = build(family)
    x = images(16)
    result = compare_models(model, data=x, batch_size=8, analyses=["cka"])
    hidden = []
    with torch.no_grad():
        for batch in x.split(8):
            states = model(pixel_values=batch, output_hidden_states=True).hidden_states[1:]
            hidden.append([s.reshape(batch.shape[0], -1).double().numpy() for s in states])
    np.testing.assert_allclose(result.intra, ref.minibatch_cka(hidden, hidden), rtol=1e-5, atol=1e-6)


def test_a_layer_returning_a_model_output_is_read_at_its_hidden_state():
    """The encoder returns a BaseModelOutput (a mapping): its first tensor is the last block's output."""
    model = build("dinov2")
    encoder = next(name for name, m in model.named_modules() if name.endswith("encoder"))
    last = find_layers(model)[-1]
    seen = []
    handle = model.get_submodule(encoder).register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(images(2))
    handle.remove()
    assert isinstance(seen[0], dict) and not torch.is_tensor(seen[0])  # a ModelOutput is an OrderedDict
    result = compare_models(model, data=images(16), batch_size=8, layers_a=[last, encoder], analyses=["cka"])
    np.testing.assert_allclose(result.intra, np.ones((2, 2)), rtol=1e-6)


def test_compare_models_on_two_hf_models_and_an_hf_reference():
    vit, swin = build("vit"), build("swin")
    x = images(16)
    result = compare_models(vit, swin, data=x, batch_size=8, analyses=["cka", "heads", "attention"])
    a = block_features(vit, find_layers(vit), x.split(8))
    b = block_features(swin, find_layers(swin), x.split(8))
    np.testing.assert_allclose(result.reference, ref.minibatch_cka(a, b), rtol=1e-4, atol=1e-5)
    assert result.head_reference.shape == (2, 2, 4)
    assert result.reference_mean_attention_distance.shape == (4, 2)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_head_grams_are_those_of_attention_times_values(family):
    """Each head's output, formed independently as (eager weights) @ v from the value projection's output."""
    model = build(family, "eager")
    modules = named_modules(model)
    sites = attention_sites(modules)
    x = images(4)
    values, handles = {}, []
    for i, site in enumerate(sites):
        attention = modules[site.name]
        v = getattr(attention, "v_proj", None) or attention.value
        handles.append(v.register_forward_hook(lambda m, a, o, i=i: values.__setitem__(i, o.detach().clone())))
    weights, _ = eager_weights(model, sites, x)
    for handle in handles:
        handle.remove()
    dims = [head_dim(modules, site) for site in sites]
    layouts = [token_layout(modules, site.name) for site in sites]
    tap = HeadGrams(sites, dims, "flatten", layouts)
    with TapSet(model, modules, [tap]):
        tap.begin(x)
        model(x)
        grams = tap.collect()
    for i, site in enumerate(sites):
        v = values[i].unflatten(-1, (site.num_heads, dims[i])).transpose(1, 2)  # (B', H, T, d)
        heads = weights[i] @ v  # (B', H, T, d)
        for h in range(site.num_heads):
            features = heads[:, h].reshape(x.shape[0], -1).double().numpy()  # Swin: the windows of each image
            features = features - features.mean(axis=0)
            np.testing.assert_allclose(grams[i][h].double().numpy(), features @ features.T, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------------- residual


@pytest.mark.parametrize("family", list(FAMILIES))
def test_residual_branches_add_up_to_the_block_output(family):
    """Where the package says a block's stream and branches are, stream + branch is what the block computes."""
    model = build(family)
    probed = ProbedModel("model", model)
    sites, skipped = residual_sites(probed)
    assert len(sites) == len(probed.layers) and not skipped
    seen, handles = {}, []

    def keep(key):
        def hook(module, args, output=None):
            value = args[0] if output is None else output
            seen[key] = (value if torch.is_tensor(value) else value[0]).detach().clone()  # clone: += comes after

        return hook

    for site in sites:
        handles.append(probed.modules[site.name].register_forward_hook(keep((site.name, "out"))))
        for branch in site.branches:
            for role, (name, side) in (("skip", branch.skip), ("branch", branch.branch)):
                module = probed.modules[name]
                key = (site.name, branch.name, role)
                if side == "in":
                    handles.append(module.register_forward_pre_hook(keep(key)))
                else:
                    handles.append(module.register_forward_hook(keep(key)))
    with torch.no_grad():
        model(images(2, size=64 if family in ("convnext", "resnet") else 32))
    for handle in handles:
        handle.remove()
    for site in sites:
        total = None
        for branch in site.branches:
            stream, added = seen[(site.name, branch.name, "skip")], seen[(site.name, branch.name, "branch")]
            if total is not None:  # the second branch's stream is the first one's sum
                torch.testing.assert_close(stream, total, rtol=1e-5, atol=1e-5)
            total = stream + added.reshape(stream.shape)
        if family == "resnet":
            total = torch.relu(total)
        torch.testing.assert_close(seen[(site.name, "out")], total.reshape(seen[(site.name, "out")].shape))


def test_residual_ratios_are_those_of_the_branch_norms():
    model = build("deit")
    x = images(8)
    result = compare_models(model, data=x, batch_size=4, analyses=["residual"])
    probed = ProbedModel("model", model)
    sites, _ = residual_sites(probed)
    norms, handles = {}, []
    for i, site in enumerate(sites):
        for k, branch in enumerate(site.branches):
            for role, (name, side) in (("skip", branch.skip), ("branch", branch.branch)):

                def record(value, key=(i, k, role)):
                    value = value if torch.is_tensor(value) else value[0]
                    norms.setdefault(key, []).append(value.double().norm(dim=-1))

                module = probed.modules[name]
                if side == "in":
                    handles.append(module.register_forward_pre_hook(lambda m, a, r=record: r(a[0])))
                else:
                    handles.append(module.register_forward_hook(lambda m, a, o, r=record: r(o)))
    with torch.no_grad():
        for batch in x.split(4):
            model(batch)
    for handle in handles:
        handle.remove()
    for i in range(len(sites)):
        for k in range(2):
            ratio = torch.cat(norms[(i, k, "skip")]) / torch.cat(norms[(i, k, "branch")])  # (n, T)
            np.testing.assert_allclose(result.residual_ratio[i, k], ratio.mean(dim=0).numpy(), rtol=1e-5)
    assert result.residual_prefix_tokens.tolist() == [2, 2]


# ----------------------------------------------------------------------------------------------- localization


def test_localization_is_the_cka_of_tokens_and_input_patches_at_each_position():
    model = build("vit")
    x = images(16)
    result = compare_models(model, data=x, batch_size=8, analyses=["localization"])
    names = find_layers(model)
    modules = dict(model.named_modules())
    current, layer, source = {}, [], []
    embed = next(n for n in modules if n.endswith("embeddings.patch_embeddings"))
    handles = [
        modules[names[-1]].register_forward_hook(lambda m, a, o: current.__setitem__("layer", o)),
        modules[embed].register_forward_hook(lambda m, a, o: current.__setitem__("source", o)),
    ]
    with torch.no_grad():
        for batch in x.split(8):
            model(batch)
            layer.append([current["layer"][:, 1 + p].double().numpy() for p in range(16)])  # after the class token
            source.append([current["source"][:, p].double().numpy() for p in range(16)])
    for handle in handles:
        handle.remove()
    assert names[-1].endswith(result.localization_layer)  # its display name: the last block
    assert tuple(result.localization_grid) == (4, 4)
    np.testing.assert_allclose(result.localization, ref.minibatch_cka(layer, source), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- a fit


class PixelDicts(Dataset):
    def __init__(self, n, seed):
        self.x, self.y = images(n, seed=seed), torch.arange(n) % 4

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_a_lightning_module_wrapping_an_hf_model_next_to_an_hf_reference(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_cka import CKAMonitor, CKAResult

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build("vit")

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

        def training_step(self, batch, batch_idx):
            return self.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    reference = build("resnet")
    monitor = CKAMonitor(
        every_n_train_steps=1,
        probe_size=16,
        batch_size=8,
        log_images=False,
        reference=reference,
        analyses=["default", "localization", "linear_probe"],
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = DataLoader(PixelDicts(32, 2), batch_size=8)
    trainer.fit(Lit(), data, DataLoader(PixelDicts(16, 3), batch_size=8))
    result = CKAResult.load(f"{trainer.log_dir}/cka/step_0000002.npz")
    assert sorted(a.name for a in result.analyses) == sorted(
        ["cka", "attention", "heads", "residual", "rank", "localization", "linear_probe"]
    )
    assert result.reference.shape == (2, 3)
    assert result.layers == (["layers.0", "layers.1"] if MAJOR >= 5 else ["layer.0", "layer.1"])
    assert all("stages." in name for name in result.reference_layers)
    assert np.isfinite(result.mean_attention_distance).all() and result.mean_attention_distance.shape == (2, 2)


def test_the_package_never_imports_transformers():
    """Hugging Face modules are recognized by their class names and defining modules: transformers stays optional
    (pytorch_lightning may import it on its own when it is installed)."""
    package = Path(__file__).resolve().parents[1] / "lightning_cka"
    importing = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "transformers" or name.startswith("transformers.") for name in names):
                importing.append(str(path.relative_to(package)))
    assert importing == []


def test_a_hf_model_in_a_tensor_dataset_and_dicts_give_the_same_probe():
    model = build("vit")
    x, y = images(16), torch.arange(16) % 4
    from_tensors = compare_models(model, data=TensorDataset(x, y), batch_size=8, analyses=["cka", "linear_probe"])
    from_dicts = compare_models(
        model, data=DataLoader(PixelDicts(16, 1), batch_size=8), batch_size=8, analyses=["cka", "linear_probe"]
    )
    np.testing.assert_allclose(from_tensors.intra, from_dicts.intra, rtol=1e-6)

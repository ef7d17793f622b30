"""Every family of tests/family_zoo.py trained with the monitor and every analysis asked for: training finishes, each
analysis either runs or is left out with its reason, and what runs measures the model as independent hooks see it.

One fit per family (a module-scoped fixture), a step each, probing at steps 0 and 1.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from family_zoo import FAMILIES, fit, models_table

from lightning_cka import CKAResult, find_layers
from lightning_cka.probe_data.sample import load_probe
from lightning_cka.taps.grams import token_layout
from lightning_cka.taps.layers import named_modules

IDS = [f"{family.library}-{family.name}" for family in FAMILIES]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    torch.set_num_threads(1)
    return {key: fit(family, tmp_path_factory.mktemp("family")) for key, family in zip(IDS, FAMILIES, strict=True)}


@pytest.mark.parametrize(("key", "family"), list(zip(IDS, FAMILIES, strict=True)), ids=IDS)
def test_training_finishes_and_each_analysis_runs_or_says_why_not(fits, key, family):
    trainer, _, messages = fits[key]
    assert trainer.global_step == 1
    result = CKAResult.load(f"{trainer.log_dir}/cka/step_0000001.npz")
    assert sorted(a.name for a in result.analyses) == sorted(family.runs)
    left_out = result.settings_dict()["left_out"]
    assert set(left_out) == {"cka", "attention", "heads", "residual", "localization", "linear_probe", "rank"} - set(
        family.runs
    )
    assert all(reason.strip() for reason in left_out.values())
    # The analyses asked for by name that cannot run are said once each; the default ones that do not apply are not.
    for name in {"localization", "linear_probe"} & set(left_out):
        assert len([m for m in messages if f"the {name} analysis" in m]) == 1, messages


@pytest.mark.parametrize(("key", "family"), list(zip(IDS, FAMILIES, strict=True)), ids=IDS)
def test_layer_cka_is_what_hooks_on_the_trained_model_give(fits, key, family):
    trainer, lit, _ = fits[key]
    result = CKAResult.load(f"{trainer.log_dir}/cka/step_0000001.npz")
    probe = load_probe(f"{trainer.log_dir}/cka/probe.npz")
    names = find_layers(lit.model)
    modules = dict(lit.model.named_modules())
    outputs, current = [], {}

    def keep(name):
        def hook(module, args, output):
            tensor = output if isinstance(output, torch.Tensor) else next(o for o in output if torch.is_tensor(o))
            current[name] = tensor.detach().clone()

        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in names]
    lit.model.eval()
    with torch.no_grad():
        for batch in probe.images.split(8):
            current.clear()
            lit.model(batch.double())
            features = [current[name].reshape(batch.shape[0], -1).numpy() for name in names]
            # Centered first: HSIC ignores the mean, and without it the textbook formulas cancel catastrophically on
            # layers whose mean dwarfs their spread (late CNN stages after a training step).
            outputs.append([f - f.mean(axis=0) for f in features])
    for handle in handles:
        handle.remove()
    np.testing.assert_allclose(result.intra, ref.minibatch_cka(outputs, outputs), rtol=1e-8, atol=1e-9)


# timm, torchvision and Hugging Face names of class, distillation and register tokens
TOKENS = ("cls_token", "dist_token", "reg_token", "class_token", "distillation_token", "register_tokens")


@pytest.mark.parametrize(("key", "family"), list(zip(IDS, FAMILIES, strict=True)), ids=IDS)
def test_token_layout_of_every_layer_is_where_the_planted_tokens_are(key, family):
    """Overwrite the model's CLS / distillation / register tokens with large distinct vectors and find them in each
    layer's output: the layout the package uses must say the same (prefix count, class token first, channels last).
    """
    torch.manual_seed(0)
    model = copy.deepcopy(family.build()).eval()
    planted = {}
    for name, param in model.named_parameters():
        if name.split(".")[-1] in TOKENS:
            with torch.no_grad():
                param.copy_(torch.randn_like(param) * 100)
            for row in param.detach().reshape(-1, param.shape[-1]):
                planted[len(planted)] = (name.split(".")[-1], row)
    outputs = {}
    modules = dict(model.named_modules())
    names = find_layers(model)
    handles = [
        modules[n].register_forward_hook(
            lambda m, a, o, n=n: outputs.__setitem__(
                n, o if torch.is_tensor(o) else next(x for x in o if torch.is_tensor(x))
            )
        )
        for n in names
    ]
    size = family.size
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    for handle in handles:
        handle.remove()
    layouts = named_modules(model)
    for name in names:
        layout, out = token_layout(layouts, name), outputs[name]
        if out.dim() == 4:  # square images: the two equal axes are the spatial ones (unless C equals them too)
            nhwc, nchw = out.shape[1] == out.shape[2], out.shape[2] == out.shape[3]
            if nhwc != nchw:
                assert layout.channels_last == nhwc, (name, tuple(out.shape), layout)
            assert (layout.num_prefix_tokens, layout.has_class_token) == (0, False), name
            continue
        if out.dim() != 3:
            continue
        found = []
        for t in range(out.shape[1]):
            token = out[0, t]
            hits = [
                kind
                for kind, vector in planted.values()
                if vector.shape == token.shape and torch.cosine_similarity(vector, token, dim=0) > 0.8
            ]
            if not hits:
                break
            found.append(hits[0])
        same_width = any(vector.shape[-1] == out.shape[-1] for _, vector in planted.values())
        if planted and same_width:
            assert layout.num_prefix_tokens == len(found), (name, found, layout)
            assert layout.has_class_token == (found[:1] in (["cls_token"], ["class_token"])), (name, found, layout)
        elif not planted:
            assert (layout.num_prefix_tokens, layout.has_class_token) == (0, False), name


def test_the_models_page_lists_what_this_test_found(fits):
    outcomes = {}
    for key, (trainer, _, _) in fits.items():
        result = CKAResult.load(f"{trainer.log_dir}/cka/step_0000001.npz")
        outcomes[key] = ([a.name for a in result.analyses], result.settings_dict()["left_out"])
    page = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    assert models_table(outcomes) in page, "docs/models.md is out of date: run python docs/make_models_doc.py"

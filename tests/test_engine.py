"""ProbeEngine as the one probing path: the Grams its taps record, and what a probe leaves of the model (ported from the
retired ``Recorder``'s tests)."""

import random

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

from lightning_cka import find_layers
from lightning_cka.analyses import AttentionStats, LayerCKA
from lightning_cka.engine.analysis import Analysis
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.taps.grams import LayerGrams


class RecordedGrams(Analysis):
    """Keeps the layer Grams of every minibatch, as the engine hands them over (what ``Recorder.grams`` gave).

    Its tap is the one :class:`LayerCKA` uses (equal keys: the engine shares one tap between them).
    """

    name = "recorded_grams"

    def bind(self, setup):
        model = setup.models["model"]
        self._tap = LayerGrams(model.layers, model.reduction, model.layouts)
        self.grams = []
        return True

    def taps(self, model):
        return [self._tap] if model.role == "model" else []

    def start(self, num_minibatches, device):
        self.grams = []

    def update(self, batch):
        self.grams.append(batch.values["model"][self._tap.key].grams)


def probe(model, inputs, layers="auto", reduction="flatten", analyses=(), call=None):
    """One probe of one minibatch through the engine; returns it and the Grams it recorded."""
    recorded = RecordedGrams()
    engine = ProbeEngine([ProbedModel("model", model, layers, reduction, call=call)], [recorded, *analyses])
    engine.run([ProbeBatch(0, 0, inputs)], 1, torch.device("cpu"))
    return engine, recorded


def only_grams(engine, recorded):
    """The Grams of the probe's only minibatch, after checking that nothing failed."""
    assert engine.failures == {}, engine.failures
    (grams,) = recorded.grams
    return grams


def centered_gram(x):
    """Independent NumPy Gram of the mean-centered examples (what the Gram tap keeps)."""
    x = x.detach().to(torch.float64).reshape(x.shape[0], -1).numpy()
    x = x - x.mean(axis=0)
    return x @ x.T


def stored_outputs(model, names, inputs):
    """Plain forward hooks that store full activations: the approach the taps avoid, used as the reference."""
    store, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_hook(lambda m, a, out, name=name: store.setdefault(name, out)))
    model.eval()
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return store


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet", "test_convnext"])
def test_grams_equal_grams_of_stored_activations(name):
    model = timm.create_model(name)
    inputs = torch.randn(6, 3, 64, 64) if name != "test_vit" else torch.randn(6, 3, 160, 160)
    layers = find_layers(model)
    reference = stored_outputs(model, layers, inputs)
    engine, recorded = probe(model, inputs, analyses=[LayerCKA(permutations=0)])
    grams = only_grams(engine, recorded)
    assert engine.models["model"].layers == layers
    assert len(engine.taps["model"]) == 1  # LayerCKA and the recorder share one Gram tap
    for layer, g in zip(layers, grams, strict=True):
        assert g.shape == (6, 6) and g.dtype == torch.float32
        np.testing.assert_allclose(g.numpy(), centered_gram(reference[layer]), rtol=1e-4, atol=1e-3)


def test_reductions_on_tokens_and_maps():
    vit = timm.create_model("test_vit")
    inputs = torch.randn(5, 3, 160, 160)
    tokens = stored_outputs(vit, ["blocks.2"], inputs)["blocks.2"]  # (5, 101, 64)
    for reduction, expected in (("cls", tokens[:, 0]), ("mean", tokens[:, 1:].mean(1)), ("flatten", tokens)):
        grams = only_grams(*probe(vit, inputs, ["blocks.2"], reduction))
        np.testing.assert_allclose(grams[0].numpy(), centered_gram(expected), rtol=1e-4, atol=1e-4)
    resnet = timm.create_model("test_resnet")
    maps = stored_outputs(resnet, ["layer2.0"], inputs)["layer2.0"]  # (5, C, H, W)
    grams = only_grams(*probe(resnet, inputs, ["layer2.0"], "mean"))
    np.testing.assert_allclose(grams[0].numpy(), centered_gram(maps.mean((2, 3))), rtol=1e-4, atol=1e-4)
    # 'cls' on maps: refused before any probe, naming the layer.
    with pytest.raises(ValueError, match=r"reduction='cls' needs a class token, but layer 'layer1.0' of ResNet"):
        probe(resnet, inputs, reduction="cls", analyses=[LayerCKA(permutations=0)])


def test_bad_reduction_and_attention_arguments():
    vit = timm.create_model("test_vit")
    with pytest.raises(ValueError, match="reduction must be one of"):
        ProbedModel("model", vit, reduction="max")
    with pytest.raises(ValueError, match="renormalize must be True or False"):
        AttentionStats(renormalize="yes")
    with pytest.raises(ValueError, match="local_threshold must be a number"):
        AttentionStats(local_threshold=2.0)
    # Asked for on a model without attention: left out, with the reason (no error: the other analyses go on).
    engine = ProbeEngine([ProbedModel("model", timm.create_model("test_resnet"))], [AttentionStats(), LayerCKA()])
    assert [a.name for a in engine.analyses] == ["cka"]
    assert "attention module it reads" in engine.skipped["attention"]


def test_training_flags_batchnorm_rng_and_grads_are_left_as_they_were():
    model = timm.create_model("test_resnet", drop_rate=0.5)
    model.train()
    model.layer2.eval()  # a user's frozen stage must stay in eval mode
    flags = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    class DrawsInEval(nn.Module):
        def forward(self, x):
            return x + 0 * torch.rand(1) + 0 * float(np.random.rand()) + 0 * random.random()

    model.layer1.add_module("noisy", DrawsInEval())  # runs after layer1.0
    seen = []

    def call(x):
        out = model(x)
        seen.append((model.training, out.requires_grad))
        return out

    inputs = torch.randn(8, 3, 64, 64)  # drawn before the seeds below
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    grams = only_grams(*probe(model, inputs, call=call))
    assert seen == [(False, False)]  # eval mode, no autograd during the probe
    assert len(grams) == 5
    after = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], after[0]) and np.array_equal(expected[1], after[1]) and expected[2] == after[2]
    flags["layer1.noisy"] = True
    assert {name: m.training for name, m in model.named_modules()} == flags
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # running_mean, running_var, num_batches_tracked
    assert all(p.grad is None for p in model.parameters())


def test_hooks_are_removed_on_exit_and_when_the_forward_raises():
    model = timm.create_model("test_vit")
    during = []

    def call(x):
        during.append(hook_count(model))
        return model(x)

    engine, _ = probe(model, torch.randn(4, 3, 160, 160), analyses=[AttentionStats()], call=call)
    assert engine.failures == {} and during[0] > 0
    assert hook_count(model) == 0
    boom = model.blocks[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # the model's own forward raising still raises
        probe(model, torch.randn(4, 3, 160, 160), analyses=[AttentionStats()])
    assert hook_count(model) == 1  # only the user's own hook is left
    boom.remove()
    assert model.training


def test_attention_starts_afresh_in_every_probe():
    model = timm.create_model("test_vit")
    first, second = torch.randn(4, 3, 160, 160), torch.randn(4, 3, 160, 160)
    engine = ProbeEngine([ProbedModel("model", model)], [AttentionStats()])
    for inputs in (first, second):
        engine.run([ProbeBatch(0, 0, inputs)], 1, torch.device("cpu"))
        again = engine.compute()
    fresh = ProbeEngine([ProbedModel("model", model)], [AttentionStats()])
    fresh.run([ProbeBatch(0, 0, second)], 1, torch.device("cpu"))
    alone = fresh.compute()
    # The second probe does not add to the first: its distances are those of its own images only.
    np.testing.assert_array_equal(again["mean_attention_distance"], alone["mean_attention_distance"])
    np.testing.assert_array_equal(again["attention_entropy"], alone["attention_entropy"])
    assert engine.analyses[0]._sums["model"].count.max().item() == 4  # not 8


def test_a_module_called_twice_is_a_clear_error():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    calls = []
    engine, recorded = probe(model, torch.randn(5, 4), ["1"], call=lambda x: calls.append(1) or model(x))
    error = engine.failures["recorded_grams"]  # that analysis's failure, kept by the engine
    assert isinstance(error, RuntimeError) and "module '1' ran more than once" in str(error)
    assert calls == [1] and recorded.grams == []  # the forward pass went through; nothing was recorded
    grams = only_grams(*probe(model, torch.randn(5, 4), ["0", "2"]))  # the parents / single-use modules work
    assert len(grams) == 2


def test_in_place_ops_after_the_layer_do_not_change_what_was_recorded():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))
    inputs = torch.randn(7, 4)
    with torch.no_grad():
        pre_relu = model[0](inputs).clone()
    grams = only_grams(*probe(model, inputs, ["0", "1"]))
    np.testing.assert_allclose(grams[0].numpy(), centered_gram(pre_relu), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grams[1].numpy(), centered_gram(pre_relu.relu()), rtol=1e-5, atol=1e-5)


def test_tuple_outputs_use_their_first_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "aux"

    model = nn.Sequential(nn.Linear(3, 5), Pair())
    inputs = torch.randn(6, 3)
    grams = only_grams(*probe(model, inputs, ["1"]))
    np.testing.assert_allclose(grams[0].numpy(), centered_gram(model[0](inputs) * 2), rtol=1e-5, atol=1e-5)


def test_layers_that_did_not_run_and_wrong_batch_dims_are_clear_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 5)
            self.unused = nn.Linear(5, 5)

        def forward(self, x):
            return self.used(x)

    engine, recorded = probe(Net(), torch.randn(6, 3), ["used", "unused"])
    error = engine.failures["recorded_grams"]
    assert isinstance(error, RuntimeError) and "unused did not run" in str(error)
    assert recorded.grams == []

    class Transpose(nn.Module):
        def forward(self, x):
            return x.T

    model = nn.Sequential(nn.Linear(3, 5), Transpose())
    engine, recorded = probe(model, torch.randn(6, 3), ["1"])
    error = engine.failures["recorded_grams"]
    assert isinstance(error, RuntimeError) and "first dim of a monitored output must be the batch" in str(error)


def test_compiled_models_are_probed_eagerly_and_stay_compiled():
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 4))
    compiled = torch.compile(model, backend="eager")
    inputs = torch.randn(6, 3)
    compiled(inputs)  # traced before the hooks exist
    fired = []
    handle = model[1].register_forward_hook(lambda *a: fired.append(1))
    compiled(inputs)
    assert not fired  # the problem: hooks registered after compilation are ignored (pytorch#117758)
    handle.remove()
    engine, recorded = probe(compiled, inputs, ["0", "1"])
    grams = only_grams(engine, recorded)
    assert engine.models["model"].module is model
    np.testing.assert_allclose(grams[1].numpy(), centered_gram(model[1](model[0](inputs))), rtol=1e-5, atol=1e-5)
    # After the probe the wrapper still runs its compiled graph (which knows nothing of hooks added since).
    handle = model[1].register_forward_hook(lambda *a: fired.append(1))
    compiled(inputs)
    handle.remove()
    assert not fired


def test_ddp_wrapped_models(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        inputs = torch.randn(6, 3)
        expected = centered_gram(model[1](model[0](inputs)))
        for call in (None, model):  # calling the wrapper (the default) or the inner module fires the hooks
            engine, recorded = probe(ddp, inputs, ["1"], call=call)
            assert engine.models["model"].layers == ["1"] and engine.models["model"].module is model
            np.testing.assert_allclose(only_grams(engine, recorded)[0].numpy(), expected, rtol=1e-5)
    finally:
        dist.destroy_process_group()

import random

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

from lightning_cka import Recorder, find_layers


def centered_gram(x):
    """Independent NumPy Gram of the mean-centered examples (what the Recorder keeps)."""
    x = x.detach().to(torch.float64).reshape(x.shape[0], -1).numpy()
    x = x - x.mean(axis=0)
    return x @ x.T


def stored_outputs(model, names, inputs):
    """Plain forward hooks that store full activations: the approach the Recorder avoids, used as the reference."""
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


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet", "test_convnext"])
def test_grams_equal_grams_of_stored_activations(name):
    model = timm.create_model(name)
    inputs = torch.randn(6, 3, 64, 64) if name != "test_vit" else torch.randn(6, 3, 160, 160)
    layers = find_layers(model)
    reference = stored_outputs(model, layers, inputs)
    with Recorder(model, attention=False) as rec:
        model(inputs)
        grams = rec.grams
    assert rec.layers == layers
    for layer, g in zip(layers, grams, strict=True):
        assert g.shape == (6, 6) and g.dtype == torch.float32
        np.testing.assert_allclose(g.numpy(), centered_gram(reference[layer]), rtol=1e-4, atol=1e-3)


def test_reductions_on_tokens_and_maps():
    vit = timm.create_model("test_vit")
    inputs = torch.randn(5, 3, 160, 160)
    tokens = stored_outputs(vit, ["blocks.2"], inputs)["blocks.2"]  # (5, 101, 64)
    for reduction, expected in (("cls", tokens[:, 0]), ("mean", tokens[:, 1:].mean(1)), ("flatten", tokens)):
        with Recorder(vit, ["blocks.2"], reduction=reduction) as rec:
            vit(inputs)
            np.testing.assert_allclose(rec.grams[0].numpy(), centered_gram(expected), rtol=1e-4, atol=1e-4)
    resnet = timm.create_model("test_resnet")
    maps = stored_outputs(resnet, ["layer2.0"], inputs)["layer2.0"]  # (5, C, H, W)
    with Recorder(resnet, ["layer2.0"], reduction="mean") as rec:
        resnet(inputs)
        np.testing.assert_allclose(rec.grams[0].numpy(), centered_gram(maps.mean((2, 3))), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="reference_reduction='mean'"), Recorder(resnet, reduction="cls") as rec:
        resnet(inputs)


def test_bad_reduction_and_attention_arguments():
    vit = timm.create_model("test_vit")
    with pytest.raises(ValueError, match="reduction must be one of"):
        Recorder(vit, reduction="max")
    with pytest.raises(ValueError, match="attention must be"):
        Recorder(vit, attention="yes")
    with pytest.raises(ValueError, match="attention=True, but"):
        Recorder(timm.create_model("test_resnet"), attention=True)


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
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    with Recorder(model) as rec:
        assert not model.training
        out = model(torch.randn(8, 3, 64, 64))
        assert not out.requires_grad
        assert len(rec.grams) == 5
    after = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], after[0]) and np.array_equal(expected[1], after[1]) and expected[2] == after[2]
    flags["layer1.noisy"] = True
    assert {name: m.training for name, m in model.named_modules()} == flags
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # running_mean, running_var, num_batches_tracked
    assert all(p.grad is None for p in model.parameters())


def test_hooks_are_removed_on_exit_and_when_the_forward_raises():
    model = timm.create_model("test_vit")

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with Recorder(model):
        assert hook_count() > 0
        model(torch.randn(4, 3, 160, 160))
    assert hook_count() == 0
    boom = model.blocks[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), Recorder(model):
        model(torch.randn(4, 3, 160, 160))
    assert hook_count() == 1  # only the user's own hook is left
    boom.remove()
    assert model.training


def test_attention_starts_afresh_in_every_with_block():
    model = timm.create_model("test_vit")
    recorder = Recorder(model)
    for _ in range(2):
        with recorder as rec:
            model(torch.randn(4, 3, 160, 160))
        assert rec.attention.num_images.max().item() == 4  # not 8: the second block does not add to the first


def test_a_module_called_twice_is_a_clear_error():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    with pytest.raises(RuntimeError, match="module '1' ran more than once"), Recorder(model, ["1"]):
        model(torch.randn(5, 4))
    with Recorder(model, ["0", "2"]) as rec:  # the parents / single-use modules work
        model(torch.randn(5, 4))
        assert len(rec.grams) == 2


def test_in_place_ops_after_the_layer_do_not_change_what_was_recorded():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))
    inputs = torch.randn(7, 4)
    with torch.no_grad():
        pre_relu = model[0](inputs).clone()
    with Recorder(model, ["0", "1"]) as rec:
        model(inputs)
        grams = rec.grams
    np.testing.assert_allclose(grams[0].numpy(), centered_gram(pre_relu), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grams[1].numpy(), centered_gram(pre_relu.relu()), rtol=1e-5, atol=1e-5)


def test_tuple_outputs_use_their_first_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "aux"

    model = nn.Sequential(nn.Linear(3, 5), Pair())
    inputs = torch.randn(6, 3)
    with Recorder(model, ["1"]) as rec:
        model(inputs)
        np.testing.assert_allclose(rec.grams[0].numpy(), centered_gram(model[0](inputs) * 2), rtol=1e-5, atol=1e-5)


def test_layers_that_did_not_run_and_wrong_batch_dims_are_clear_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 5)
            self.unused = nn.Linear(5, 5)

        def forward(self, x):
            return self.used(x)

    model = Net()
    with Recorder(model, ["used", "unused"]) as rec:
        model(torch.randn(6, 3))
        with pytest.raises(RuntimeError, match="unused did not run"):
            _ = rec.grams

    class Transpose(nn.Module):
        def forward(self, x):
            return x.T

    model = nn.Sequential(nn.Linear(3, 5), Transpose())
    with pytest.raises(RuntimeError, match="first dim of a monitored output must be the batch"), Recorder(model, ["1"]):
        model(torch.randn(6, 3))


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
    with Recorder(compiled, ["0", "1"]) as rec:
        compiled(inputs)
        grams = rec.grams
    np.testing.assert_allclose(grams[1].numpy(), centered_gram(model[1](model[0](inputs))), rtol=1e-5, atol=1e-5)


def test_ddp_wrapped_models(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        inputs = torch.randn(6, 3)
        expected = centered_gram(model[1](model[0](inputs)))
        with Recorder(ddp, ["1"]) as rec:
            assert rec.layers == ["1"]
            ddp(inputs)  # calling the wrapper (or the inner module) fires the hooks
            np.testing.assert_allclose(rec.grams[0].numpy(), expected, rtol=1e-5)
    finally:
        dist.destroy_process_group()

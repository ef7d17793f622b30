import pytest
import timm
import torch

from lightning_cka.reference import load_reference


def donor():
    torch.manual_seed(1)
    return timm.create_model("test_resnet", num_classes=3)


def test_module_is_frozen_in_eval_mode():
    model = donor().train()
    out = load_reference(model)
    assert out is model and not out.training and not any(p.requires_grad for p in out.parameters())


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd}, lambda sd: {"model": sd}])
@pytest.mark.parametrize("prefix", ["", "model.", "module._orig_mod."])
def test_weights_file_with_any_common_prefix(tmp_path, wrap, prefix):
    source = donor()
    path = tmp_path / "w.pt"
    torch.save(wrap({prefix + k: v for k, v in source.state_dict().items()}), path)
    loaded = load_reference("test_resnet", weights=str(path), model_kwargs={"num_classes": 3})
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_that_names_its_architecture(tmp_path):
    source = donor()
    path = tmp_path / "run.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
            "hyper_parameters": {"timm_name": "test_resnet", "timm_kwargs": {"num_classes": 3}},
        },
        path,
    )
    loaded = load_reference(str(path))
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": {}}, tmp_path / "anonymous.ckpt")
    with pytest.raises(ValueError, match="does not say which model"):
        load_reference(str(tmp_path / "anonymous.ckpt"))


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a timm model name"):
        load_reference("resnet_does_not_exist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference("test_resnet", weights=str(tmp_path / "missing.pt"))
    torch.save(donor().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"other shapes \(file vs model\) \['fc.weight \(3, 96\) vs \(1000, 96\)'"):
        load_reference("test_resnet", weights=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="only apply to a timm model name"):
        load_reference(donor(), model_kwargs={"num_classes": 3})
    torch.save({"not": "tensors"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_reference("test_resnet", weights=str(tmp_path / "junk.pt"))

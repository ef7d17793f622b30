import pytest
import timm
import torch
import torchvision
from torch import nn

from lightning_cka import find_layers


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test_vit", [f"blocks.{i}" for i in range(6)]),
        ("test_resnet", ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
        ("test_efficientnet", ["blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0"]),
        (
            "test_convnext",
            ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1"]
            + [f"stages.2.blocks.{j}" for j in range(4)]
            + ["stages.3.blocks.0", "stages.3.blocks.1"],
        ),
    ],
)
def test_auto_finds_the_residual_blocks_of_timm_families(name, expected):
    assert find_layers(timm.create_model(name)) == expected


def test_auto_on_torchvision_resnet():
    layers = find_layers(torchvision.models.resnet18())
    assert layers == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def test_auto_inside_a_wrapper_module_keeps_the_attribute_path():
    class Lit(nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = nn.CrossEntropyLoss()
            self.model = timm.create_model("test_vit")

    assert find_layers(Lit())[:2] == ["model.blocks.0", "model.blocks.1"]


def test_fallback_uses_the_largest_sequential():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    assert find_layers(model) == ["0", "1", "2", "3"]


def test_fallback_without_containers_uses_leaves_with_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 2)

    assert find_layers(Net()) == ["conv", "fc"]


def test_star_matches_one_segment_and_double_star_many():
    vit = timm.create_model("test_vit")
    assert find_layers(vit, "blocks.*") == [f"blocks.{i}" for i in range(6)]
    assert find_layers(vit, "blocks.*.mlp.fc1") == [f"blocks.{i}.mlp.fc1" for i in range(6)]
    assert find_layers(vit, "blocks.**.fc2")[:3] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "blocks.2.mlp.fc2"]
    assert len(find_layers(vit, ["**.norm1", "**.attn", "**.mlp"])) == 18


def test_entries_keep_their_order_and_drop_duplicates():
    vit = timm.create_model("test_vit")
    assert find_layers(vit, ["blocks.3", "blocks.1", "blocks.[13]"]) == ["blocks.3", "blocks.1"]


def test_names_may_leave_out_leading_segments_when_unambiguous():
    wrapper = nn.Module()
    wrapper.model = timm.create_model("test_vit")
    assert find_layers(wrapper, "blocks.2.attn") == ["model.blocks.2.attn"]
    assert find_layers(wrapper, "blocks.*.attn")[0] == "model.blocks.0.attn"
    with pytest.raises(ValueError, match=r"could mean any of stages\.0\.blocks\.0, stages\.1\.blocks\.0"):
        find_layers(timm.create_model("test_convnext"), "blocks.0")


def test_unknown_names_list_the_closest_modules():
    with pytest.raises(ValueError, match=r"no module matches 'blocks\.1\.mpl'\. Closest module names: blocks\.1\.mlp"):
        find_layers(timm.create_model("test_vit"), ["blocks.0", "blocks.1.mpl"])
    with pytest.raises(ValueError, match=r"no module matches 'stages\.\*'"):
        find_layers(timm.create_model("test_vit"), "stages.*")
    with pytest.raises(ValueError, match="non-empty"):
        find_layers(timm.create_model("test_vit"), [])


def test_wrappers_are_looked_through():
    vit = timm.create_model("test_vit")
    assert find_layers(torch.compile(vit, backend="eager")) == find_layers(vit)
    assert find_layers(nn.DataParallel(vit), "blocks.0.attn") == ["blocks.0.attn"]

"""Minibatch CKA of a tiny timm ViT against a tiny timm ResNet on random images, printed as a table."""

import timm
import torch

from lightning_cka import compare_models


def main() -> None:
    torch.manual_seed(0)
    vit, resnet = timm.create_model("test_vit"), timm.create_model("test_resnet")
    images = torch.randn(64, 3, 160, 160)
    result = compare_models(vit, resnet, data=images, batch_size=16)
    width = max(map(len, result.layers))
    print(f"CKA of test_vit layers (rows) with test_resnet layers (columns), {result.num_examples} random images")
    print(" " * width + "".join(f"{name:>10}" for name in result.reference_layers))
    for name, row in zip(result.layers, result.reference, strict=True):
        print(f"{name:>{width}}" + "".join(f"{value:10.3f}" for value in row))


if __name__ == "__main__":
    main()

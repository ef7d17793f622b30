"""Small architectures that timm lacks, registered with timm so checkpoints can name them.

``examples/train.py`` saves the timm name of the model it trains; a checkpoint of ``resnet18_cifar`` can only be
rebuilt (as a ``CKAMonitor`` reference, or by ``lightning-cka analyze``) where that name is registered, so it is
registered whenever ``lightning_cka`` is imported.
"""

from typing import Any

import timm
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 for 32 px images: a 3x3 stride-1 stem without max-pool keeps ``layer1`` at full resolution.

    timm's ResNet stems always downsample 4x and no ``create_model`` keyword changes that. Unlike timm's ``resnet18``
    the last BatchNorm of each block is not zero-initialized (``zero_init_last=False``): that would make every block of
    the untrained network an identity, and an untrained reference would have pairs of identical layers.
    """
    if pretrained:
        raise ValueError("resnet18_cifar has no pretrained weights; train it with examples/train.py.")
    for option in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm passes these to every model
        kwargs.pop(option, None)
    model = ResNet(BasicBlock, (2, 2, 2, 2), **{"zero_init_last": False, **kwargs})
    model.conv1 = nn.Conv2d(model.in_chans, 64, kernel_size=3, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm initializes conv1
    model.maxpool = nn.Identity()
    return model


if not timm.is_model("resnet18_cifar"):  # a later timm (or a second import path) may have it already
    register_model(resnet18_cifar)

"""Looking through the wrappers that training puts around a model."""

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters and submodules a wrapper holds.

    ``DistributedDataParallel`` / ``DataParallel`` keep it in ``.module``; ``torch.compile`` returns an
    ``OptimizedModule`` that keeps it in ``._orig_mod``. Hooks registered on the inner module's submodules fire when the
    wrapper is called (for compiled modules, see :func:`lightning_cka.taps.probe_mode.probe_mode`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter or buffer (CPU for a model without either)."""
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return first.device if first is not None else torch.device("cpu")


_POOLS = {"token": "token", "avg": "avg", "avgmax": "avg", "max": "avg", "map": "map", "": ""}


def classifier_pool(model: nn.Module) -> str:
    """What the classifier of a ViT reads: ``"token"``, ``"avg"``, ``"map"``, or ``""`` when unknown.

    ``"token"``: the class token; ``"avg"``: the pooled patch tokens; ``"map"``: attention pooling; ``""``: a CNN or a
    model this does not recognize. timm says it in ``global_pool`` (a string on ViTs); torchvision's ViT and Hugging
    Face's ViT / DeiT classifiers read the class token.
    """
    for module in unwrap_model(model).modules():
        pool = getattr(module, "global_pool", None)
        if isinstance(pool, str):
            return _POOLS.get(pool, "")
        name = type(module).__name__
        if name == "VisionTransformer" and type(module).__module__.startswith("torchvision"):
            return "token"
        if name in ("ViTForImageClassification", "DeiTForImageClassification"):
            return "token"
    return ""

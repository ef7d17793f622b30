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

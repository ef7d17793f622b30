"""A model as a probe sees it: its role, layers, how to call it, and whether its activations can be cached."""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_cka.taps.grams import REDUCTIONS, Reduction, TokenLayout, token_layout
from lightning_cka.taps.layers import LayerSpec, display_names, find_layers, named_modules
from lightning_cka.taps.unwrap import model_device, unwrap_model

ROLES = ("model", "reference")


class ProbedModel:
    """One model of a probe, resolved once per fit.

    Args:
        role: ``"model"`` (the rows of every matrix) or ``"reference"``.
        module: the model (DDP, DataParallel and ``torch.compile`` wrappers are looked through).
        layers: ``"auto"`` or names / glob patterns, see :func:`lightning_cka.find_layers`.
        reduction: what each layer's output becomes before its Gram (``"flatten"``, ``"cls"`` or ``"mean"``).
        call: runs the model on a minibatch (default: ``module(inputs)``).
        frozen: its weights never change (a reference): it runs at the first probe only and its taps' values are
            cached per minibatch.
        label: how figures name the model (``"resnet18_cifar, trained (runs/.../last.ckpt)"``).

    Attributes:
        names: the layers' display names (without the attribute path that leads to the network).
        layouts: each layer's token layout.
    """

    def __init__(
        self,
        role: str,
        module: nn.Module,
        layers: LayerSpec = "auto",
        reduction: Reduction = "flatten",
        call: Callable[[Tensor], Any] | None = None,
        frozen: bool = False,
        label: str = "",
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        self.role = role
        self.wrapper = module
        self.module = unwrap_model(module)
        self.modules = named_modules(self.module)
        self.layers = find_layers(self.module, layers)
        self.names = display_names(self.module, self.layers)
        self.reduction = reduction
        self.layouts: list[TokenLayout] = [token_layout(self.modules, name) for name in self.layers]
        without = [name for name, layout in zip(self.layers, self.layouts, strict=True) if not layout.has_class_token]
        if reduction == "cls" and without:
            raise ValueError(
                f"reduction='cls' needs a class token, but layer '{without[0]}' of {type(self.module).__name__} has "
                f"none{f' (nor {len(without) - 1} other monitored layers)' if len(without) > 1 else ''}: use 'mean' "
                "or 'flatten', or monitor layers that hold the class token."
            )
        self.call = call or self.wrapper
        self.frozen = frozen
        self.label = label

    @property
    def prefix(self) -> str:
        """The prefix of this model's per-model fields: ``""`` for the model, ``"reference_"`` for the reference."""
        return "" if self.role == "model" else f"{self.role}_"

    @property
    def device(self) -> torch.device:
        """Where its parameters live."""
        return model_device(self.module)

    def input_for(self, inputs: Tensor) -> Tensor:
        """``inputs`` on this model's device, in its parameters' floating dtype (a float64 reference, ...)."""
        params = next(self.module.parameters(), None)
        dtype = params.dtype if params is not None and inputs.is_floating_point() else inputs.dtype
        return inputs.to(self.device, dtype, non_blocking=True)

    def release(self) -> int:
        """Move a frozen model off its device once its taps are cached; returns the bytes freed there (0 on CPU)."""
        device = self.device
        if device.type == "cpu":
            return 0
        freed = sum(t.numel() * t.element_size() for t in (*self.module.parameters(), *self.module.buffers()))
        self.module.to("cpu")
        return freed

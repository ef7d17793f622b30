"""The Gram tap: each monitored layer's output reduced to its ``(n, n)`` Gram matrix as it is produced."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.functional.hsic import gram
from lightning_cka.taps.base import Tap, first_tensor

Reduction = Literal["flatten", "cls", "mean"]
REDUCTIONS = ("flatten", "cls", "mean")


@dataclass
class Grams:
    """One forward pass through the monitored layers.

    Attributes:
        grams: ``(n, n)`` centered Gram matrix of each layer (float32; float64 for float64 models).
        overflow: per layer, a 0-dim bool tensor: its features were finite but its Gram was not (values too large for
            float32). Tensors, not bools, so that no hook waits for the device.
        features: per layer, the number of features after the reduction.
    """

    grams: list[Tensor]
    overflow: list[Tensor]
    features: list[int]


@dataclass(frozen=True)
class TokenLayout:
    """How to find the CLS token and the patch tokens (or the spatial axes) in one layer's output."""

    num_prefix_tokens: int  # leading non-patch tokens of (n, T, D) outputs (CLS, distillation, registers)
    has_class_token: bool
    channels_last: bool  # (n, H, W, C) instead of (n, C, H, W)
    patches: bool = True  # False: the output holds the prefix tokens only (CaiT's class-attention blocks)


def token_layout(modules: Mapping[str, nn.Module], name: str) -> TokenLayout:
    """The layout of ``name``'s output, from the network that holds it.

    The innermost owner decides: CaiT and XCiT by where the layer sits (their ``blocks`` hold patch tokens only, the
    class token joins in ``blocks_token_only`` / ``cls_attn_blocks``); timm ViTs by ``num_prefix_tokens`` and
    ``has_class_token``; PiT by ``cls_token`` and ``num_tokens``; torchvision's ViT by its ``class_token``; Hugging
    Face ViT, DeiT and Dinov2 by their ``embeddings`` (class, distillation and register tokens). ``channels_last``
    comes from an owner with ``output_fmt == "NHWC"`` (timm Swin) or from torchvision's Swin; Hugging Face Swin blocks
    return ``(n, H·W, C)`` tokens and its ConvNext and ResNet ``(n, C, H, W)`` maps.
    """
    parts = name.split(".") if name else []
    prefix, has_cls, channels_last, patches = None, None, False, True
    for depth in range(len(parts), -1, -1):
        owner, inner = modules[".".join(parts[:depth])], ".".join(parts[depth:])
        if prefix is None:
            found = _owner_layout(owner, inner)
            if found is not None:
                prefix, has_cls = found
                patches = not (type(owner).__name__ == "Cait" and inner.startswith("blocks_token_only."))
        if str(getattr(owner, "output_fmt", "")) in ("NHWC", "Format.NHWC") or _torchvision_swin(owner, inner):
            channels_last = True
    return TokenLayout(prefix or 0, bool(has_cls), channels_last, patches)


def _owner_layout(owner: nn.Module, inner: str) -> tuple[int, bool] | None:
    """``(prefix tokens, has a class token)`` of the layer at ``inner`` inside ``owner``, when ``owner`` tells."""
    family = type(owner).__name__ if type(owner).__module__.startswith("timm.") else ""
    if family in ("Cait", "Xcit") and inner:
        class_blocks = "blocks_token_only." if family == "Cait" else "cls_attn_blocks."
        return (1, True) if inner.startswith(class_blocks) else (0, False)
    if hasattr(owner, "num_prefix_tokens"):
        has_cls = getattr(owner, "has_class_token", getattr(owner, "cls_token", None) is not None)
        return int(owner.num_prefix_tokens), bool(has_cls)
    hf = _hf_prefix_tokens(owner)
    if hf is not None:
        return (0, False) if inner.startswith("embeddings.patch_embeddings") else (hf, True)
    if isinstance(getattr(owner, "cls_token", None), Tensor):  # PiT
        return int(getattr(owner, "num_tokens", owner.cls_token.shape[1])), True
    if isinstance(getattr(owner, "class_token", None), Tensor):  # torchvision's VisionTransformer
        return 1, True
    return None


def _hf_prefix_tokens(owner: nn.Module) -> int | None:
    """The leading tokens of a Hugging Face ViT-style model (``None`` for any other module).

    Its ``embeddings`` put the class token first, then DeiT's ``distillation_token``, then Dinov2's
    ``register_tokens`` (``config.num_register_tokens`` of them), then the patches.
    """
    embeddings = getattr(owner, "embeddings", None)
    if not type(owner).__module__.startswith("transformers.") or not isinstance(
        getattr(embeddings, "cls_token", None), Tensor
    ):
        return None
    registers = getattr(embeddings, "register_tokens", None)
    distillation = isinstance(getattr(embeddings, "distillation_token", None), Tensor)
    return 1 + int(distillation) + (int(registers.shape[1]) if isinstance(registers, Tensor) else 0)


def _torchvision_swin(owner: nn.Module, inner: str) -> bool:
    """A layer of torchvision's Swin whose output is channels-last: its stages (``features``) and final norm."""
    swin = type(owner).__module__.startswith("torchvision.models.swin") and type(owner).__name__.startswith("Swin")
    return swin and (inner.startswith("features.") or inner == "norm")


def reduce_output(output: Tensor, reduction: Reduction, layout: TokenLayout, name: str) -> Tensor:
    """What a layer's output becomes before its Gram: all features, the CLS token, or the mean over positions."""
    if reduction == "flatten" or output.dim() == 2:
        return output
    if output.dim() == 3:
        if reduction == "mean":
            patches = output[:, layout.num_prefix_tokens :]
            return (patches if patches.shape[1] else output).mean(dim=1)  # (n, D); CaiT's class blocks: the CLS
        if not layout.has_class_token:
            raise ValueError(
                f"reduction='cls' needs a class token, but layer '{name}' belongs to a model without one"
                f"{' (its prefix tokens are registers)' if layout.num_prefix_tokens else ''}: use 'mean' or 'flatten'."
            )
        return output[:, 0]  # (n, D)
    if output.dim() == 4 and reduction == "mean":
        return output.mean(dim=(1, 2) if layout.channels_last else (2, 3))  # (n, C)
    raise ValueError(
        f"reduction={reduction!r} is not defined for layer '{name}' with output shape {tuple(output.shape)}: 'cls' "
        "needs (n, T, D) tokens, 'mean' needs tokens or 4-D maps. Use reduction='flatten' (for a CNN reference, "
        "reference_reduction='mean')."
    )


class LayerGrams(Tap):
    """The centered Gram matrix of every monitored layer's output.

    Each hook turns its layer's output into a Gram on the spot and keeps only that, so memory is ``O(layers × n²)``
    whatever the feature size, and an in-place op that later overwrites the output (``nn.ReLU(inplace=True)``) cannot
    change what was recorded.

    Args:
        layers: module names.
        reduction: see :func:`reduce_output`.
        layouts: each layer's :class:`TokenLayout`.
    """

    def __init__(self, layers: list[str], reduction: Reduction, layouts: list[TokenLayout]) -> None:
        self.layers = list(layers)
        self.reduction = reduction
        self.layouts = layouts
        self.key = ("grams", tuple(layers), reduction)
        self._grams: dict[str, Tensor] = {}
        self._overflow: dict[str, Tensor] = {}
        self._features: dict[str, int] = {}
        self._batch_size: int | None = None

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        return [
            self.on_output(modules[name], self._hook(name, layout))
            for name, layout in zip(self.layers, self.layouts, strict=True)
        ]

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._grams, self._overflow, self._features = {}, {}, {}
        self._batch_size = None if inputs is None else inputs.shape[0]

    def _hook(self, name: str, layout: TokenLayout):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if name in self._grams:
                raise RuntimeError(
                    f"module '{name}' ran more than once in one forward pass (a module reused at several places, "
                    "like one nn.ReLU called twice), so it has no single output to compare. Monitor its parent block "
                    "or a module that runs once."
                )
            features = reduce_output(first_tensor(output, name), self.reduction, layout, name)
            if self._batch_size is not None and features.shape[0] != self._batch_size:
                raise RuntimeError(
                    f"layer '{name}' returned {tuple(features.shape)}, but the batch has {self._batch_size} examples: "
                    "the first dim of a monitored output must be the batch."
                )
            g = gram(features, center=True)
            # A non-finite Gram of finite features is an overflow, not a NaN in the model: say which it was. aminmax
            # (which propagates NaN) reads the features once without writing a mask: 25x cheaper than isfinite().
            low, high = torch.aminmax(features.detach())
            self._overflow[name] = ~torch.isfinite(g).all() & torch.isfinite(low) & torch.isfinite(high)
            self._grams[name] = g
            self._features[name] = features[0].numel()

        return hook

    @override
    def collect(self) -> Grams:
        missing = [name for name in self.layers if name not in self._grams]
        if missing:
            raise RuntimeError(
                f"layer(s) {', '.join(missing)} did not run in the latest forward pass (or no forward pass ran). "
                "Choose layers the forward pass uses."
            )
        return Grams(
            [self._grams[n] for n in self.layers],
            [self._overflow[n] for n in self.layers],
            [self._features[n] for n in self.layers],
        )

"""The linear-probe tap: each monitored layer's output reduced on the spot to its CLS token and its pooled features."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.taps.base import Tap, first_tensor
from lightning_cka.taps.grams import TokenLayout


@dataclass
class ProbeFeatures:
    """One forward pass through the monitored layers, reduced to the probe's features.

    Attributes:
        cls: per layer, the ``(n, D)`` float64 CLS token, or ``None`` (no class token, or not a token output).
        gap: per layer, the ``(n, D)`` mean over patch tokens / spatial positions (2-D outputs as they are), taken in
            the output's precision (at least float32) and widened to float64.
        dtypes: per layer, the precision the scored half is kept in: the output's, at least float32.
    """

    cls: list[Tensor | None]
    gap: list[Tensor]
    dtypes: list[torch.dtype]


def probe_features(output: Tensor, layout: TokenLayout, name: str) -> tuple[Tensor | None, Tensor]:
    """The CLS token and the global average pool of one layer's output, as new float64 tensors.

    ``(n, T, D)`` tokens: CLS is token 0 when the model has a class token, the pool is the mean over the tokens after
    the ``num_prefix_tokens`` prefix (CLS, distillation and register tokens are left out). ``(n, C, H, W)`` maps (``(n,
    H, W, C)`` when the layout is channels-last): the spatial mean, no CLS. ``(n, D)`` outputs are already pooled: they
    are the pool, no CLS. Means are taken in the output's precision, at least float32 (a float64 copy of a whole
    ``(n, T, D)`` output would double the hook's memory on the GPU), then widened to float64.
    """
    precision = torch.promote_types(output.dtype, torch.float32)
    if output.dim() == 3:
        cls = output[:, 0].to(torch.float64, copy=True) if layout.has_class_token else None
        patches = output[:, layout.num_prefix_tokens :]
        patches = patches if patches.shape[1] else output  # a layer of prefix tokens only (CaiT's class blocks)
        return cls, patches.mean(dim=1, dtype=precision).to(torch.float64)
    if output.dim() == 4:
        spatial = (1, 2) if layout.channels_last else (2, 3)
        return None, output.mean(dim=spatial, dtype=precision).to(torch.float64)
    if output.dim() == 2:
        return None, output.to(torch.float64, copy=True)
    raise ValueError(
        f"linear_probe: layer '{name}' returned shape {tuple(output.shape)}; the probe needs (n, T, D) tokens, "
        "(n, C, H, W) maps or (n, D) vectors. Monitor other layers or leave the linear_probe analysis out."
    )


class LinearProbeTap(Tap):
    """The CLS and pooled features of every monitored layer, reduced in the hook (no activation is kept).

    Args:
        layers: module names.
        layouts: each layer's :class:`TokenLayout`.
    """

    def __init__(self, layers: list[str], layouts: list[TokenLayout]) -> None:
        self.layers = list(layers)
        self.layouts = list(layouts)
        self.key = ("linear_probe", tuple(layers))
        self._values: dict[str, tuple[Tensor | None, Tensor, torch.dtype]] = {}
        self._batch_size: int | None = None

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        return [
            self.on_output(modules[name], self._hook(name, layout))
            for name, layout in zip(self.layers, self.layouts, strict=True)
        ]

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._values = {}
        self._batch_size = None if inputs is None else inputs.shape[0]

    def _hook(self, name: str, layout: TokenLayout):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if name in self._values:
                raise RuntimeError(
                    f"module '{name}' ran more than once in one forward pass, so it has no single output to probe. "
                    "Monitor its parent block or a module that runs once."
                )
            tensor = first_tensor(output, name)
            if self._batch_size is not None and tensor.shape[0] != self._batch_size:
                raise RuntimeError(
                    f"layer '{name}' returned {tuple(tensor.shape)}, but the batch has {self._batch_size} examples: "
                    "the first dim of a monitored output must be the batch."
                )
            cls, gap = probe_features(tensor, layout, name)  # new tensors: in-place ops after the hook cannot reach
            self._values[name] = (cls, gap, torch.promote_types(tensor.dtype, torch.float32))

        return hook

    @override
    def collect(self) -> ProbeFeatures:
        missing = [name for name in self.layers if name not in self._values]
        if missing:
            raise RuntimeError(
                f"layer(s) {', '.join(missing)} did not run in the latest forward pass (or no forward pass ran). "
                "Choose layers the forward pass uses."
            )
        values = [self._values[name] for name in self.layers]
        return ProbeFeatures([v[0] for v in values], [v[1] for v in values], [v[2] for v in values])

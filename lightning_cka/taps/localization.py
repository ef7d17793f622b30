"""The localization tap: per grid position, the Grams of a layer's tokens and of the input patches there.

The input side is the patch embedding (``patch_embed`` output of a ViT, DeiT, Swin or PiT: the content of each input
patch, before position embeddings and prefix tokens) or, for a CNN, the output of its first stage, average-pooled to
the chosen layer's grid.
"""

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.functional.grams import position_grams
from lightning_cka.taps.base import Tap, first_tensor, owners
from lightning_cka.taps.grams import TokenLayout, token_layout

if TYPE_CHECKING:
    from lightning_cka.engine.models import ProbedModel

MAX_POSITIONS = 1024  # (P, P) states and P Grams per side: beyond a 32 x 32 grid the probe would cost too much


@dataclass(frozen=True)
class LocalizationSite:
    """Where the two sides of the localization are.

    Attributes:
        layer: module name of the chosen layer.
        layout: its token layout (prefix tokens of ``(n, T, D)`` outputs; channels-last maps).
        source: module name of the input side (a ``patch_embed`` or a CNN's first stage).
        source_channels_last: the input side's 4-D output is ``(n, H, W, C)``.
        source_grid: the patch grid of a ``patch_embed`` whose output is flattened ``(n, N, C)`` (``N = gh·gw``).
        grid: the chosen layer's grid when the model's geometry fixes it (a fixed-size timm ViT), else ``None``
            (learned from the first minibatch).
        source_patch: the patch size of a flattened patch embedding whose grid follows the input's size (Hugging
            Face ViT, DeiT, Dinov2): each forward pass's grid is the input's size over it.
    """

    layer: str
    layout: TokenLayout
    source: str
    source_channels_last: bool
    source_grid: tuple[int, int] | None
    grid: tuple[int, int] | None
    source_patch: tuple[int, int] | None = None


def resolve_layer(model: "ProbedModel", name: str | None) -> str:
    """The module name of the layer ``name``: a monitored layer's name or display name, or any module's name.

    ``None`` means the last monitored layer that holds patch tokens (CaiT's class-attention blocks hold none); a name
    may leave out leading segments when that makes it unique.
    """
    if name is None:
        with_patches = [layer for layer, layout in zip(model.layers, model.layouts, strict=True) if layout.patches]
        return (with_patches or model.layers)[-1]
    if name in model.layers:
        return name
    if name in model.names:
        return model.layers[model.names.index(name)]
    matches = [m for m in model.modules if m and (m == name or m.endswith(f".{name}"))]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        close = difflib.get_close_matches(name, [m for m in model.modules if m], n=5, cutoff=0.5)
        raise ValueError(
            f"Localization(layer={name!r}): no module of the model is called that. Closest module names: "
            f"{', '.join(close)}."
        )
    raise ValueError(f"Localization(layer={name!r}) could mean any of {', '.join(matches)}: give the full name.")


def localization_site(model: "ProbedModel", layer: str) -> LocalizationSite:
    """The chosen layer and its input side.

    The input side is the patch embedding of the innermost network holding the layer (timm's ``patch_embed``,
    torchvision's ``conv_proj``, Hugging Face's ``embeddings.patch_embeddings``, or the stem ``embedder`` of its
    ResNet); without one (a CNN) it is the first stage: the parent module of the first monitored layer (``layer1`` for
    ``layer1.0``), or that layer itself when it has no parent that runs as a module.
    """
    modules = model.modules
    layout = token_layout(modules, layer)
    for owner in owners(modules, layer)[1:]:
        embed = _patch_embedding(owner)
        if embed is None:
            continue
        source = next(name for name, module in modules.items() if module is embed)
        grid = getattr(embed, "grid_size", None)
        source_patch = None
        if grid is None and type(embed).__module__.startswith("transformers.") and hasattr(embed, "image_size"):
            # Hugging Face ViT, DeiT, Dinov2: (n, N, C) patches of a grid that follows the input (Dinov2 interpolates)
            source_patch = _pair(embed.patch_size)
            image = _pair(embed.image_size)
            grid = (image[0] // source_patch[0], image[1] // source_patch[1])
        source_grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        fixed = (
            type(owner).__name__ == "VisionTransformer"
            and not getattr(owner, "dynamic_img_size", False)
            and getattr(embed, "strict_img_size", False) is True
        )
        channels_last = getattr(embed, "output_fmt", None) == "NHWC"
        return LocalizationSite(
            layer, layout, source, channels_last, source_grid, source_grid if fixed else None, source_patch
        )
    first = model.layers[0]
    parent = first.rsplit(".", 1)[0] if "." in first else ""
    source = parent if parent and not isinstance(modules[parent], nn.ModuleList) else first
    if source == layer:
        raise ValueError(
            f"it compares layer '{layer}' with the model's first stage, and that is '{layer}' itself: choose a higher "
            "layer with Localization(layer=...) or monitor more layers"
        )
    return LocalizationSite(layer, layout, source, token_layout(modules, source).channels_last, None, None)


def _patch_embedding(owner: nn.Module) -> nn.Module | None:
    """The module of ``owner`` that embeds the input patches, or ``None``."""
    for path in ("patch_embed", "conv_proj", "embeddings.patch_embeddings", "embedder"):
        found: object = owner
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.Module) and (path != "embedder" or type(owner).__module__.startswith("transformers.")):
            return found
    return None


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, tuple | list) else (int(value), int(value))


def _maps(x: Tensor, channels_last: bool) -> Tensor:
    """``(n, C, H, W)`` view of a 4-D map (no copy)."""
    return x.permute(0, 3, 1, 2) if channels_last else x


class LocalizationTap(Tap):
    """Per forward pass, the ``(P, P)``-ready Grams of both sides: one ``(n, n)`` Gram per grid position and side.

    The chosen layer's tokens are put on the grid of the input side (ViT: ``T - prefix = gh·gw``, row-major; a square
    token count smaller than the grid is a pooled PiT stage); maps keep their own grid. The input side is
    average-pooled to the chosen layer's grid. The first forward pass of a CNN may need the input side before the
    layer has told the grid: only then is one input-side activation kept (a clone) until the layer runs.

    Args:
        site: where the two sides are.
    """

    def __init__(self, site: LocalizationSite) -> None:
        self.site = site
        self.key = ("localization", site.layer, site.source)
        self.grid: tuple[int, int] | None = site.grid  # known after the first forward pass
        self._reset()

    def _reset(self) -> None:
        self._layer: Tensor | None = None
        self._source: Tensor | None = None
        self._held: Tensor | None = None  # (n, C, Hs, Ws) input side waiting for the grid
        self._source_grid: tuple[int, int] | None = None
        self._forward_grid: tuple[int, int] | None = None
        self._image: tuple[int, int] | None = None
        self._input_grid: tuple[int, int] | None = None  # the grid of the input entering a Hugging Face embedding

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        handles = [
            self.on_output(modules[self.site.source], self._hook(self.site.source, self._on_source)),
            self.on_output(modules[self.site.layer], self._hook(self.site.layer, self._on_layer)),
        ]
        if self.site.source_patch is not None:
            handles.append(self.on_input(modules[self.site.source], self._on_pixels))
        return handles

    def _on_pixels(self, module: nn.Module, args: tuple) -> None:
        pixels = args[0] if args else None
        if isinstance(pixels, Tensor) and pixels.dim() == 4 and self.site.source_patch is not None:
            patch = self.site.source_patch
            self._input_grid = (int(pixels.shape[-2]) // patch[0], int(pixels.shape[-1]) // patch[1])

    def _hook(self, name: str, handler: Callable[[Tensor, tuple[int, int] | None], None]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            handler(first_tensor(output, name), _grid_beside(output))

        return hook

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._reset()
        if inputs is not None and inputs.dim() == 4:
            self._image = (int(inputs.shape[-2]), int(inputs.shape[-1]))

    def _twice(self, name: str) -> RuntimeError:
        return RuntimeError(
            f"module '{name}' ran more than once in one forward pass, so it has no single output to localize; choose "
            "another layer with Localization(layer=...)."
        )

    def _on_source(self, x: Tensor, returned_grid: tuple[int, int] | None) -> None:
        site = self.site
        if self._source is not None or self._held is not None:
            raise self._twice(site.source)
        # Hugging Face Swin's and XCiT's patch embeddings return (tokens, (gh, gw)): the grid of this input.
        flat_grid = self._input_grid or returned_grid or site.source_grid
        if x.dim() == 3 and flat_grid is not None:  # a flattened patch embedding (n, N, C), row-major
            gh, gw = flat_grid
            if x.shape[1] != gh * gw:
                raise RuntimeError(
                    f"'{site.source}' returned {x.shape[1]} patches, but its grid is {gh} x {gw}: use a fixed-size "
                    "model or one that embeds to (n, H, W, C)."
                )
            maps = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
        elif x.dim() == 4:
            maps = _maps(x, site.source_channels_last)
        else:
            raise RuntimeError(
                f"the input side of the localization, '{site.source}', returned {tuple(x.shape)}: it needs (n, N, C) "
                "patches on a grid or 4-D maps."
            )
        self._source_grid = (int(maps.shape[2]), int(maps.shape[3]))
        grid = self._forward_grid or self.grid
        if grid is None:  # the first forward pass, before the layer: keep this one activation until the layer runs
            self._held = maps.clone()
        else:
            self._source = self._pooled_grams(maps, grid)

    def _pooled_grams(self, maps: Tensor, grid: tuple[int, int]) -> Tensor:
        if tuple(maps.shape[2:]) != grid:
            maps = F.adaptive_avg_pool2d(maps, grid)
        return position_grams(maps)

    def _on_layer(self, x: Tensor, returned_grid: tuple[int, int] | None) -> None:
        site = self.site
        if self._layer is not None:
            raise self._twice(site.layer)
        if x.dim() == 3:
            tokens = x[:, site.layout.num_prefix_tokens :]
            grid = self._token_grid(tokens.shape[1])
            maps = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
        elif x.dim() == 4:
            maps = _maps(x, site.layout.channels_last)
        else:
            raise RuntimeError(
                f"layer '{site.layer}' returned {tuple(x.shape)}: it has no positions to localize. Choose a layer with "
                "(n, T, D) tokens or (n, C, H, W) maps with Localization(layer=...)."
            )
        grid = (int(maps.shape[2]), int(maps.shape[3]))
        if grid[0] * grid[1] > MAX_POSITIONS:
            raise RuntimeError(
                f"layer '{site.layer}' has a {grid[0]} x {grid[1]} grid: more than {MAX_POSITIONS} positions would "
                "cost a (P, P) CKA of every pair; choose a higher layer with Localization(layer=...)."
            )
        if grid[0] * grid[1] < 2:
            raise RuntimeError(
                f"layer '{site.layer}' has a 1 x 1 grid at this image size: one position, nothing to localize. Choose "
                "an earlier layer with Localization(layer=...), or probe larger images."
            )
        self._forward_grid = grid
        self._layer = position_grams(maps)
        if self._held is not None:
            self._source, self._held = self._pooled_grams(self._held, grid), None
        elif self._source is not None and self.grid is not None and self.grid != grid:
            raise RuntimeError(
                f"layer '{site.layer}' has a {grid} grid, not the {self.grid} of earlier minibatches: probe images "
                "must all have one size."
            )

    def _token_grid(self, count: int) -> tuple[int, int]:
        grid = self._source_grid or self.site.source_grid
        if grid is not None and grid[0] * grid[1] == count:
            return grid
        side = round(count**0.5)
        if grid is not None and side * side == count and grid[0] == grid[1] and side < grid[0]:
            return side, side  # a pooled stage (PiT) of a square grid
        raise RuntimeError(
            f"layer '{self.site.layer}' has {count} patch tokens, which do not lie on the patch grid {grid} of "
            f"'{self.site.source}': choose a layer whose tokens are the patch grid (a ViT block) with "
            "Localization(layer=...)."
        )

    @override
    def collect(self) -> dict[str, Any]:
        if self._layer is None or self._source is None:
            missing = self.site.layer if self._layer is None else self.site.source
            raise RuntimeError(
                f"'{missing}' did not run in the latest forward pass, so tokens cannot be localized; choose modules "
                "the forward pass uses."
            )
        grid = self._forward_grid
        stride = (self._image[0] / grid[0], self._image[1] / grid[1]) if self._image is not None else (np.nan, np.nan)
        return {"layer": self._layer, "source": self._source, "grid": grid, "stride": stride}


def _grid_beside(output: object) -> tuple[int, int] | None:
    """The ``(gh, gw)`` a module returns next to its tokens (XCiT's patch embedding), or ``None``."""
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], tuple | list)):
        return None
    grid = output[1]
    return (int(grid[0]), int(grid[1])) if len(grid) == 2 and all(isinstance(v, int) for v in grid) else None

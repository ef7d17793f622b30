"""Spatial localization: do a high layer's tokens still know where they are? (Raghu et al. 2021, Figures 9-10).

Taps the chosen layer (``localization_layer``, default: the last monitored layer) and the input side: the patch
embedding (``patch_embed`` output of a ViT, DeiT, Swin or PiT: the content of each input patch, before position
embeddings and prefix tokens) or, for a CNN, the output of its first stage, average-pooled to the chosen layer's
grid. At each of the ``P`` grid positions each side gives the ``(n, n)`` Gram matrix of its token there (one batched
product per side); a cross-mode :class:`MinibatchCKA` of the ``P`` layer positions against the ``P`` input positions
accumulates the ``(P, P)`` CKA with its jackknife standard error and permutation null. Stores ``localization``; draws
``localization/maps``.

Cost per minibatch of ``n`` images: the Grams, ``2·P·n²·C`` multiply-adds, and the HSIC of every position pair,
``P²·n²`` in float64, once plus once per permutation of the null (19 by default): for ViT-B/16 at 224 px (``P = 196``)
and ``n = 128``, about 5 G float32 and 13 G float64 multiply-adds per minibatch.
"""

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.engine.analysis import Analysis, Field, Minibatch, View
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.spec import Figure, Heatmap
from lightning_cka.metrics.minibatch_cka import MinibatchCKA
from lightning_cka.metrics.sums import TensorSums
from lightning_cka.result import CKAResult
from lightning_cka.taps.base import Tap, first_tensor, owners
from lightning_cka.taps.grams import TokenLayout, token_layout
from lightning_cka.taps.layers import display_names

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
    """

    layer: str
    layout: TokenLayout
    source: str
    source_channels_last: bool
    source_grid: tuple[int, int] | None
    grid: tuple[int, int] | None


def resolve_layer(model: ProbedModel, name: str | None) -> str:
    """The module name of the layer ``name``: a monitored layer's name or display name, or any module's name.

    ``None`` means the last monitored layer; a name may leave out leading segments when that makes it unique.
    """
    if name is None:
        return model.layers[-1]
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
            f"localization_layer={name!r} is no module of the model. Closest module names: {', '.join(close)}."
        )
    raise ValueError(f"localization_layer={name!r} could mean any of {', '.join(matches)}: give the full name.")


def localization_site(model: ProbedModel, layer: str) -> LocalizationSite:
    """The chosen layer and its input side.

    The input side is the ``patch_embed`` of the innermost network holding the layer; without one (a CNN) it is the
    first stage: the parent module of the first monitored layer (``layer1`` for ``layer1.0``), or that layer itself
    when it has no parent that runs as a module.
    """
    modules = model.modules
    layout = token_layout(modules, layer)
    for owner in owners(modules, layer)[1:]:
        embed = getattr(owner, "patch_embed", None)
        if not isinstance(embed, nn.Module):
            continue
        source = next(name for name, module in modules.items() if module is embed)
        grid = getattr(embed, "grid_size", None)
        source_grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        fixed = (
            type(owner).__name__ == "VisionTransformer"
            and not getattr(owner, "dynamic_img_size", False)
            and getattr(embed, "strict_img_size", False) is True
        )
        channels_last = getattr(embed, "output_fmt", None) == "NHWC"
        return LocalizationSite(layer, layout, source, channels_last, source_grid, source_grid if fixed else None)
    first = model.layers[0]
    parent = first.rsplit(".", 1)[0] if "." in first else ""
    source = parent if parent and not isinstance(modules[parent], nn.ModuleList) else first
    if source == layer:
        raise ValueError(
            f"localization compares layer '{layer}' with the model's first stage, but that is '{layer}' itself: "
            "choose a higher localization_layer or monitor more layers."
        )
    return LocalizationSite(layer, layout, source, token_layout(modules, source).channels_last, None, None)


def _maps(x: Tensor, channels_last: bool) -> Tensor:
    """``(n, C, H, W)`` view of a 4-D map (no copy)."""
    return x.permute(0, 3, 1, 2) if channels_last else x


def position_grams(maps: Tensor) -> Tensor:
    """``(P, n, n)`` centered Gram matrices of ``(n, C, H, W)`` maps, one per position (``P = H·W``, row-major).

    float32 (float64 for float64 maps); one batched product for all positions.
    """
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    with torch.autocast(maps.device.type, enabled=False):
        x = maps.flatten(2).permute(2, 0, 1).to(dtype)  # (P, n, C)
        x = x - x[:, :1]  # relative to the first image first, as lightning_cka.functional.gram does
        x = x - x.mean(dim=1, keepdim=True)
        return torch.bmm(x, x.transpose(1, 2))


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

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        return [
            modules[self.site.source].register_forward_hook(self._hook(self.site.source, self._on_source)),
            modules[self.site.layer].register_forward_hook(self._hook(self.site.layer, self._on_layer)),
        ]

    def _hook(self, name: str, handler: Callable[[Tensor], None]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            handler(first_tensor(output, name))

        return hook

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._reset()
        if inputs is not None and inputs.dim() == 4:
            self._image = (int(inputs.shape[-2]), int(inputs.shape[-1]))

    def _twice(self, name: str) -> RuntimeError:
        return RuntimeError(
            f"module '{name}' ran more than once in one forward pass, so it has no single output to localize; choose "
            "another localization_layer."
        )

    def _on_source(self, x: Tensor) -> None:
        site = self.site
        if self._source is not None or self._held is not None:
            raise self._twice(site.source)
        if x.dim() == 3 and site.source_grid is not None:  # a flattened patch embedding (n, N, C), row-major
            gh, gw = site.source_grid
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

    def _on_layer(self, x: Tensor) -> None:
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
                f"localization_layer '{site.layer}' returned {tuple(x.shape)}: it has no positions. Choose a layer "
                "with (n, T, D) tokens or (n, C, H, W) maps."
            )
        grid = (int(maps.shape[2]), int(maps.shape[3]))
        if grid[0] * grid[1] > MAX_POSITIONS:
            raise RuntimeError(
                f"localization_layer '{site.layer}' has a {grid[0]} x {grid[1]} grid: more than {MAX_POSITIONS} "
                "positions would cost a (P, P) CKA of every pair; choose a higher layer."
            )
        self._forward_grid = grid
        self._layer = position_grams(maps)
        if self._held is not None:
            self._source, self._held = self._pooled_grams(self._held, grid), None
        elif self._source is not None and self.grid is not None and self.grid != grid:
            raise RuntimeError(
                f"localization_layer '{site.layer}' has a {grid} grid, not the {self.grid} of earlier minibatches: "
                "probe images must all have one size."
            )

    def _token_grid(self, count: int) -> tuple[int, int]:
        grid = self._source_grid or self.site.source_grid
        if grid is not None and grid[0] * grid[1] == count:
            return grid
        side = round(count**0.5)
        if grid is not None and side * side == count and grid[0] == grid[1] and side < grid[0]:
            return side, side  # a pooled stage (PiT) of a square grid
        raise RuntimeError(
            f"localization_layer '{self.site.layer}' has {count} patch tokens, which do not lie on the patch grid "
            f"{grid} of '{self.site.source}': choose a layer whose tokens are the patch grid (a ViT block)."
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


class Localization(Analysis):
    """CKA between the tokens of a high layer and the input patches, at every pair of grid positions.

    Off by default (``localization=True`` turns it on): its cost grows with the square of the grid.
    """

    name = "localization"
    fields = (
        Field(
            "localization",
            "array",
            "(P, P) CKA of the chosen layer's token at each grid position (rows) with the input patch at each "
            "position (columns), row-major on the grid",
        ),
        Field("localization_se", "array", "(P, P) its block-jackknife standard error"),
        Field("localization_null", "array", "(P, P) its 5% permutation-null threshold"),
        Field("localization_layer", "text", "the layer whose tokens are localized"),
        Field("localization_input", "text", "the input side: the patch embedding or the CNN's first stage"),
        Field("localization_grid", "ints", "(2,) the grid (gh, gw) of the positions"),
        Field("localization_stride", "float", "input pixels between neighbouring positions"),
    )

    @override
    def bind(self, models: Mapping[str, ProbedModel]) -> bool:
        if not self.options.localization:
            return False
        model = models["model"]
        layer = resolve_layer(model, self.options.localization_layer)
        self._model = model
        self._site = localization_site(model, layer)
        self._tap = LocalizationTap(self._site)
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._tap] if model.role == "model" else []

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        self._num_minibatches, self._device = num_minibatches, device
        self._metric: MinibatchCKA | None = None
        self._sums = TensorSums({"grid": (2,), "stride": (2,), "count": ()}).to(device)
        grid = self._tap.grid
        if grid is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > num_minibatches:
            raise ValueError(
                f"localization learns the grid of '{self._site.layer}' from the first probe, which needs a probe "
                f"minibatch on every rank: {num_minibatches} minibatches for {dist.get_world_size()} ranks. Use "
                "a larger probe_size or a smaller batch_size."
            )
        if grid is not None:
            self._metric = self._new_metric(grid[0] * grid[1])

    def _new_metric(self, positions: int) -> MinibatchCKA:
        return MinibatchCKA(
            num_layers_a=positions,
            num_layers_b=positions,
            num_minibatches=self._num_minibatches,
            permutations=self.options.permutations,
            seed=self.options.seed,
            minibatch_weights=self.options.minibatch_weights,
            warn=False,
        ).to(self._device)

    @override
    def update(self, batch: Minibatch) -> None:
        values = batch.values["model"][self._tap.key]
        grid = values["grid"]
        if self._metric is None:
            self._metric = self._new_metric(grid[0] * grid[1])
            self._tap.grid = grid  # later probes declare their states at start
        elif self._metric.num_layers_a != grid[0] * grid[1]:
            raise RuntimeError(
                f"localization_layer '{self._site.layer}' has a {grid} grid in minibatch {batch.index}, unlike the "
                "earlier ones: probe images must all have one size."
            )
        self._metric.update(values["layer"], values["source"], grams=True, index=batch.index)
        self._sums.update("grid", torch.tensor(grid, dtype=torch.float64))
        self._sums.update("stride", torch.tensor(values["stride"], dtype=torch.float64))
        self._sums.update("count", torch.tensor(1.0))

    @override
    def reduce(self) -> Any:
        if self._metric is None:  # no minibatch on this rank (and no DDP: see start)
            return None
        self._metric.compute()
        return self._metric.estimate, self._sums.compute()

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        if reduced is None:
            return {}
        estimate, sums = reduced
        count = float(sums["count"])
        grid = np.rint(sums["grid"].cpu().numpy() / count).astype(np.int64)
        stride = sums["stride"].cpu().numpy() / count
        model, layer = self._model, self._site.layer
        in_layers = layer in model.layers
        name = model.names[model.layers.index(layer)] if in_layers else display_names(model.module, [layer])[0]
        return {
            "localization": estimate.value.cpu().numpy(),
            "localization_se": estimate.se.cpu().numpy(),
            "localization_null": estimate.null.cpu().numpy(),
            "localization_layer": name,
            "localization_input": display_names(model.module, [self._site.source])[0],
            "localization_grid": grid,
            "localization_stride": float(np.mean(stride)),
        }

    @classmethod
    @override
    def figures(cls, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        if result.localization is None or result.localization_grid is None:
            return []
        panels = maps_panels(result.localization, tuple(int(g) for g in result.localization_grid))
        layer, source = result.localization_layer or "the layer", result.localization_input or "the input"
        caption = (
            f"Each panel: CKA between the token of {layer} at one position (dot) and the input patch ({source}) at "
            "every position, image orientation. A bright spot on the dot: the token still knows where it is. "
            "Raghu et al. 2021: ViTs trained with a CLS token keep their tokens localized; trained with global "
            "average pooling they localize less."
        )
        title = f"Where the tokens of {layer} come from"
        return [Figure("localization/maps", title, panels, caption, view.subtitle(result))]

    @classmethod
    @override
    def scalars(cls, result: CKAResult, view: View) -> dict[str, float]:
        if result.localization is None or result.localization_grid is None:
            return {}
        own, offset, diagonal = localization_summary(
            np.asarray(result.localization, dtype=np.float64),
            tuple(int(g) for g in result.localization_grid),
            float(result.localization_stride if result.localization_stride is not None else np.nan),
        )
        return {
            "localization/own_position_fraction": own,
            "localization/mean_offset_px": offset,
            "localization/own_position_cka": diagonal,
        }


def localization_summary(matrix: np.ndarray, grid: tuple[int, int], stride: float) -> tuple[float, float, float]:
    """``(own-position fraction, mean offset in pixels, mean own-position CKA)`` of a ``(P, P)`` localization.

    Each position's most similar input position is the argmax of its row (rows with no finite value are left out);
    the offset is its Euclidean grid distance from the position times ``stride``.
    """
    nan = float("nan")
    if matrix.ndim != 2 or matrix.shape[0] != grid[0] * grid[1] or matrix.shape[0] != matrix.shape[1]:
        return nan, nan, nan
    rows = np.flatnonzero(np.isfinite(matrix).any(axis=1))
    diagonal = np.diagonal(matrix)
    diagonal = float(diagonal[np.isfinite(diagonal)].mean()) if np.isfinite(diagonal).any() else nan
    if not rows.size:
        return nan, nan, diagonal
    best = np.nanargmax(np.where(np.isfinite(matrix[rows]), matrix[rows], -np.inf), axis=1)
    own = float((best == rows).mean())
    dy, dx = best // grid[1] - rows // grid[1], best % grid[1] - rows % grid[1]
    offset = float(np.mean(np.hypot(dy, dx)) * stride)
    return own, offset, diagonal


_QUERIES = (("top-left corner", 0.0, 0.0), ("top edge", 0.0, 0.5), ("centre", 0.5, 0.5), ("bottom-right", 1.0, 1.0))


def maps_panels(matrix: np.ndarray, grid: tuple[int, int]) -> tuple[Heatmap, ...]:
    """Similarity maps (gh x gw, image orientation: row 0 at the top) of a few query positions, one panel each."""
    gh, gw = grid
    panels, seen = [], set()
    for label, fy, fx in _QUERIES:
        r, c = min(gh - 1, int(fy * gh)), min(gw - 1, int(fx * gw))
        if (r, c) in seen:
            continue
        seen.add((r, c))
        values = np.asarray(matrix[r * gw + c], dtype=np.float64).reshape(gh, gw)[::-1]
        marked = np.zeros((gh, gw), dtype=bool)
        marked[gh - 1 - r, c] = True
        panels.append(
            Heatmap(
                values=values,
                rows=tuple(str(i) for i in reversed(range(gh))),
                cols=tuple(str(j) for j in range(gw)),
                row_label="input row",
                col_label="input column",
                title=f"token at row {r}, column {c} ({label})",
                colorbar="CKA with the input patch",
                marked=marked,
                mark_label="dot: the token's own position",
            )
        )
    return tuple(panels)

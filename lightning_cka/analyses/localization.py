"""Spatial localization: do a high layer's tokens still know where they are? (Raghu et al. 2021, Figures 9-10).

Taps the chosen layer and the input side (:class:`lightning_cka.taps.localization.LocalizationTap`): at each of the
``P`` grid positions each side gives the ``(n, n)`` Gram matrix of its token there (one batched product per side); a
cross-mode :class:`MinibatchCKA` of the ``P`` layer positions against the ``P`` input positions accumulates the
``(P, P)`` CKA with its jackknife standard error and permutation null. Stores ``localization``; draws
``localization/maps``.

Cost per minibatch of ``n`` images: the Grams, ``2·P·n²·C`` multiply-adds, and the HSIC of every position pair,
``P²·n²`` in float64, once plus once per permutation of the null (19 by default): for ViT-B/16 at 224 px (``P = 196``)
and ``n = 128``, about 5 G float32 and 13 G float64 multiply-adds per minibatch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Figure, Heatmap
from lightning_cka.findings import (
    NOT_MEASURED,
    Criterion,
    Estimate,
    Evidence,
    Finding,
    Side,
    figures_of,
    per_side,
    side_estimate,
    threshold_verdict,
)
from lightning_cka.stats import WEIGHTINGS

if TYPE_CHECKING:
    import torch

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap


class Localization(Analysis):
    """CKA between the tokens of a high layer and the input patches, at every pair of grid positions.

    Off by default: its cost grows with the square of the grid.

    Args:
        layer: the layer whose tokens are localized: a monitored layer's name or display name, or any module's name
            (leading segments may be left out when the rest is unique). Default: the last monitored layer.
        permutations: permutations of the null per minibatch (19: the 5% permutation test; 0: no null).
        minibatch_weights: ``"equal"`` or ``"size"``: how minibatches count in the HSIC sums (see :class:`LayerCKA`).
    """

    name = "localization"
    position = 50
    fields = (
        Field(
            "localization",
            "array",
            "(P, P) CKA of the chosen layer's token at each grid position (rows) with the input patch at each "
            "position (columns), row-major on the grid",
            shape=("P", "P"),
        ),
        Field("localization_se", "array", "(P, P) its block-jackknife standard error", shape=("P", "P")),
        Field("localization_null", "array", "(P, P) its 5% permutation-null threshold", shape=("P", "P")),
        Field("localization_layer", "text", "the layer whose tokens are localized"),
        Field("localization_input", "text", "the input side: the patch embedding or the CNN's first stage"),
        Field("localization_grid", "ints", "(2,) the grid (gh, gw) of the positions", shape=(2,)),
        Field("localization_stride", "float", "input pixels between neighbouring positions"),
    )

    def __init__(self, layer: str | None = None, permutations: int = 19, minibatch_weights: str = "equal") -> None:
        owner = type(self).__name__
        self.layer = check.optional_text(owner, "layer", layer, "a layer name")
        self.permutations = check.integer(owner, "permutations", permutations, 0, 1000, "19 give the 5% test")
        self.minibatch_weights = check.choice(owner, "minibatch_weights", minibatch_weights, WEIGHTINGS)

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from lightning_cka.taps.localization import LocalizationTap, localization_site, resolve_layer

        model = setup.models["model"]
        layer = resolve_layer(model, self.layer)  # a layer that does not exist is an error: it was asked for
        try:
            self._site = localization_site(model, layer)
        except ValueError as err:
            return str(err)
        self._model, self._seed = model, setup.seed
        self._tap = LocalizationTap(self._site)
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._tap] if model.role == "model" else []

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        from lightning_cka.metrics.sums import TensorSums

        self._num_minibatches, self._device = num_minibatches, device
        self._metric = None
        self._sums = TensorSums({"grid": (2,), "stride": (2,), "count": ()}).to(device)
        if self._tap.grid is not None:
            self._metric = self._new_metric(self._tap.grid[0] * self._tap.grid[1])

    def _new_metric(self, positions: int) -> Any:
        from lightning_cka.metrics.minibatch_cka import MinibatchCKA

        return MinibatchCKA(
            num_layers_a=positions,
            num_layers_b=positions,
            num_minibatches=self._num_minibatches,
            permutations=self.permutations,
            seed=self._seed,
            minibatch_weights=self.minibatch_weights,
            warn=False,
        ).to(self._device)

    @override
    def update(self, batch: Minibatch) -> None:
        import torch

        values = batch.values["model"][self._tap.key]
        grid = values["grid"]
        if self._metric is None:
            self._metric = self._new_metric(grid[0] * grid[1])
            self._tap.grid = grid  # later probes declare their states at start
        elif self._metric.num_layers_a != grid[0] * grid[1]:
            raise RuntimeError(
                f"localization layer '{self._site.layer}' has a {grid} grid in minibatch {batch.index}, unlike the "
                "earlier ones: probe images must all have one size."
            )
        self._metric.update(values["layer"], values["source"], grams=True, index=batch.index)
        self._sums.update("grid", torch.tensor(grid, dtype=torch.float64))
        self._sums.update("stride", torch.tensor(values["stride"], dtype=torch.float64))
        self._sums.update("count", torch.tensor(1.0))

    @override
    def reduce(self) -> Any:
        import torch

        from lightning_cka.metrics.sums import TensorMaxima

        # A rank without minibatches learns the grid from the others, so that every rank reduces the same states.
        grid = self._tap.grid if self._metric is not None else (0, 0)
        agreed = TensorMaxima(2).to(self._device)
        agreed.update(torch.tensor(grid, dtype=torch.float64))
        gh, gw = (int(v) for v in agreed.compute().tolist())
        if gh * gw == 0:  # no rank had a minibatch
            return None
        if self._metric is None:
            self._metric = self._new_metric(gh * gw)
        self._metric.compute()
        return self._metric.estimate, self._sums.compute()

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        from lightning_cka.taps.layers import display_names

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

    @override
    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
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

    @override
    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
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

    criteria = (
        Criterion(
            "own_share",
            0.5,
            "share of the layer's token positions whose most CKA-similar input patch is their own: above it the "
            "tokens are localized",
        ),
    )

    @override
    def findings(self, evidence: Evidence) -> list[Finding]:
        return per_side(evidence, lambda side: _localized(self, side, evidence))


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


# ------------------------------------------------------------------------------------------------------------ findings

LOCALIZED = ("localization.tokens_localized", "The tokens of a high layer know where they are")
LOCALIZED_PAPER = (
    "The tokens of a class-token ViT's higher layers stay most similar to their own input patch; a ViT trained with "
    "global average pooling localizes less (Raghu et al. 2021, Figures 9-10)."
)


def _summary(result: CKAResult) -> tuple[float, float, float]:
    if result.localization is None or result.localization_grid is None:
        return float("nan"), float("nan"), float("nan")
    stride = float(result.localization_stride if result.localization_stride is not None else np.nan)
    grid = tuple(int(g) for g in result.localization_grid)
    return localization_summary(np.asarray(result.localization, dtype=np.float64), grid, stride)


def _localized(analysis: Localization, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*LOCALIZED, LOCALIZED_PAPER)
    if first.localization is None:
        return Finding(
            *header,
            NOT_MEASURED,
            "the localization analysis did not run",
            needs="the localization analysis: CKAMonitor(analyses=['default', 'localization']) (examples/train.py "
            "--localization)",
        )
    own = side_estimate(side, lambda r: Estimate(_summary(r)[0]))
    offset = side_estimate(side, lambda r: Estimate(_summary(r)[1]))
    diagonal = side_estimate(side, lambda r: Estimate(_summary(r)[2]))
    what = f"share of {first.localization_layer}'s positions most similar to their own input patch"
    verdict, reason = threshold_verdict(own, evidence.criterion(analysis, "own_share"), True, what)
    statement = (
        f"{own.percent()} of the positions of {first.localization_layer} are most CKA-similar to their own input "
        f"patch ({first.localization_input}); the most similar patch is {offset.text(1)} px away on average, and the "
        f"CKA with the own patch is {diagonal.text(2)}."
    )
    numbers = [
        (what, own.percent(basis=True)),
        ("mean distance to the most similar input patch", offset.text(1, " px", basis=True)),
        ("CKA of a token with its own input patch", diagonal.text(basis=True)),
    ]
    figures = figures_of(analysis, first, ("localization/maps",), View(run=first.run or side.label))
    return Finding(*header, verdict, reason, statement, numbers, figures)

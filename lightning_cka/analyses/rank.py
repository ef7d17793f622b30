"""Effective rank (RankMe, Garrido et al. 2022) of every monitored layer, from the layer Grams CKA already records.

RankMe is ``exp(-Σₖ pₖ log pₖ)`` with ``pₖ = σₖ / Σⱼ σⱼ`` over the singular values ``σ`` of a minibatch's centered
features. The centered Gram ``XXᵀ`` of the shared :class:`LayerGrams` tap has eigenvalues ``σₖ²``, so no activation
is needed (:func:`lightning_cka.functional.rank.effective_rank`). The per-minibatch values are summed per global
minibatch index (DDP-exact) and averaged; stores ``effective_rank`` (+ ``reference_effective_rank``), draws
``rank/effective_rank``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Curves, Figure, Line, Series
from lightning_cka.findings import (
    LEVEL,
    NOT_MEASURED,
    Criteria,
    Criterion,
    Estimate,
    Event,
    Evidence,
    Finding,
    Side,
    figures_of,
    per_side,
    side_estimate,
    threshold_verdict,
)
from lightning_cka.stats import nanmean, t_critical

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap

# The bound line is drawn only when the ranks reach this fraction of it; otherwise it would flatten the curves.
_BOUND_SHOWN_ABOVE = 0.25


class EffectiveRank(Analysis):
    """Effective rank (RankMe) of every monitored layer of the model and the reference, per minibatch (option ``rank``).

    Cheap: it reuses the layer Grams and adds one ``(n, n)`` symmetric eigendecomposition per layer and minibatch
    (the frozen reference's are computed at the first probe only).
    """

    name = "rank"
    default = True
    position = 70
    fields = (
        Field(
            "effective_rank",
            "array",
            "(L,) effective rank (RankMe) of each layer's centered features, mean over minibatches",
            True,
            ("layers",),
        ),
        Field("effective_rank_se", "array", "(L,) its standard error over minibatches", True, ("layers",)),
        Field(
            "effective_rank_minibatches",
            "array",
            "(M, L) effective rank of each layer on each minibatch (NaN: constant or non-finite there)",
            True,
            (None, "layers"),
        ),
        Field(
            "effective_rank_bound",
            "float",
            "mean over minibatches of n - 1, the largest effective rank a minibatch of n centered examples allows",
        ),
    )

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from lightning_cka.taps.grams import LayerGrams

        self._models = dict(setup.models)
        self._taps = {role: LayerGrams(m.layers, m.reduction, m.layouts) for role, m in self._models.items()}
        # A frozen model's Grams never change, so its ranks are kept per minibatch like the engine keeps its Grams.
        self._frozen: dict[str, dict[int, Tensor]] = {role: {} for role, m in self._models.items() if m.frozen}
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._taps[model.role]]

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        from lightning_cka.metrics.sums import TensorSums

        shapes = lambda role: {  # noqa: E731
            "ranks": (num_minibatches, len(self._models[role].layers)),
            "counts": (num_minibatches, len(self._models[role].layers)),
            "sizes": (num_minibatches,),
        }
        self._sums = {role: TensorSums(shapes(role)).to(device) for role in self._models}

    @override
    def update(self, batch: Minibatch) -> None:
        import torch

        from lightning_cka.functional.rank import effective_rank

        for role, tap in self._taps.items():
            cache = self._frozen.get(role)
            if cache is not None and batch.index in cache:
                ranks = cache[batch.index]
            else:
                values = batch.values[role][tap.key]  # a layer's feature count bounds its Gram's rank (cheap if < n)
                ranks = effective_rank(values.grams, max_ranks=values.features)
                if cache is not None:
                    cache[batch.index] = ranks
            finite = torch.isfinite(ranks)
            sums = self._sums[role]
            sums.update("ranks", torch.where(finite, ranks, torch.zeros_like(ranks)), index=batch.index)
            sums.update("counts", finite.double(), index=batch.index)
            sums.update("sizes", torch.tensor(float(batch.size)), index=batch.index)

    @override
    def reduce(self) -> Any:
        return {role: sums.compute() for role, sums in self._sums.items()}

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, sums in reduced.items():
            # torchmetrics squeezes one-element states in compute(): restore the declared shapes.
            shape = (-1, len(self._models[role].layers))
            ranks, counts = sums["ranks"].cpu().numpy().reshape(shape), sums["counts"].cpu().numpy().reshape(shape)
            sizes = sums["sizes"].cpu().numpy().reshape(-1)
            seen = sizes > 0
            per_minibatch = np.where(counts > 0, ranks, np.nan)[seen]  # (M, L)
            total = counts[seen].sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = ranks[seen].sum(axis=0) / total
                deviations = np.where(np.isfinite(per_minibatch), per_minibatch - mean, 0.0)
                se = np.sqrt(np.square(deviations).sum(axis=0) / (total - 1) / total)
            prefix = self._models[role].prefix
            out[f"{prefix}effective_rank"] = np.where(total > 0, mean, np.nan)
            out[f"{prefix}effective_rank_se"] = np.where(total > 1, se, np.nan)
            out[f"{prefix}effective_rank_minibatches"] = per_minibatch
            if role == "model":
                out["effective_rank_bound"] = float((sizes[seen] - 1).mean()) if seen.any() else float("nan")
        return out

    @override
    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        bound = result.effective_rank_bound
        panels, hidden = [], False
        for role in ("model", "reference"):
            part = result.part(role)
            if part.effective_rank is None or part.layers is None:
                continue
            title = "the model" if role == "model" else f"the reference: {result.reference_label or 'reference'}"
            panel, shown = _rank_panel(part.effective_rank, part.effective_rank_se, part.layers, bound, title)
            panels.append(panel)
            hidden |= not shown
        if not panels:
            return []
        limit = f"n - 1 = {bound:g} (n: examples per minibatch)" if bound is not None and np.isfinite(bound) else ""
        caption = (
            "Effective rank (RankMe: exp of the entropy of the normalized singular values) of each layer's centered "
            "features on a probe minibatch, mean over minibatches ± one standard error. It cannot exceed "
            f"{limit or 'n - 1'}{' (off the scale here)' if hidden and limit else ''} nor the layer's feature count. "
            "Collapse looks like a low or falling curve: a few directions carry all the images' variance. Garrido et "
            "al. 2022: a lower RankMe goes with worse downstream accuracy; compare a small-data run with a "
            "large-data one (or with the reference) to see whether it collapses."
        )
        title = "Effective rank of each layer"
        return [Figure("rank/effective_rank", title, tuple(panels), caption, view.subtitle(result))]

    @override
    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
        scalars: dict[str, float] = {}
        ranks = result.effective_rank
        if ranks is None:
            return scalars
        ranks = np.asarray(ranks, dtype=np.float64)
        scalars["rank/mean"] = nanmean(ranks)
        scalars["rank/mean_se"] = _mean_se(result.effective_rank_minibatches, np.isfinite(ranks))
        for name, value in zip(result.layers or [], ranks, strict=False):
            scalars[f"rank/effective_rank/{name}"] = float(value)
        return scalars

    event_fields = ("effective_rank",)
    criteria = (
        Criterion(
            "collapsed",
            2.0,
            "effective rank at or below which a layer's representation counts as collapsed (it varies along about "
            "that many directions across the probe images)",
        ),
        Criterion(
            "rank_drop",
            0.5,
            "a layer's effective rank falling by more than this fraction between two probes is a collapse event",
        ),
    )

    @override
    def findings(self, evidence: Evidence) -> list[Finding]:
        return per_side(evidence, lambda side: _no_collapse(self, side, evidence))

    @override
    def events(self, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
        drop = criteria.value(self, "rank_drop")
        events = []
        for before, now in pairwise(history):
            if before.effective_rank is None or now.effective_rank is None or before.layers != now.layers:
                continue
            for name, old, new in zip(now.layers, before.effective_rank, now.effective_rank, strict=True):
                if np.isfinite(old) and np.isfinite(new) and new < (1 - drop) * old:
                    text = (
                        f"The effective rank of {name} fell from {old:.1f} to {new:.1f} (by {1 - new / old:.0%}) "
                        f"since step {before.step}: its representation now varies along fewer directions "
                        "(expected in the last layers of a classifier as its classes separate; a warning sign in early "
                        "layers)."
                    )
                    events.append(Event(now.step, self.name, "rank_collapse", text, name))
        return events


def _mean_se(per_minibatch: np.ndarray | None, layers: np.ndarray) -> float:
    """Standard error over minibatches of the per-minibatch mean over ``layers``; NaN below 2 usable minibatches.

    When every layer is finite on every minibatch (the usual case), the mean of those per-minibatch means is exactly
    ``rank/mean``, so this is its standard error.
    """
    if per_minibatch is None or np.ndim(per_minibatch) != 2 or not layers.any():
        return float("nan")
    values = np.asarray(per_minibatch, dtype=np.float64)[:, layers]
    values = values[np.isfinite(values).all(axis=1)].mean(axis=1)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(values.size))


def _rank_panel(
    ranks: np.ndarray, se: np.ndarray | None, layers: Sequence[str], bound: float | None, title: str
) -> tuple[Curves, bool]:
    """The ranks over layers, with the ``n - 1`` line when the curve comes near enough to it to keep both legible."""
    ranks = np.asarray(ranks, dtype=np.float64)
    error = None if se is None else np.where(np.isfinite(se), se, 0.0)
    top = float(np.nanmax(ranks + (0 if error is None else error))) if np.isfinite(ranks).any() else 1.0
    lines, shown = (), True
    if bound is not None and np.isfinite(bound):
        shown = top >= _BOUND_SHOWN_ABOVE * bound
        if shown:
            lines = (Line(float(bound), f"bound n - 1 = {bound:g}", style="dotted"),)
            top = max(top, float(bound))
    panel = Curves(
        x=tuple(str(name) for name in layers),
        series=(Series("", ranks, error),),
        x_label="layer",
        y_label="effective rank",
        title=title,
        lines=lines,
        ylim=(0.0, top * 1.12 or 1.0),
    )
    return panel, shown


# ------------------------------------------------------------------------------------------------------------ findings

NO_COLLAPSE = ("rank.no_collapse", "No layer's representation has collapsed")
NO_COLLAPSE_PAPER = (
    "Not in the paper: the effective rank (RankMe, Garrido et al. 2023) counts the directions a layer's features vary "
    "along over the probe images; a layer near 1 has collapsed, whatever its CKA says."
)


def _lowest(result: CKAResult, prefix: str = "") -> tuple[float, float, int]:
    """The lowest effective rank of a model's layers, its standard error, and its layer index."""
    ranks = result.get(f"{prefix}effective_rank")
    if ranks is None or not np.isfinite(ranks).any():
        return float("nan"), float("nan"), -1
    layer = int(np.nanargmin(ranks))
    se = result.get(f"{prefix}effective_rank_se")
    return float(ranks[layer]), float(se[layer]) if se is not None else float("nan"), layer


def _no_collapse(analysis: EffectiveRank, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*NO_COLLAPSE, NO_COLLAPSE_PAPER)
    if first.effective_rank is None:
        return Finding(
            *header, NOT_MEASURED, "the rank analysis did not run", needs="the rank analysis (on by default)"
        )

    def lowest(result: CKAResult) -> Estimate:
        value, se, _ = _lowest(result)
        m = int(result.num_minibatches or 0)
        if not np.isfinite(se) or m < 2:
            return Estimate(value)
        return Estimate(value, float(t_critical(LEVEL, m - 1)) * se, f"se over {m} minibatches")

    low = side_estimate(side, lowest)
    limit = evidence.criterion(analysis, "collapsed")
    what = "lowest effective rank of a layer"
    verdict, reason = threshold_verdict(low, limit, True, what)
    layer = _lowest(first)[2]
    statement = (
        f"The layers vary along {np.nanmin(first.effective_rank):.1f} to {np.nanmax(first.effective_rank):.1f} "
        f"directions (lowest: {first.layers[layer]})."
    )
    if first.reference_effective_rank is not None:
        reference = first.reference_effective_rank
        statement += f" The reference's layers: {np.nanmin(reference):.1f} to {np.nanmax(reference):.1f}."
    numbers = [(what, low.text(1, basis=True)), ("mean over layers", f"{nanmean(first.effective_rank):.1f}")]
    figures = figures_of(analysis, first, ("rank/effective_rank",), View(run=first.run or side.label))
    return Finding(*header, verdict, reason, statement, numbers, figures)

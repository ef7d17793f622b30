"""Layer CKA: every layer of the model against each other, against the reference and against the previous probe.

Taps each model's layer Grams; accumulates the per-minibatch HSIC of [model, previous probe, reference] layers in one
joint :class:`MinibatchCKA` (one matrix product per minibatch, plus one per permutation of the null); stores the
matrices with their jackknife standard errors, leave-one-minibatch-out replicates and null thresholds; draws
``cka/intra``, ``cka/reference``, ``cka/intra_change`` and ``cka/reference_intra``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.cka import NULL_MARK, change_panel, cka_panel
from lightning_cka.figures.spec import Figure
from lightning_cka.stats import NULL_LEVEL, WEIGHTINGS, adjacent_mean, best_matches, jackknife_se, nanmean, offdiag_mean

if TYPE_CHECKING:
    import torch

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap

INTRA_CAPTION = (
    "Bright: two layers represent the probe images alike (1 = the same up to rotation and scale); dark: unrelated. "
    "Raghu et al. 2021: ViT layers look alike throughout, ResNet layers fall into stages."
)


class LayerCKA(Analysis):
    """Minibatch CKA of every pair of monitored layers, with the reference's and with the previous probe's layers.

    Args:
        permutations: permutations of the null per minibatch (19: the 5% permutation test; 0: no null).
        minibatch_weights: ``"equal"`` (every minibatch counts the same) or ``"size"`` (by ``n(n - 3)``, as
            google-research's ``efficient_CKA.py``): how minibatches of unequal size count in the HSIC sums.
    """

    name = "cka"
    default = True
    position = 10
    fields = (
        Field("intra", "array", "(L, L) minibatch CKA of the layers with each other", True, ("layers", "layers")),
        Field(
            "intra_se",
            "array",
            "(L, L) its block-jackknife standard error over minibatches",
            True,
            ("layers", "layers"),
        ),
        Field(
            "intra_null",
            "array",
            "(L, L) its 5% permutation-null threshold (|CKA| above it is real)",
            True,
            ("layers", "layers"),
        ),
        Field(
            "intra_replicates",
            "array",
            "(M, L, L) the CKA with each minibatch left out",
            True,
            ("num_minibatches", "layers", "layers"),
        ),
        Field("layer_features", "ints", "(L,) features of each layer after the reduction", True, ("layers",)),
        Field("layer_notes", "names", "(L,) why a layer's CKA is NaN ('' where it is not)", True),
        Field(
            "reference",
            "array",
            "(L, Lr) CKA of the model's layers (rows) with the reference's (columns)",
            shape=("layers", "reference_layers"),
        ),
        Field("reference_se", "array", "(L, Lr) its standard error", shape=("layers", "reference_layers")),
        Field("reference_null", "array", "(L, Lr) its null threshold", shape=("layers", "reference_layers")),
        Field(
            "reference_replicates",
            "array",
            "(M, L, Lr) its leave-one-minibatch-out replicates",
            shape=("num_minibatches", "layers", "reference_layers"),
        ),
        Field(
            "previous",
            "array",
            "(L, L) CKA of the layers now (rows) with the same layers at the previous probe",
            shape=("layers", "layers"),
        ),
        Field("previous_se", "array", "(L, L) its standard error", shape=("layers", "layers")),
        Field("previous_null", "array", "(L, L) its null threshold", shape=("layers", "layers")),
        Field("num_minibatches", "int", "minibatches of the probe (the jackknife's blocks)"),
        Field("minibatch_sizes", "ints", "(M,) examples in each minibatch", shape=(None,)),
        Field("permutations", "int", "permutations of the null per minibatch (19: the 5% test)"),
        Field("null_level", "float", "level of the null thresholds"),
        Field("minibatch_weights", "text", "'equal' or 'size': how minibatches are weighted in the HSIC sums"),
    )

    def __init__(self, permutations: int = 19, minibatch_weights: str = "equal") -> None:
        owner = type(self).__name__
        self.permutations = check.integer(owner, "permutations", permutations, 0, 1000, "19 give the 5% test")
        self.minibatch_weights = check.choice(owner, "minibatch_weights", minibatch_weights, WEIGHTINGS)

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from lightning_cka.taps.grams import LayerGrams

        self._models = dict(setup.models)
        self._seed = setup.seed
        self._taps = {role: LayerGrams(m.layers, m.reduction, m.layouts) for role, m in self._models.items()}
        self._previous: dict[int, list[Any]] | None = None
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._taps[model.role]]

    @property
    def _blocks(self) -> dict[str, int]:
        """How many layers each block of the joint matrix has: model, previous probe, reference."""
        reference = self._models.get("reference")
        return {
            "model": len(self._models["model"].layers),
            "previous": len(self._models["model"].layers) if self._previous is not None else 0,
            "reference": len(reference.layers) if reference is not None else 0,
        }

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        from lightning_cka.metrics.minibatch_cka import MinibatchCKA
        from lightning_cka.metrics.sums import TensorSums

        total = sum(self._blocks.values())
        self._metric = MinibatchCKA(
            num_layers_a=total,
            num_minibatches=num_minibatches,
            permutations=self.permutations,
            seed=self._seed,
            minibatch_weights=self.minibatch_weights,
            warn=False,
        ).to(device)
        self._flags = TensorSums({"overflow": (total,), "sizes": (num_minibatches,)}).to(device)
        self._current: dict[int, list[Any]] = {}
        self._features: dict[str, list[int]] = {}

    @override
    def update(self, batch: Minibatch) -> None:
        import torch

        model = batch.values["model"][self._taps["model"].key]
        parts, overflow = [model.grams], [model.overflow]
        if self._previous is not None:
            parts.append(self._previous[batch.index])
            overflow.append([torch.zeros((), dtype=torch.bool, device=g.device) for g in model.grams])
        if "reference" in self._taps:
            reference = batch.values["reference"][self._taps["reference"].key]
            parts.append(reference.grams)
            overflow.append(reference.overflow)
            self._features["reference"] = reference.features
        self._features["model"] = model.features
        self._metric.update([g for part in parts for g in part], grams=True, index=batch.index)
        self._flags.update("overflow", torch.stack([f for part in overflow for f in part]).double())
        self._flags.update("sizes", torch.tensor(float(batch.size)), index=batch.index)
        self._current[batch.index] = model.grams

    @override
    def reduce(self) -> Any:
        self._metric.compute()
        flags = self._flags.totals()
        blocks = dict(self._blocks)
        self._previous = self._current  # this probe is the next one's "previous"
        return self._metric.estimate, flags, blocks

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        from lightning_cka.functional.estimate import warn_degenerate

        estimate, flags, blocks = reduced
        value, se, null = (t.cpu().numpy() for t in (estimate.value, estimate.se, estimate.null))
        replicates = estimate.replicates.cpu().numpy()
        overflow = flags["overflow"].cpu().numpy() > 0
        starts = np.cumsum([0, *blocks.values()])
        span = {name: slice(a, b) for name, a, b in zip(blocks, starts[:-1], starts[1:], strict=True)}
        notes = [_note(reason, over) for reason, over in zip(estimate.degenerate_a, overflow, strict=True)]
        model, out = span["model"], {}
        for role, rows in (("model", model), ("reference", span["reference"])):
            if rows.stop == rows.start:
                continue
            prefix = self._models[role].prefix
            out[f"{prefix}intra"] = value[rows, rows]
            out[f"{prefix}intra_se"] = se[rows, rows]
            out[f"{prefix}intra_null"] = null[rows, rows]
            out[f"{prefix}intra_replicates"] = replicates[:, rows, rows]
            out[f"{prefix}layer_features"] = np.asarray(self._features.get(role, []), dtype=np.int64)
            out[f"{prefix}layer_notes"] = notes[rows]
            warn_degenerate(self._models[role].names, notes[rows])
        for cross in ("reference", "previous"):
            cols = span[cross]
            if cols.stop > cols.start:
                out[cross] = value[model, cols]
                out[f"{cross}_se"] = se[model, cols]
                out[f"{cross}_null"] = null[model, cols]
                if cross == "reference":
                    out["reference_replicates"] = replicates[:, model, cols]
        out["num_minibatches"] = estimate.num_minibatches
        out["minibatch_sizes"] = flags["sizes"].cpu().numpy().astype(np.int64)
        out["permutations"] = self.permutations
        out["null_level"] = NULL_LEVEL
        out["minibatch_weights"] = self.minibatch_weights
        return out

    @override
    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        figures = []
        subtitle = view.subtitle(result)
        if result.intra is not None:
            panel = cka_panel(
                result.intra,
                result.layers,
                result.layers,
                se=result.intra_se,
                null=result.intra_null,
                joint=True,
                title="rows and columns: the model's layers",
            )
            figures.append(Figure("cka/intra", "CKA between the model's layers", (panel,), _caption(panel), subtitle))
        if result.reference is not None:
            who = result.reference_label or "the reference model"
            panel = cka_panel(
                result.reference,
                result.layers,
                result.reference_layers,
                se=result.reference_se,
                null=result.reference_null,
                title=f"columns: {who}",
                row_label="model layer",
                col_label="reference layer",
            )
            caption = (
                "Each model layer (row) against each layer of the reference (column). Raghu et al. 2021: the "
                "lower half of a ResNet matches the lowest quarter of a ViT; the top ViT layers match no "
                "ResNet layer. "
            )
            figures.append(
                Figure(
                    "cka/reference",
                    "CKA of the model with the reference",
                    (panel,),
                    caption + _marks_caption(panel),
                    subtitle,
                )
            )
        if result.reference_intra is not None and previous is None:  # frozen: it never changes within a run
            who = result.reference_label or "the reference model"
            panel = cka_panel(
                result.reference_intra,
                result.reference_layers,
                result.reference_layers,
                se=result.reference_intra_se,
                null=result.reference_intra_null,
                joint=True,
                title=f"rows and columns: {who}",
            )
            figures.append(
                Figure("cka/reference_intra", "CKA between the reference's layers", (panel,), _caption(panel), subtitle)
            )
        if _comparable(result, previous):
            figures.append(_change_figure(result, previous, subtitle))
        return figures

    @override
    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
        scalars: dict[str, float] = {}
        intra, layers = result.intra, result.layers
        if intra is not None and len(layers) > 1:
            for name, summary in (("offdiag_mean", offdiag_mean), ("adjacent_mean", adjacent_mean)):
                scalars[f"cka/{name}"] = summary(intra)
                scalars[f"cka/{name}_se"] = jackknife_se(summary, result.intra_replicates)
        if result.previous is not None:
            for name, value in zip(layers, np.diagonal(result.previous), strict=True):
                scalars[f"cka_vs_previous/{name}"] = float(value)
        if result.reference is not None:
            best_mean = lambda matrix: nanmean(best_matches(matrix)[1])  # noqa: E731
            scalars["cka/reference_best_mean"] = best_mean(result.reference)
            scalars["cka/reference_best_mean_se"] = jackknife_se(best_mean, result.reference_replicates)
            for name, best, value in zip(layers, *best_matches(result.reference), strict=True):
                scalars[f"cka_reference/best_value/{name}"] = float(value)
                scalars[f"cka_reference/best_layer/{name}"] = float(best)
        return scalars


def _comparable(result: CKAResult, previous: CKAResult | None) -> bool:
    return (
        previous is not None
        and result.intra is not None
        and previous.intra is not None
        and previous.layers == result.layers
    )


def _change_figure(result: CKAResult, previous: CKAResult, subtitle: str) -> Figure:
    change = result.intra - previous.intra
    panel = change_panel(change, result.layers, result.layers, title=f"step {previous.step} to {result.step}")
    finite = change[np.isfinite(change)]
    extent = f"changes from {finite.min():+.2g} to {finite.max():+.2g}" if finite.size else "no change"
    caption = f"Red: two layers became more alike since the previous probe, blue: less alike ({extent})."
    return Figure("cka/intra_change", "Change of CKA between the model's layers", (panel,), caption, subtitle)


def _note(reason: str, overflow: bool) -> str:
    if reason == "not finite" and overflow:
        return "overflow: finite features too large for a float32 Gram (scale them down or probe in float64)"
    return {
        "not finite": "NaN/inf in its output",
        "constant": "constant on the probe images",
        "negative self-HSIC": "negative self-HSIC: too few examples per minibatch",
    }.get(reason, reason)


def _marks_caption(panel: Any) -> str:
    return f"Dots: {NULL_MARK.split(': ', 1)[1]}." if panel.marked is not None and panel.marked.any() else ""


def _caption(panel: Any) -> str:
    return f"{INTRA_CAPTION} {_marks_caption(panel)}".strip()

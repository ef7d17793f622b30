"""Layer CKA: every layer of the model against each other, against the reference and against the previous probe.

Taps each model's layer Grams; accumulates the per-minibatch HSIC of [model, previous probe, reference] layers in one
joint :class:`MinibatchCKA` (one matrix product per minibatch, plus one per permutation of the null); stores the
matrices with their jackknife standard errors, leave-one-minibatch-out replicates and null thresholds; draws
``cka/intra``, ``cka/reference``, ``cka/intra_change`` and ``cka/reference_intra``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.cka import NULL_MARK, change_panel, cka_panel
from lightning_cka.figures.spec import Figure
from lightning_cka.findings import (
    NOT_MEASURED,
    Criteria,
    Criterion,
    Estimate,
    Event,
    Evidence,
    Finding,
    Side,
    architecture,
    bare,
    combine,
    figures_of,
    jackknife_estimate,
    named,
    per_side,
    replicate_estimate,
    sentence,
    side_estimate,
    threshold_verdict,
    transformer,
)
from lightning_cka.stats import (
    NULL_LEVEL,
    WEIGHTINGS,
    adjacent_mean,
    best_matches,
    jackknife_se,
    nanmean,
    offdiag_mean,
    t_critical,
)

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
        Field(
            "influence_share",
            "array",
            "(L,) share of each model layer's self-similarity carried by its k = max(1, ceil(N/100)) most influential "
            "probe images: image i carries c_i = Σ_j Ku[i, j]² of its minibatch's U-centered Gram Ku (Σ_i c_i = "
            "n(n-3)·HSIC₁), weighted as the minibatch's HSIC counts in the sums; about k/N when no image stands out, "
            "about 1/2 or more when one image dominates (each pair counts half to each of its two images); NaN for a "
            "layer whose Grams are not finite or zero (Davari et al. 2022: a few images can drive CKA)",
            shape=("layers",),
        ),
        Field(
            "influence_images",
            "ints",
            "(L, k) the probe indices of those k images per model layer, most influential first (-1 where the share "
            "is NaN)",
            shape=("layers", None),
        ),
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
        self._influence: list[tuple[int, Any]] = []  # (probe index of the minibatch's first image, (n, L) c_i)
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
        self._influence.append((batch.start, _image_influence(model.grams, self.minibatch_weights)))
        self._current[batch.index] = model.grams

    @override
    def reduce(self) -> Any:
        from lightning_cka.metrics.sums import TensorSums

        self._metric.compute()
        flags = self._flags.totals()
        blocks = dict(self._blocks)
        self._previous = self._current  # this probe is the next one's "previous"
        # Per-image influence: every rank knows the probe's size from the summed minibatch sizes.
        num_images, num_layers = int(flags["sizes"].sum()), blocks["model"]
        influence = TensorSums({"influence": (num_images, num_layers)}).to(flags["sizes"].device)
        for start, values in self._influence:
            influence.update("influence", values, index=slice(start, start + values.shape[0]))
        return self._metric.estimate, flags, blocks, influence.totals()["influence"]

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        from lightning_cka.functional.estimate import warn_degenerate

        estimate, flags, blocks, influence = reduced
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
        out["influence_share"], out["influence_images"] = _top_influence(influence.cpu().numpy())
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
            caption = f"{_caption(panel)} {_se_caption(result, 'intra')}".strip()
            figures.append(Figure("cka/intra", "CKA between the model's layers", (panel,), caption, subtitle))
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
            kind = architecture(result, "reference")
            caption = (
                f"Each model layer (row) against each layer of the reference, {bare(kind)} (column). Raghu et al. "
                "2021, a ViT against a ResNet: the lower half of the ResNet matches the lowest quarter of the ViT; "
                "the top ViT layers match no ResNet layer."
            )
            caption = " ".join(p for p in (caption, _marks_caption(panel), _se_caption(result, "reference")) if p)
            figures.append(Figure("cka/reference", "CKA of the model with the reference", (panel,), caption, subtitle))
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
                Figure(
                    "cka/reference_intra",
                    "CKA between the reference's layers",
                    (panel,),
                    f"{_caption(panel)} {_se_caption(result, 'reference_intra')}".strip(),
                    subtitle,
                )
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
        share = result.get("influence_share")
        if share is not None and np.isfinite(share).any():
            scalars["cka/influence_share_max"] = float(np.nanmax(share))
        if result.reference is not None:
            best_mean = lambda matrix: nanmean(best_matches(matrix)[1])  # noqa: E731
            scalars["cka/reference_best_mean"] = best_mean(result.reference)
            scalars["cka/reference_best_mean_se"] = jackknife_se(best_mean, result.reference_replicates)
            for name, best, value in zip(layers, *best_matches(result.reference), strict=True):
                scalars[f"cka_reference/best_value/{name}"] = float(value)
                scalars[f"cka_reference/best_layer/{name}"] = float(best)
        return scalars

    event_fields = ("previous", "reference", "reference_se", "num_minibatches", "influence_share", "influence_images")
    criteria = (
        Criterion(
            "far_alike",
            0.5,
            "mean CKA of the layer pairs at least half the monitored depth apart: at or above it a model's layers "
            "count as alike throughout (the paper's ViTs), below it as falling into stages (its ResNets)",
        ),
        Criterion(
            "lower_share",
            0.5,
            "share of the CNN's lower-half layers whose best-matching ViT layer lies in the ViT's lowest quarter: "
            "above it, the lower layers correspond as in the paper",
        ),
        Criterion(
            "top_drop",
            0.1,
            "how much lower the best CNN match of the ViT's top quarter is than that of its lowest quarter (CKA): "
            "above it, the top layers match the CNN less, as in the paper",
        ),
        Criterion(
            "stable",
            0.99,
            "CKA of a layer with itself at the previous probe at or above which it did not change (event)",
        ),
        Criterion("stable_probes", 3, "probes in a row a layer must stay unchanged to have stopped changing (event)"),
        Criterion(
            "match",
            0.6,
            "best CKA of a model layer with a reference layer: the layer starts matching the reference once its 95 % "
            "interval is above this, and stops once it is below (event)",
        ),
        Criterion(
            "influence",
            0.25,
            "share of a layer's self-similarity (unbiased self-HSIC) carried by its 1 % most influential probe images: "
            "above it a few images drive the layer's CKA (a caveat in the report, an event while training); i.i.d. "
            "images give 1-3 % at 256 images, one outlier of huge norm about half (each pair is shared by two images)",
        ),
    )

    @override
    def findings(self, evidence: Evidence) -> list[Finding]:
        return [
            *per_side(evidence, lambda side: _structure(self, side, evidence)),
            *per_side(evidence, lambda side: _correspondence(self, side, evidence)),
        ]

    @override
    def events(self, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
        return [
            *_stable_events(self, history, criteria),
            *_match_events(self, history, criteria),
            *_influence_events(self, history, criteria),
        ]


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


def _image_influence(grams: list[Any], weighting: str) -> Any:
    """``(n, L)`` each image's share of each layer's unbiased self-HSIC on one minibatch, as the sums weight it.

    ``c_i = Σ_j Ku[i, j]²`` of the U-centered Gram ``Ku`` (``Σ_i c_i = ⟨Ku, Ku⟩ = n(n-3)·HSIC₁``), divided by
    ``n(n-3)`` when every minibatch's HSIC counts the same (``"equal"``), as it is under ``"size"``: summed over the
    minibatches, the contributions add up to the self-HSIC total the CKA is normalized with. NaN for non-finite Grams.
    U-centering as :func:`lightning_cka.functional.hsic_unbiased` does it (``Ku = K̃ - a_i - a_j + Σa/(n-1)`` off the
    diagonal, 0 on it, ``a = K̃1/(n-2)``, ``K̃``: the Gram with its diagonal zeroed), in float64, on about 1 MiB of
    Grams at a time (a few layers: in cache, 5x faster than centering the whole stack at 24 layers of 256 images).
    """
    import torch

    n, num_layers = grams[0].shape[0], len(grams)
    out = torch.empty((n, num_layers), dtype=torch.float64, device=grams[0].device)
    step = max(1, 2**20 // (n * n * 8))
    with torch.autocast(grams[0].device.type, enabled=False):
        for start in range(0, num_layers, step):
            k = torch.stack([g.to(torch.float64) for g in grams[start : start + step]])  # (l, n, n) copies
            k.diagonal(dim1=1, dim2=2).zero_()
            a = k.sum(dim=2) / (n - 2)
            k -= (a - a.sum(dim=1, keepdim=True) / (n - 1))[:, :, None]
            k -= a[:, None, :]
            k.diagonal(dim1=1, dim2=2).zero_()
            out[:, start : start + step] = torch.linalg.vector_norm(k, dim=2).square().T
    if weighting == "equal":
        out /= n * (n - 3)
    return out


def _top_influence(influence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the share of its k = max(1, ceil(N/100)) largest contributions, and their probe indices.

    ``influence`` is ``(N, L)``; the indices come largest first (ties: the lower index); NaN and -1 where a layer's
    contributions are not finite or sum to 0.
    """
    num_images, num_layers = influence.shape
    k = max(1, int(np.ceil(0.01 * num_images)))
    share = np.full(num_layers, np.nan)
    images = np.full((num_layers, k), -1, dtype=np.int64)
    for layer in range(num_layers):
        values = influence[:, layer]
        total = values.sum()
        if not (np.isfinite(values).all() and total > 0):
            continue
        top = np.argsort(-values, kind="stable")[:k]
        share[layer], images[layer] = values[top].sum() / total, top
    return share, images


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


def _se_caption(result: CKAResult, key: str) -> str:
    """How large the heatmap's standard errors are, on how many minibatches they rest, and how to read them."""
    se, m = result.get(f"{key}_se"), int(result.num_minibatches or 0)
    if se is None or m < 2:
        return "One minibatch: no standard errors." if m == 1 else ""
    finite = np.abs(se[np.isfinite(se)])
    if not finite.size:
        return ""
    t = float(t_critical(0.95, m - 1))
    few = " (too few for a reliable error: probe in 4 or more)" if m < 4 else ""
    return (
        f"Standard errors: median {np.median(finite):.3f}, largest {finite.max():.3f} (block jackknife over {m} "
        f"minibatches{few}); a 95 % interval is ± {t:.2f} se."
    )


def _caption(panel: Any) -> str:
    return f"{INTRA_CAPTION} {_marks_caption(panel)}".strip()


# ------------------------------------------------------------------------------------------------------------ findings

STRUCTURE = ("cka.structure", "Layers alike throughout, or in stages")
STRUCTURE_PAPER = (
    "ViT layers are uniformly similar to each other; ResNet layers fall into distinct stages (Raghu et al. 2021, "
    "Figure 1)."
)
CORRESPONDENCE = ("cka.correspondence", "Which layers of the two models match")
CORRESPONDENCE_PAPER = (
    "The lower half of the ResNet's layers matches the lowest quarter of the ViT's; the top ViT layers match no ResNet "
    "layer well (Figure 2)."
)


def far_mean(intra: np.ndarray) -> float:
    """Mean CKA of the layer pairs at least half the depth apart (``|i - j| >= ceil(L / 2)``): low when in stages.

    Example:
        >>> far_mean(np.array([[1.0, 0.9, 0.2], [0.9, 1.0, 0.8], [0.2, 0.8, 1.0]]))  # only (0, 2) is far enough
        0.2
    """
    n = len(intra)
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, k=max(1, -(-n // 2)))
    return nanmean(np.asarray(intra)[i, j])


def _structure(analysis: LayerCKA, side: Side, evidence: Evidence) -> Finding | None:
    first = side.last[0]
    if first.intra is None:
        return None
    threshold = evidence.criterion(analysis, "far_alike")
    verdicts, reasons, numbers, said = [], [], [], []
    for role, prefix in (("model", ""), ("reference", "reference_")):
        if first.get(f"{prefix}intra") is None:
            continue
        who, kind = named(architecture(first, role)), transformer(first, role)
        far = side_estimate(
            side, lambda r, p=prefix: jackknife_estimate(r, far_mean, f"{p}intra", f"{p}intra_replicates")
        )
        ends = side_estimate(
            side,
            lambda r, p=prefix: jackknife_estimate(r, lambda m: float(m[0, -1]), f"{p}intra", f"{p}intra_replicates"),
        )
        numbers += [
            (f"{who}: CKA of layers at least half the depth apart", far.text(basis=True)),
            (f"{who}: CKA of its first and last monitored layer", ends.text(basis=True)),
        ]
        alike = "alike throughout" if far.value >= threshold else "in stages"
        said.append(f"{who}'s layers are {alike} (far-layer CKA {far.text()})")
        if kind is None:
            verdicts.append(NOT_MEASURED)
            reasons.append(f"whether {who} is a transformer is unknown without the attention analysis")
            continue
        verdict, reason = threshold_verdict(far, threshold, bool(kind), f"{who}'s far-layer CKA")
        verdicts.append(verdict)
        reasons.append(reason)
    needs = ""
    if first.get("reference_intra") is None:
        needs = (
            "a reference model of the other kind (CKAMonitor(reference=...)) puts its layers beside these, as in the "
            "paper's Figure 1"
        )
    elif NOT_MEASURED in verdicts:
        needs = "the attention analysis (it tells which model is the transformer)"
    statement = sentence("; ".join(said)) + _influence_caveat(analysis, first, evidence)
    tags = ("cka/intra", "cka/reference_intra")
    figures = figures_of(analysis, first, tags, View(run=first.run or side.label))
    return Finding(
        *STRUCTURE, STRUCTURE_PAPER, combine(verdicts), "; ".join(reasons), statement, numbers, figures, needs
    )


def _influence_caveat(analysis: LayerCKA, result: CKAResult, evidence: Evidence) -> str:
    share = result.get("influence_share")
    if share is None or not np.isfinite(share).any():
        return ""
    limit = evidence.criterion(analysis, "influence")
    worst = int(np.nanargmax(share))
    if share[worst] <= limit:
        return ""
    return (
        f" Caveat: in {result.layers[worst]}, the 1 % most influential probe images carry {share[worst]:.0%} of its "
        "self-similarity, so a few images drive its CKA (their probe indices: influence_images)."
    )


def _correspondence(analysis: LayerCKA, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*CORRESPONDENCE, CORRESPONDENCE_PAPER)
    if first.reference is None:
        needs = "a CNN reference for a ViT (or a ViT reference for a CNN): CKAMonitor(reference=...)"
        return Finding(*header, NOT_MEASURED, "the runs have no reference model", needs=needs)
    kinds = transformer(first), transformer(first, "reference")
    if kinds not in ((True, False), (False, True)):
        who = f"{named(architecture(first))} and {named(architecture(first, 'reference'))}"
        reason = f"the paper's correspondence is between a ViT and a CNN; {who} are not one of each, as far as known"
        return Finding(*header, NOT_MEASURED, reason, needs="a reference of the other kind (a CNN for a ViT)")
    vit_rows = kinds[0]
    vit, cnn = (
        named(architecture(first, role)) for role in (("model", "reference") if vit_rows else ("reference", "model"))
    )

    def oriented(matrix: np.ndarray) -> np.ndarray:  # (..., ViT layers, CNN layers)
        return matrix if vit_rows else np.swapaxes(matrix, -1, -2)

    def lower_share(result: CKAResult) -> Estimate:
        matrix = oriented(result.reference)  # (Lv, Lc)
        quarter, half = -(-matrix.shape[0] // 4), -(-matrix.shape[1] // 2)
        best_vit, _ = best_matches(matrix[:, :half].T)  # each lower-half CNN layer's best ViT layer
        return Estimate(float(np.mean((best_vit >= 0) & (best_vit < quarter))))

    def top_drop(result: CKAResult) -> Estimate:
        def drop(matrix: np.ndarray) -> float:
            best = best_matches(matrix)[1]
            quarter = -(-len(best) // 4)
            return nanmean(best[:quarter]) - nanmean(best[-quarter:])

        reps = result.get("reference_replicates")
        replicates = [] if reps is None else [drop(r) for r in oriented(np.asarray(reps))]
        return replicate_estimate(drop(oriented(result.reference)), replicates, evidence.level)

    share, drop = side_estimate(side, lower_share), side_estimate(side, top_drop)
    share_what = f"share of {cnn}'s lower-half layers whose best match is in {vit}'s lowest quarter"
    drop_what = f"best-match CKA of {vit}'s lowest quarter minus its top quarter"
    parts = [
        threshold_verdict(share, evidence.criterion(analysis, "lower_share"), True, share_what),
        threshold_verdict(drop, evidence.criterion(analysis, "top_drop"), True, drop_what),
    ]
    matrix = oriented(first.reference)
    vit_names, cnn_names = (
        (first.layers, first.reference_layers) if vit_rows else (first.reference_layers, first.layers)
    )
    best, value = best_matches(matrix)
    null = None if first.reference_null is None else oriented(first.reference_null)
    lines = [f"{name} → {cnn_names[b]} ({v:.2f})" for name, b, v in zip(vit_names, best, value, strict=True) if b >= 0]
    unmatched = [
        name
        for i, (name, v) in enumerate(zip(vit_names, value, strict=True))
        if null is not None and np.isfinite(v) and v <= np.nanmax(null[i])
    ]
    statement = f"The best-matching {bare(cnn)} layer of each {bare(vit)} layer: {', '.join(lines)}."
    if unmatched:
        statement += f" {', '.join(unmatched)} match no {bare(cnn)} layer beyond unrelated images (the null)."
    numbers = [(share_what, share.text(2, basis=True)), (drop_what, drop.text(basis=True))]
    figures = figures_of(analysis, first, ("cka/reference",), View(run=first.run or side.label))
    return Finding(
        *header,
        combine([verdict for verdict, _ in parts]),
        "; ".join(reason for _, reason in parts),
        statement,
        numbers,
        figures,
    )


# -------------------------------------------------------------------------------------------------------------- events


def _stable_events(analysis: LayerCKA, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
    """A layer whose CKA with its previous probe stayed at or above ``stable`` for ``stable_probes`` probes."""
    stable, needed = criteria.value(analysis, "stable"), max(1, int(criteria.value(analysis, "stable_probes")))
    streaks: dict[str, list[float]] = {}
    events = []
    for result in history:
        if result.previous is None:
            streaks = {}
            continue
        for name, value in zip(result.layers, np.diagonal(result.previous), strict=True):
            run = streaks.setdefault(name, [])
            run.append(float(value)) if value >= stable else run.clear()
            if len(run) == needed:
                values = ", ".join(f"{v:.3f}" for v in run)
                events.append(
                    Event(
                        result.step,
                        analysis.name,
                        "block_stable",
                        f"{name} stopped changing: its CKA with itself at the previous probe was at or above "
                        f"{stable:g} for {needed} probes in a row ({values}).",
                        name,
                    )
                )
    return events


def _match_events(analysis: LayerCKA, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
    """A model layer whose best CKA with a reference layer rose clearly above ``match`` or fell clearly below it."""
    match = criteria.value(analysis, "match")
    state: dict[str, bool] = {}
    events = []
    for result in history:
        if result.reference is None:
            continue
        best, value = best_matches(result.reference)
        se = result.reference_se
        m = int(result.num_minibatches or 0)
        t = float(t_critical(0.95, m - 1)) if m >= 2 else 0.0
        for i, name in enumerate(result.layers):
            if best[i] < 0:
                continue
            half = t * float(se[i, best[i]]) if se is not None and np.isfinite(se[i, best[i]]) else 0.0
            low, high = value[i] - half, value[i] + half
            now = True if low > match else False if high < match else None
            before = state.get(name)
            if now is not None and before is not None and now != before:
                other = result.reference_layers[best[i]]
                kind, verb = ("matching", "now matches") if now else ("not_matching", "no longer matches")
                events.append(
                    Event(
                        result.step,
                        analysis.name,
                        kind,
                        f"{name} {verb} the reference: its best CKA, with {other}, is {value[i]:.3f} ± {half:.3f}, "
                        f"{'above' if now else 'below'} {match:g}.",
                        name,
                    )
                )
            if now is not None:
                state[name] = now
    return events


def _influence_events(analysis: LayerCKA, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
    """A probe where a few images carry most of a layer's self-similarity (once per stretch of such probes)."""
    limit = criteria.value(analysis, "influence")
    dominated_before = False
    events = []
    for result in history:
        share = result.get("influence_share")
        if share is None or not np.isfinite(share).any():
            continue
        worst = int(np.nanargmax(share))
        dominated = bool(share[worst] > limit)
        if dominated and not dominated_before:
            images = result.get("influence_images")
            which = f" (probe images {', '.join(str(int(i)) for i in images[worst][:5])})" if images is not None else ""
            events.append(
                Event(
                    result.step,
                    analysis.name,
                    "influence",
                    f"A few images dominate {result.layers[worst]}: the 1 % most influential carry "
                    f"{share[worst]:.0%} of its self-similarity{which}, so they drive its CKA.",
                    result.layers[worst],
                )
            )
        dominated_before = dominated
    return events

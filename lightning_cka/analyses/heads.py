"""CKA of every attention head with every reference layer (Raghu et al. 2021).

Taps the input of each timm attention module's output projection ``attn.proj``: ``(B, T, H·d)``, head-major, so head
``h`` is channels ``h·d:(h+1)·d``. Each head's ``(B, T, d)`` slice is reduced like the model's layers and turned into
its centered Gram in the hook (:class:`lightning_cka.taps.heads.HeadGrams`); the reference's layer Grams come from the
shared :class:`LayerGrams` tap (the one layer CKA uses). One cross-mode :class:`MinibatchCKA` (all heads of all
attention modules against the reference layers) accumulates the HSIC per minibatch, so each head's CKA gets a jackknife
standard error and a permutation-null threshold. Stores ``head_reference`` (+ ``_se``, ``_null``) and ``head_layers``;
draws ``attention/heads_vs_reference`` (each head's CKA with the reference's lower layers against its mean attention
distance, from the attention analysis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Figure, Line, Scatter, Series
from lightning_cka.findings import (
    CANNOT_TELL,
    DOES_NOT,
    NOT_MEASURED,
    SHOWS,
    Criterion,
    Estimate,
    Evidence,
    Finding,
    Side,
    architecture,
    figures_of,
    named,
    per_side,
    side_estimate,
    threshold_verdict,
)
from lightning_cka.stats import WEIGHTINGS, nanmean, rankdata, spearman

if TYPE_CHECKING:
    import torch

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap

# Up to this many attention layers every series is named in the legend; beyond it the renderer colours them as a ramp
# (it has 10 categorical colours) and only the ends are named, so that 12 legend rows never cover the points.
_NAMED_SERIES = 10


class HeadCKA(Analysis):
    """Minibatch CKA of every attention head's output with every reference layer.

    Applies to a model with timm attention modules next to a reference. The figure ``attention/heads_vs_reference``
    puts each head's *lower-reference CKA* (its mean CKA over the first third of the reference's layers, rounded down,
    at least one layer) against its mean attention distance.

    Args:
        permutations: permutations of the null per minibatch (19: the 5% permutation test; 0: no null).
        minibatch_weights: ``"equal"`` or ``"size"``: how minibatches count in the HSIC sums (see :class:`LayerCKA`).
    """

    name = "heads"
    default = True
    position = 30
    fields = (
        Field(
            "head_reference",
            "array",
            "(La, H, Lr) CKA of each head (attention layer, head) with each reference layer; NaN for missing heads",
            shape=("head_layers", "H", "reference_layers"),
        ),
        Field(
            "head_reference_se",
            "array",
            "(La, H, Lr) its block-jackknife standard error over minibatches",
            shape=("head_layers", "H", "reference_layers"),
        ),
        Field(
            "head_reference_null",
            "array",
            "(La, H, Lr) its 5% permutation-null threshold",
            shape=("head_layers", "H", "reference_layers"),
        ),
        Field("head_layers", "names", "(La,) the attention modules whose heads are compared"),
    )

    def __init__(self, permutations: int = 19, minibatch_weights: str = "equal") -> None:
        owner = type(self).__name__
        self.permutations = check.integer(owner, "permutations", permutations, 0, 1000, "19 give the 5% test")
        self.minibatch_weights = check.choice(owner, "minibatch_weights", minibatch_weights, WEIGHTINGS)

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from lightning_cka.taps.attention import attention_sites
        from lightning_cka.taps.attention_site import READABLE
        from lightning_cka.taps.grams import LayerGrams, TokenLayout, token_layout
        from lightning_cka.taps.heads import HeadGrams, head_dim
        from lightning_cka.taps.layers import display_names

        model, reference = setup.models["model"], setup.models.get("reference")
        sites = attention_sites(model.modules)
        if reference is None:
            return "it compares every attention head with the layers of a reference model, and there is none"
        if not sites:
            name = model.label or type(model.module).__name__
            return f"{name} has no attention module it reads ({READABLE})"
        try:
            head_dims = [head_dim(model.modules, site) for site in sites]
        except ValueError as err:
            return str(err)
        layouts = []
        for site in sites:
            layout = token_layout(model.modules, site.name)
            layouts.append(TokenLayout(site.num_prefix_tokens, layout.has_class_token, False))
        self._model, self._reference, self._seed = model, reference, setup.seed
        self._sites = sites
        self._head_tap = HeadGrams(sites, head_dims, model.reduction, layouts)
        self._reference_tap = LayerGrams(reference.layers, reference.reduction, reference.layouts)  # shared key
        self._names = display_names(model.module, [site.name for site in sites])
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._head_tap] if model.role == "model" else [self._reference_tap]

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        from lightning_cka.metrics.minibatch_cka import MinibatchCKA

        self._metric = MinibatchCKA(
            num_layers_a=sum(site.num_heads for site in self._sites),
            num_layers_b=len(self._reference.layers),
            num_minibatches=num_minibatches,
            permutations=self.permutations,
            seed=self._seed,
            minibatch_weights=self.minibatch_weights,
            warn=False,
        ).to(device)

    @override
    def update(self, batch: Minibatch) -> None:
        heads = [g for layer in batch.values["model"][self._head_tap.key] for g in layer]
        reference = batch.values["reference"][self._reference_tap.key].grams
        self._metric.update(heads, reference, grams=True, index=batch.index)

    @override
    def reduce(self) -> Any:
        self._metric.compute()
        return self._metric.estimate

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        from lightning_cka.functional.estimate import warn_degenerate

        estimate = reduced
        heads = [site.num_heads for site in self._sites]
        starts = np.cumsum([0, *heads])
        labels = [f"{name} head {h}" for name, count in zip(self._names, heads, strict=True) for h in range(count)]
        warn_degenerate(labels, estimate.degenerate_a)
        out: dict[str, Any] = {"head_layers": list(self._names)}
        for key, values in (("", estimate.value), ("_se", estimate.se), ("_null", estimate.null)):
            flat = values.cpu().numpy()  # (all heads, Lr)
            padded = np.full((len(heads), max(heads), flat.shape[1]), np.nan)
            for layer, (start, count) in enumerate(zip(starts[:-1], heads, strict=True)):
                padded[layer, :count] = flat[start : start + count]
            out[f"head_reference{key}"] = padded
        return out

    @override
    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        lower, used = lower_reference_cka(result.head_reference, result.reference_layers)
        distances = _aligned_distances(result)
        if lower is None or distances is None:
            return []
        series = []
        for name, dist, cka in zip(result.head_layers, distances, lower, strict=True):
            points = np.stack([dist, cka], axis=1)  # (H, 2); NaN pads are not drawn
            if np.isfinite(points).all(axis=1).any():
                series.append(Series(str(name), points))
        if not series:
            return []
        names = [series.label for series in series]
        if len(series) > _NAMED_SERIES:  # a colour ramp: name its two ends, so that the legend leaves the points free
            series = [s if i in (0, len(series) - 1) else Series("", s.values) for i, s in enumerate(series)]
        lines, local = [], ""
        uniform = result.uniform_attention_distance
        finite = distances[np.isfinite(distances) & np.isfinite(lower)]
        if uniform and np.isfinite(uniform) and finite.size:
            threshold = _local_fraction(result, view) * uniform
            if finite.min() <= threshold <= finite.max():
                lines.append(Line(threshold, f"local below {threshold:.1f} px", axis="x", style="dashed"))
            else:  # off the axis: a line there would stretch it and squeeze the points into a corner
                where = "above" if finite.min() > threshold else "below"
                local = f" Every head is {where} the local threshold ({threshold:.1f} px)."
        rho = spearman(distances, lower)
        correlation = f"{rho:+.2f}" if np.isfinite(rho) else "not defined (fewer than 3 heads with both values)"
        panel = Scatter(
            series=tuple(series),
            x_label="mean attention distance (pixels)",
            y_label="CKA with lower reference layers",
            title=f"y: mean CKA with the reference's {_span(used)}",
            lines=tuple(lines),
        )
        caption = (
            "One point per head, coloured by attention layer. x: how far it attends; y: the CKA of its output with "
            "the reference's lower layers (the first third of them). Spearman rank correlation over all heads: "
            f"{correlation}.{local} Raghu et al. 2021: local heads are the most similar to the lower ResNet layers "
            "(CKA ~0.6), falling to ~0.25 as the distance grows."
        )
        title = "CKA of each head vs its attention distance"
        figure = Figure(
            "attention/heads_vs_reference", title, (panel,), caption, view.subtitle(result), {"series_layers": names}
        )
        return [figure]

    @override
    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
        scalars: dict[str, float] = {}
        lower, _ = lower_reference_cka(result.head_reference, result.reference_layers)
        if lower is None:
            return scalars
        distances = _aligned_distances(result)
        if distances is not None:
            scalars["heads/distance_cka_spearman"] = spearman(distances, lower)
        for name, heads in zip(result.head_layers or [], lower, strict=False):
            scalars[f"heads/lower_reference_cka/{name}"] = nanmean(heads)
        return scalars

    criteria = (
        Criterion(
            "max_rho",
            0.0,
            "Spearman correlation over heads of mean attention distance with CKA to the reference's lower layers: "
            "below it (and, for one run, a permutation test over heads at the report's alpha) local heads are the "
            "more CNN-like",
        ),
    )

    @override
    def findings(self, evidence: Evidence) -> list[Finding]:
        return per_side(evidence, lambda side: _local_like_cnn(self, side, evidence))


def lower_reference_cka(
    head_reference: np.ndarray | None, reference_layers: Sequence[str] | None = None
) -> tuple[np.ndarray | None, list[str]]:
    """Each head's CKA with the reference's lower layers: the mean over its first third of layers (at least one).

    Args:
        head_reference: ``(La, H, Lr)`` CKA of the heads with the reference layers, or ``None``.
        reference_layers: the reference layers' names (for the caption).

    Returns:
        ``(La, H)`` the mean over the first ``max(1, Lr // 3)`` reference layers of the finite values (NaN where none
        is), and the names of those layers; ``(None, [])`` without ``head_reference``.

    Example:
        >>> import numpy as np
        >>> cka = np.array([[[0.6, 0.4, 0.2, 0.1, 0.0, 0.0]]])  # one layer, one head, six reference layers
        >>> lower, used = lower_reference_cka(cka, ["a", "b", "c", "d", "e", "f"])
        >>> lower.round(3).tolist(), used
        ([[0.5]], ['a', 'b'])
    """
    if head_reference is None or np.ndim(head_reference) != 3 or np.shape(head_reference)[2] == 0:
        return None, []
    values = np.asarray(head_reference, dtype=np.float64)
    count = max(1, values.shape[2] // 3)
    lower = values[..., :count]
    finite = np.isfinite(lower)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, lower, 0.0).sum(axis=2) / finite.sum(axis=2)
    names = list(reference_layers or [f"#{i}" for i in range(values.shape[2])])[:count]
    return np.where(finite.any(axis=2), mean, np.nan), names


def _aligned_distances(result: CKAResult) -> np.ndarray | None:
    """``(La, H)`` each head's mean attention distance, in the rows and head order of ``head_reference`` (NaN pads)."""
    distances, names = result.mean_attention_distance, result.attention_layers
    if result.head_reference is None or distances is None or names is None or result.head_layers is None:
        return None
    rows, heads = np.shape(result.head_reference)[:2]
    out = np.full((rows, heads), np.nan)
    position = {str(name): i for i, name in enumerate(names)}
    for row, name in enumerate(result.head_layers):
        if str(name) in position:  # a module the attention analysis left out (PiT's pooled stages) has no distance
            found = np.asarray(distances[position[str(name)]], dtype=np.float64)
            count = min(heads, found.shape[0])
            out[row, :count] = found[:count]
    return out if np.isfinite(out).any() else None


def _span(names: Sequence[str]) -> str:
    names = [str(name) for name in names]
    if len(names) <= 2:
        return " and ".join(names)
    return f"{names[0]} to {names[-1]}"


def _local_fraction(result: CKAResult, view: View) -> float:
    """The local-head fraction in force: the view's, else the attention analysis's (0.5 without one)."""
    attention = result.analysis("attention")
    if view.local_threshold is not None:
        return view.local_threshold
    return float(getattr(attention, "local_threshold", 0.5))


# ------------------------------------------------------------------------------------------------------------ findings

LOCAL_LIKE_CNN = ("heads.local_like_cnn", "Local heads resemble the CNN's early layers")
LOCAL_LIKE_CNN_PAPER = (
    "Heads that attend locally are the most CKA-similar to the lower ResNet layers; the similarity falls as the heads' "
    "mean distance grows (Raghu et al. 2021, Figure 5)."
)
PERMUTATIONS = 1999  # of the heads' distances, for the one-run test of the correlation


def correlation(result: CKAResult) -> float:
    """Spearman correlation over heads of mean attention distance with CKA to the reference's lower layers."""
    lower, _ = lower_reference_cka(result.head_reference, result.reference_layers)
    distances = _aligned_distances(result)
    return float("nan") if lower is None or distances is None else spearman(distances, lower)


def permutation_p(result: CKAResult, seed: int = 0) -> float:
    """One-sided p of a correlation this negative when distances are shuffled over the heads (1999 permutations).

    Example:
        >>> import numpy as np
        >>> from lightning_cka.result import CKAResult
        >>> d = np.arange(12.0).reshape(2, 6)
        >>> r = CKAResult(attention_layers=["a", "b"], mean_attention_distance=d, head_layers=["a", "b"],
        ...               head_reference=(100 - d)[..., None], reference_layers=["r"])
        >>> permutation_p(r) < 0.01
        True
    """
    lower, _ = lower_reference_cka(result.head_reference, result.reference_layers)
    distances = _aligned_distances(result)
    if lower is None or distances is None:
        return float("nan")
    x, y = np.ravel(distances), np.ravel(lower)
    keep = np.isfinite(x) & np.isfinite(y)
    observed = spearman(x[keep], y[keep])
    if not np.isfinite(observed):
        return float("nan")
    rx, ry = (rankdata(v[keep]) for v in (x, y))
    rx, ry = rx - rx.mean(), (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())
    shuffled = np.random.default_rng(seed).permuted(np.tile(rx, (PERMUTATIONS, 1)), axis=1)  # (P, heads)
    correlations = shuffled @ ry / np.linalg.norm(rx)  # a permutation keeps the norm of the centered ranks
    return float((1 + np.sum(correlations <= observed + 1e-12)) / (PERMUTATIONS + 1))


def _local_like_cnn(analysis: HeadCKA, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*LOCAL_LIKE_CNN, LOCAL_LIKE_CNN_PAPER)
    if first.head_reference is None or first.mean_attention_distance is None:
        return Finding(
            *header,
            NOT_MEASURED,
            "the heads were not compared with a reference",
            needs="a ViT with a CNN reference and the attention and heads analyses (both are on by default)",
        )
    limit = evidence.criterion(analysis, "max_rho")
    rho = side_estimate(side, lambda r: Estimate(correlation(r)))
    cnn = architecture(first, "reference")
    what = f"Spearman correlation of head distance with CKA to {named(cnn)}'s lower layers"
    numbers = [(what, rho.text(basis=True))]
    if len(side.runs) == 1:
        p = permutation_p(first)
        numbers.append(("one-sided permutation p over heads", f"{p:.3g} ({PERMUTATIONS} permutations)"))
        if rho.value < limit and p < evidence.alpha:
            verdict, reason = SHOWS, f"{what} is {rho.text()}, below {limit:g} (permutation p = {p:.2g})"
        elif rho.value >= limit:
            verdict, reason = DOES_NOT, f"{what} is {rho.text()}, not below {limit:g}"
        else:
            verdict, reason = (
                CANNOT_TELL,
                f"{what} is {rho.text()}, but a shuffle of the heads gives as much (p = {p:.2g})",
            )
    else:
        verdict, reason = threshold_verdict(rho, limit, False, what)
    heads = int(np.isfinite(first.mean_attention_distance).sum())
    direction = (
        "the more locally a head attends, the more it resembles"
        if rho.value < 0
        else "local heads do not resemble more"
    )
    statement = (
        f"Over the {heads} heads, {direction} the lower layers of {named(cnn)} (rank correlation {rho.text(2)})."
    )
    figures = figures_of(analysis, first, ("attention/heads_vs_reference",), View(run=first.run or side.label))
    return Finding(*header, verdict, reason, statement, numbers, figures)

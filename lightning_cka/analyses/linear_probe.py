"""Linear probes of the class at every layer: closed-form ridge regression (Raghu et al. 2021, Figures 12-13).

Taps each monitored layer's output reduced on the spot to two ``(n, D)`` feature sets
(:class:`lightning_cka.taps.linear_probe.LinearProbeTap`): the CLS token (token 0 of ``(n, T, D)`` outputs of a layer
with a class token) and the global average pool (mean over the patch tokens, prefix tokens left out; spatial mean of
4-D conv maps). The probe images are split by the parity of their global probe index (even: fit, odd: scored), so the
split is the same whatever the ranks and minibatches.

State: on the fit half, per layer and feature set, the sufficient statistics ``XᵀX``, ``XᵀY``, ``Σx`` and the class
counts (float64, summed over ranks with ``dist_reduce_fx="sum"``); on the scored half, this rank's features, kept
until the solve (``N/2 × D × layers × 2`` values in the layer's precision, at least float32). In :meth:`reduce`
every rank solves the same ridge problem (:func:`lightning_cka.functional.ridge.fit_ridge`), picks λ by generalized
cross-validation in closed form, scores its own kept features and the correct counts are summed over ranks. The chance
level is what the same probe reaches on ``shuffles`` permutations of the fit half's labels (seeded by the probe seed
and the shuffle, over the fit images in the order of their global index: the same whatever the ranks), scored with the
true labels; the fit half's features are kept for them like the scored half's. Fields ``linear_probe_*``; figure
``linear_probe/accuracy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Curves, Figure, Line, Series
from lightning_cka.findings import (
    CANNOT_TELL,
    LEVEL,
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
from lightning_cka.stats import t_critical

if TYPE_CHECKING:
    import torch

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap

KINDS = ("cls", "gap")  # the columns of every (L, 2) field


class LinearProbe(Analysis):
    """Closed-form ridge probes of the class on the CLS token and the pooled features of every monitored layer.

    Args:
        shuffles: ridge probes fitted on shuffled labels (the fit half's, permuted) per layer and feature set:
            their mean accuracy is the chance level, their 95th percentile its spread (0: no chance level).
    """

    name = "linear_probe"
    position = 60
    needs_labels = True
    fields = (
        Field(
            "linear_probe_accuracy",
            "array",
            "(L, 2) accuracy of the ridge probe on the scored half, columns (CLS token, global average pool); "
            "NaN where the layer has no CLS token or its features were not finite",
            shape=("layers", 2),
        ),
        Field(
            "linear_probe_chance",
            "float",
            "chance level: the mean accuracy of the shuffled-label probes (linear_probe_shuffled); NaN with "
            "shuffles=0. Older files, without linear_probe_shuffled, hold the majority baseline here instead (the "
            "scored half's frequency of the fit half's most frequent class)",
        ),
        Field(
            "linear_probe_shuffled",
            "array",
            "(P, L, 2) accuracy of each of the P shuffled-label probes (the fit half's labels permuted, the same "
            "ridge fit with its own GCV λ, scored with the true labels): what a layer without the class reaches",
            shape=(None, "layers", 2),
        ),
        Field(
            "linear_probe_ridge", "array", "(L, 2) the ridge strength λ chosen by GCV (NaN: none)", shape=("layers", 2)
        ),
        Field(
            "linear_probe_examples", "ints", "(2,) examples fitted (even probe indices) and scored (odd)", shape=(2,)
        ),
    )

    def __init__(self, shuffles: int = 10) -> None:
        owner = type(self).__name__
        self.shuffles = check.integer(
            owner, "shuffles", shuffles, 0, 1000, "shuffled-label probes for the chance level; 0: no chance level"
        )

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from lightning_cka.taps.linear_probe import LinearProbeTap

        model = setup.models["model"]
        self._model = model
        self._seed = setup.seed
        self._tap = LinearProbeTap(model.layers, model.layouts)
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._tap] if model.role == "model" else []

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        from lightning_cka.metrics.linear_probe import LinearProbeStates

        self._states = LinearProbeStates(len(self._model.layers), device, self.shuffles, self._seed)

    @override
    def update(self, batch: Minibatch) -> None:
        self._states.update(batch.values["model"][self._tap.key], batch.labels, batch.start, batch.size, batch.index)

    @override
    def reduce(self) -> Any:
        return self._states.reduce()

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        from pytorch_lightning.utilities.rank_zero import rank_zero_warn

        fit_counts, score_counts = reduced["fit_counts"].numpy(), reduced["score_counts"].numpy()
        scored = float(score_counts.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = reduced["correct"].numpy() / scored if scored else np.full(reduced["correct"].shape, np.nan)
            shuffled = reduced["shuffled"].numpy() / scored if scored else np.full(reduced["shuffled"].shape, np.nan)
        finite = shuffled[np.isfinite(shuffled)]
        chance = float(finite.mean()) if finite.size else float("nan")
        unseen = int(score_counts[fit_counts == 0].sum())
        if unseen:
            rank_zero_warn(
                f"lightning-cka: linear_probe: {unseen} of the {int(scored)} scored probe images belong to classes no "
                "fitted image has, so the probe can never predict them. The fit half is the even probe indices: a "
                "probe ordered by class (or alternating with it) needs shuffling; a random draw, as CKAMonitor makes, "
                "is fine."
            )
        return {
            "linear_probe_accuracy": accuracy,
            "linear_probe_chance": chance,
            "linear_probe_shuffled": shuffled,
            "linear_probe_ridge": reduced["ridge"].numpy(),
            "linear_probe_examples": np.array([fit_counts.sum(), scored], dtype=np.int64),
        }

    @override
    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        accuracy = _accuracy(result)
        if accuracy is None or not len(result.layers or []):
            return []
        chance = _float(result.linear_probe_chance)
        scored = _examples(result)[1]
        series = []
        for kind, label in ((0, "CLS token"), (1, "GAP: mean over patch tokens / positions")):
            values = accuracy[:, kind]
            if kind == 0 and not np.isfinite(values).any():
                continue  # no class token: leave the curve out, the caption says so
            with np.errstate(invalid="ignore"):
                error = np.sqrt(values * (1 - values) / scored) if scored else None
            series.append(Series(label, values, error))
        lines, chance_words = _chance_lines(result, chance)
        panel = Curves(
            x=tuple(result.layers),
            series=tuple(series),
            x_label="layer",
            y_label="probe accuracy",
            lines=lines,
            ylim=(-0.02, 1.04),  # an accuracy of exactly 0 or 1 stays whole inside the frame
        )
        fit_n, scored_n = _examples(result)
        no_cls = "" if accuracy.shape[1] and np.isfinite(accuracy[:, 0]).any() else " The model has no class token."
        caption = (
            f"How well a ridge regression on each layer's features predicts the class: fitted on {fit_n} probe images, "
            f"scored on the other {scored_n} (band: ±1 binomial standard error; {chance_words}).{no_cls} Raghu et al. "
            "2021 (Figs. 12-13): in a CLS-trained ViT, single tokens decode the "
            "class poorly at the high layers, where the CLS token carries it; a GAP-trained ViT's tokens and a "
            "ResNet's pooled features decode it well at the high layers."
        )
        title = "Linear probe accuracy per layer"
        return [Figure("linear_probe/accuracy", title, (panel,), caption, view.subtitle(result))]

    @override
    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
        accuracy = _accuracy(result)
        scalars: dict[str, float] = {}
        if accuracy is None:
            return scalars
        layers = list(result.layers or [])
        for kind, name in enumerate(KINDS):
            column = accuracy[:, kind] if accuracy.shape[1] > kind else np.zeros(0)
            finite = column[np.isfinite(column)]
            if not finite.size and kind == 0:
                continue  # no class token: no CLS scalars at all
            scalars[f"linear_probe/best_{name}_accuracy"] = float(finite.max()) if finite.size else float("nan")
            for layer, value in zip(layers, column, strict=False):
                scalars[f"linear_probe/{name}_accuracy/{layer}"] = float(value)
        scalars["linear_probe/chance"] = _float(result.linear_probe_chance)
        shuffled = np.asarray(result.get("linear_probe_shuffled", np.zeros(0)), dtype=np.float64)
        if np.isfinite(shuffled).any():
            scalars["linear_probe/chance_p95"] = float(np.percentile(shuffled[np.isfinite(shuffled)], 95))
        return scalars

    criteria = (
        Criterion(
            "depth_gain",
            0.0,
            "gain of the best probe accuracy of the top layer over that of the first monitored layer: above it the "
            "class becomes more decodable with depth",
        ),
    )

    @override
    def findings(self, evidence: Evidence) -> list[Finding]:
        return [
            *per_side(evidence, lambda side: _depth(self, side, evidence)),
            *per_side(evidence, lambda side: _cls_vs_pooled(self, side, evidence)),
        ]


def _chance_lines(result: CKAResult, chance: float) -> tuple[tuple[Line, ...], str]:
    """The chance lines of the accuracy figure and the caption's words for them.

    The mean accuracy of the shuffled-label probes (dashed) and their 95th percentile (dotted); a file written before
    the shuffled-label probes holds the majority baseline as its chance.
    """
    if not np.isfinite(chance):
        return (), "no chance level: shuffles=0"
    shuffled = np.asarray(result.get("linear_probe_shuffled", np.zeros(0)), dtype=np.float64)
    values = shuffled[np.isfinite(shuffled)]
    if not values.size:
        return (
            Line(chance, f"chance (majority class) {chance:.2f}"),
        ), "dashed: always predicting the most frequent class"
    high = float(np.percentile(values, 95))
    lines = (
        Line(chance, f"chance (shuffled labels) {chance:.2f}"),
        Line(high, f"95% of shuffled-label probes below {high:.2f}", style="dotted"),
    )
    words = (
        f"dashed: the mean accuracy of the same probe fitted on shuffled labels ({len(shuffled)} shuffles per layer), "
        "dotted: their 95th percentile; an accuracy below the dotted line is what shuffled labels reach"
    )
    return lines, words


def _accuracy(result: CKAResult) -> np.ndarray | None:
    accuracy = result.linear_probe_accuracy
    if accuracy is None:
        return None
    accuracy = np.asarray(accuracy, dtype=np.float64)
    return accuracy.reshape(-1, 2) if accuracy.size else np.zeros((0, 2))


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _examples(result: CKAResult) -> tuple[int, int]:
    """(fitted, scored) examples; zeros when the field is missing or malformed."""
    examples = result.linear_probe_examples
    return (int(examples[0]), int(examples[1])) if examples is not None and len(examples) == 2 else (0, 0)


# ------------------------------------------------------------------------------------------------------------ findings

DEPTH = ("linear_probe.depth", "The class becomes decodable with depth")
DEPTH_PAPER = (
    "Linear probes of the class grow more accurate through the layers of ViTs and ResNets alike (Raghu et al. 2021, "
    "Figures 12-13)."
)
CLS_POOLED = ("linear_probe.cls_vs_pooled", "Where the class is: the class token or the pooled tokens")
CLS_POOLED_PAPER = (
    "A ViT trained with a class token carries the class in that token, and probes of its other tokens are poor in the "
    "higher layers; trained with global average pooling, the pooled tokens carry it (Figure 12)."
)
NEEDS_LABELS = (
    "the linear_probe analysis with labelled probe images: CKAMonitor(analyses=['default', 'linear_probe']) "
    "(examples/train.py --linear-probe)"
)


def _accuracy_estimate(result: CKAResult, value: float, other: float | None = None) -> Estimate:
    """An accuracy (or a difference of two on the same scored images) with its binomial interval."""
    scored = _examples(result)[1]
    if not np.isfinite(value) or scored < 2:
        return Estimate(value)
    if other is None:
        var = value * (1 - value) / scored
    else:  # two accuracies on the same images: their variances added (conservative for positively related probes)
        a, b = value + other, other  # value is a difference a - b here
        var = (a * (1 - a) + b * (1 - b)) / scored
    half = float(t_critical(LEVEL, scored - 1)) * float(np.sqrt(var))
    return Estimate(value, half, f"binomial, {scored} scored images")


def _best(column: np.ndarray) -> float:
    finite = column[np.isfinite(column)]
    return float(finite.max()) if finite.size else float("nan")


def _depth(analysis: LinearProbe, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*DEPTH, DEPTH_PAPER)
    if _accuracy(first) is None:
        return Finding(*header, NOT_MEASURED, "no linear probe was run", needs=NEEDS_LABELS)

    def gain(result: CKAResult) -> Estimate:
        accuracy = _accuracy(result)
        top, bottom = _best(accuracy[-1]), _best(accuracy[0])
        return _accuracy_estimate(result, top - bottom, bottom)

    def top(result: CKAResult) -> Estimate:
        return _accuracy_estimate(result, _best(_accuracy(result)[-1]))

    rise, last = side_estimate(side, gain), side_estimate(side, top)
    what = "best probe accuracy of the top layer minus the first layer's"
    verdict, reason = threshold_verdict(rise, evidence.criterion(analysis, "depth_gain"), True, what)
    chance = side_estimate(side, lambda r: Estimate(_float(r.linear_probe_chance)))
    layers = first.layers
    statement = (
        f"The best probe reads the class from {layers[-1]} with accuracy {last.text()} against "
        f"{_best(_accuracy(first)[0]):.3f} from {layers[0]}; shuffled-label probes reach {chance.text()} (chance)."
    )
    numbers = [
        ("top-layer accuracy", last.text(basis=True)),
        (what, rise.text(basis=True)),
        ("chance (probes fitted on shuffled labels)", chance.text(basis=True)),
    ]
    figures = figures_of(analysis, first, ("linear_probe/accuracy",), View(run=first.run or side.label))
    return Finding(*header, verdict, reason, statement, numbers, figures)


def _cls_vs_pooled(analysis: LinearProbe, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*CLS_POOLED, CLS_POOLED_PAPER)
    accuracy = _accuracy(first)
    if accuracy is None:
        return Finding(*header, NOT_MEASURED, "no linear probe was run", needs=NEEDS_LABELS)
    if not np.isfinite(accuracy[:, 0]).any():
        return Finding(
            *header, NOT_MEASURED, "the model has no class token", needs="a ViT with a class token (timm's default)"
        )

    def difference(result: CKAResult) -> Estimate:
        top = _accuracy(result)[-1]
        return _accuracy_estimate(result, float(top[0] - top[1]), float(top[1]))

    gap = side_estimate(side, difference)
    what = f"accuracy of the class token minus the pooled tokens at {first.layers[-1]}"
    pool = str(first.settings_dict().get("pool") or "")
    tops = np.array([_accuracy(result)[-1] for result in side.last])  # (runs, 2): class token, pooled tokens
    runs = f" (mean of {len(tops)} runs)" if len(tops) > 1 else ""
    statement = (
        f"At {first.layers[-1]} the class-token probe reaches {tops[:, 0].mean():.3f} and the pooled-token probe "
        f"{tops[:, 1].mean():.3f}{runs} ({what}: {gap.text()})."
    )
    numbers = [(what, gap.text(basis=True))]
    figures = figures_of(analysis, first, ("linear_probe/accuracy",), View(run=first.run or side.label))
    if pool not in ("token", "avg"):
        reason = "which token the classifier reads is not recorded, and the paper's expectation depends on it"
        needs = "runs whose monitor records the classifier's pooling (timm global_pool: 'token' or 'avg')"
        return Finding(*header, CANNOT_TELL, reason, statement, numbers, figures, needs)
    statement += f" The classifier reads {'the class token' if pool == 'token' else 'the pooled tokens'}."
    verdict, reason = threshold_verdict(gap, 0.0, pool == "token", what)
    return Finding(*header, verdict, reason, statement, numbers, figures)

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
cross-validation in closed form, scores its own kept features and the correct counts are summed over ranks. Fields
``linear_probe_*``; figure ``linear_probe/accuracy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Curves, Figure, Line, Series

if TYPE_CHECKING:
    import torch

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap

KINDS = ("cls", "gap")  # the columns of every (L, 2) field


class LinearProbe(Analysis):
    """Closed-form ridge probes of the class on the CLS token and the pooled features of every monitored layer."""

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
            "majority baseline: the scored half's frequency of the fit half's most frequent class",
        ),
        Field(
            "linear_probe_ridge", "array", "(L, 2) the ridge strength λ chosen by GCV (NaN: none)", shape=("layers", 2)
        ),
        Field(
            "linear_probe_examples", "ints", "(2,) examples fitted (even probe indices) and scored (odd)", shape=(2,)
        ),
    )

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from lightning_cka.taps.linear_probe import LinearProbeTap

        model = setup.models["model"]
        self._model = model
        self._tap = LinearProbeTap(model.layers, model.layouts)
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._tap] if model.role == "model" else []

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        from lightning_cka.metrics.linear_probe import LinearProbeStates

        self._states = LinearProbeStates(len(self._model.layers), device)

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
        chance = float(score_counts[int(np.argmax(fit_counts))] / scored) if scored and fit_counts.sum() else np.nan
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
            "linear_probe_chance": float(chance),
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
        lines = (Line(chance, f"chance (majority class) {chance:.2f}"),) if np.isfinite(chance) else ()
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
            f"scored on the other {scored_n} (band: ±1 binomial standard error; dashed: always predicting the most "
            f"frequent class).{no_cls} Raghu et al. 2021 (Figs. 12-13): in a CLS-trained ViT, single tokens decode the "
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
        return scalars


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

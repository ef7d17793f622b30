"""The probe engine: run the probe minibatches through every model once, feed every analysis, reduce, collect fields.

Data path of one probe::

    minibatches ──► model (TapSet: hooks of every analysis's taps) ──► tap values ──┐
                └─► reference (first probe only; its tap values are cached) ────────┴─► analysis.update (per minibatch)
    analysis.reduce (collective, every rank in the same order) ──► analysis.finalize ──► fields of the CKAResult

Nothing here calls a collective except :meth:`ProbeEngine.compute` (through the analyses' metric syncs), so a caller
can run :meth:`ProbeEngine.run` inside a ``try`` and agree across ranks on success before computing.
"""

import warnings
from collections.abc import Hashable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_cka.engine.analysis import Analysis, Minibatch
from lightning_cka.engine.models import ProbedModel
from lightning_cka.taps.base import Tap, TapSet


@dataclass
class ProbeBatch:
    """One of this rank's probe minibatches.

    Attributes:
        index: its number among all minibatches of the probe (all ranks together).
        start: the probe index of its first example.
        inputs: the images.
        labels: their class labels, or ``None``.
    """

    index: int
    start: int
    inputs: Tensor
    labels: Tensor | None = None


class ProbeEngine:
    """Runs probes of named models through a list of analyses.

    Built once per fit: the analyses choose what they measure (:meth:`Analysis.bind`) and each model's taps are built
    once, shared between analyses that ask for the same measurement, and attached only while a probe runs. A frozen
    model (a reference) runs at the first probe only; its taps' values are cached per minibatch and the model is then
    moved off its device (:attr:`released_bytes` says how much that freed).

    Args:
        models: the probed models, at most one per role.
        analyses: the analyses, in the order their fields and figures come.
    """

    def __init__(self, models: Sequence[ProbedModel], analyses: Sequence[Analysis]) -> None:
        self.models = {model.role: model for model in models}
        if len(self.models) != len(models):
            raise ValueError("each role (model, reference) can be probed once.")
        self.analyses = [analysis for analysis in analyses if analysis.bind(self.models)]
        self.taps: dict[str, list[Tap]] = {}
        for role, model in self.models.items():
            shared: dict[Hashable, Tap] = {}
            for analysis in self.analyses:
                for tap in analysis.taps(model):
                    shared.setdefault(tap.key, tap)
            self.taps[role] = list(shared.values())
        self._cache: dict[str, dict[int, dict[Hashable, Any]]] = {
            role: {} for role, model in self.models.items() if model.frozen
        }
        self.released_bytes = 0

    def run(self, batches: Sequence[ProbeBatch], num_minibatches: int, device: torch.device) -> None:
        """Forward this rank's minibatches through every model and update every analysis; no collective calls."""
        for analysis in self.analyses:
            analysis.start(num_minibatches, device)
        with ExitStack() as stack:
            tap_sets = {
                role: stack.enter_context(TapSet(model.module, model.modules, self.taps[role]))
                for role, model in self.models.items()
                if self.taps[role] and not self._cached(role, batches)
            }
            for batch in batches:
                values = {role: self._values(role, batch, tap_sets) for role in self.models if self.taps[role]}
                minibatch = Minibatch(batch.index, batch.start, batch.inputs.shape[0], values, batch.labels)
                for analysis in self.analyses:
                    analysis.update(minibatch)
        for role, model in self.models.items():
            if model.frozen and self._cached(role, batches):
                self.released_bytes += model.release()

    def _cached(self, role: str, batches: Sequence[ProbeBatch]) -> bool:
        cache = self._cache.get(role)
        return cache is not None and all(batch.index in cache for batch in batches)

    def _values(self, role: str, batch: ProbeBatch, tap_sets: dict[str, TapSet]) -> dict[Hashable, Any]:
        cache = self._cache.get(role)
        if cache is not None and batch.index in cache:
            return cache[batch.index]
        model = self.models[role]
        model.call(model.input_for(batch.inputs))
        values = tap_sets[role].collect()
        if cache is not None:
            cache[batch.index] = values
        return values

    def compute(self) -> dict[str, Any]:
        """Reduce every analysis across ranks (collective: call on every rank) and collect their fields.

        An analysis whose fields cannot be made from its reduced states (a bug, or data no analysis foresaw) is left
        out of this probe with a warning; the others' fields are kept.
        """
        reduced = [analysis.reduce() for analysis in self.analyses]
        fields: dict[str, Any] = {}
        for model in self.models.values():
            fields[f"{model.prefix}layers"] = list(model.names)
            if model.label:
                fields[f"{model.prefix}label"] = model.label
        for analysis, states in zip(self.analyses, reduced, strict=True):
            try:
                fields.update(analysis.finalize(states))
            except Exception as err:  # one analysis must not cost the probe the others' results
                warnings.warn(
                    f"lightning-cka: the {analysis.name} analysis failed on this probe and is left out of it "
                    f"({err!r}); the other analyses' results are kept.",
                    UserWarning,
                    stacklevel=2,
                )
        return fields

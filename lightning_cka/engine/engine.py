"""The probe engine: run the probe minibatches through every model once, feed every analysis, reduce, collect fields.

Data path of one probe::

    minibatches ──► model (TapSet: hooks of every analysis's taps) ──► tap values ──┐
                └─► reference (first probe only; its tap values are cached) ────────┴─► analysis.update (per minibatch)
    analysis.reduce (collective, every rank in the same order) ──► analysis.finalize ──► fields of the CKAResult

Analyses fail one at a time: a tap whose hook raises, or an analysis whose ``start``/``update`` raises, costs that
analysis this probe (:attr:`ProbeEngine.failures`), never the forward pass or the other analyses. Nothing here calls a
collective except :meth:`ProbeEngine.compute` (through the analyses' metric syncs), so a caller can run
:meth:`ProbeEngine.run` on every rank, agree across ranks on which analyses failed anywhere, and then compute the
others everywhere.
"""

from collections.abc import Hashable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_cka.engine.analysis import Analysis, Minibatch, ProbeSetup
from lightning_cka.engine.models import ProbedModel
from lightning_cka.taps.base import Tap, TapSet, TapValues


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

    Built once per fit: each analysis chooses what it measures (:meth:`Analysis.bind`; those that do not apply are
    left out, with their reason in :attr:`skipped`) and each model's taps are built once, shared between analyses that
    ask for the same measurement, and attached only while a probe runs. A frozen model (a reference) runs at the first
    probe only; its taps' values are cached per minibatch and the model is then moved off its device
    (:attr:`released_bytes` says how much that freed).

    Args:
        models: the probed models, at most one per role.
        analyses: the analyses, in the order their fields and figures come.
        seed: the seed the analyses draw their permutations from.

    Raises:
        ValueError: an analysis's option cannot work on these models (from :meth:`Analysis.bind`).
    """

    def __init__(self, models: Sequence[ProbedModel], analyses: Sequence[Analysis], seed: int = 0) -> None:
        self.models = {model.role: model for model in models}
        if len(self.models) != len(models):
            raise ValueError("each role (model, reference) can be probed once.")
        setup = ProbeSetup(self.models, seed)
        self.analyses: list[Analysis] = []
        self.skipped: dict[str, str] = {}
        for analysis in analyses:
            applies = analysis.bind(setup)
            if applies is True:
                self.analyses.append(analysis)
            else:
                self.skipped[analysis.name] = str(applies or "it does not apply to these models")
        self.failures: dict[str, BaseException] = {}
        self.finalize_failures: dict[str, BaseException] = {}
        self._cache: dict[str, dict[int, TapValues]] = {role: {} for role, model in self.models.items() if model.frozen}
        self.released_bytes = 0
        self._build_taps()

    def _build_taps(self) -> None:
        self.taps: dict[str, list[Tap]] = {}
        for role, model in self.models.items():
            shared: dict[Hashable, Tap] = {}
            for analysis in self.analyses:
                for tap in analysis.taps(model):
                    shared.setdefault(tap.key, tap)
            self.taps[role] = list(shared.values())

    def disable(self, name: str) -> None:
        """Leave the analysis ``name`` out of every later probe of this fit (it cannot run on these models)."""
        self.analyses = [a for a in self.analyses if a.name != name]
        self._build_taps()

    def run(self, batches: Sequence[ProbeBatch], num_minibatches: int, device: torch.device) -> None:
        """Forward this rank's minibatches through every model and update every analysis; no collective calls.

        Raises:
            Exception: what a model's forward pass raised (the probe cannot go on without it).
        """
        self.failures = {}
        for analysis in self.analyses:
            self._attempt(analysis, analysis.start, num_minibatches, device)
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
                    if analysis.name not in self.failures:
                        self._attempt(analysis, analysis.update, minibatch)
        for role, model in self.models.items():
            if model.frozen and self._cached(role, batches):
                self.released_bytes += model.release()

    def _attempt(self, analysis: Analysis, step: Any, *args: Any) -> None:
        try:
            step(*args)
        except Exception as err:  # one analysis must not cost the probe the others' results
            self.failures[analysis.name] = err

    def _cached(self, role: str, batches: Sequence[ProbeBatch]) -> bool:
        cache = self._cache.get(role)
        return cache is not None and all(batch.index in cache for batch in batches)

    def _values(self, role: str, batch: ProbeBatch, tap_sets: dict[str, TapSet]) -> TapValues:
        cache = self._cache.get(role)
        if cache is not None and batch.index in cache:
            return cache[batch.index]
        model = self.models[role]
        inputs = model.input_for(batch.inputs)
        tap_sets[role].begin(inputs)  # here, not in a hook on the module: a custom forward may skip the module's call
        model.call(inputs)
        values = tap_sets[role].collect()
        if cache is not None:
            cache[batch.index] = values
        return values

    def compute(self, skip: Sequence[str] = ()) -> dict[str, Any]:
        """Reduce every analysis but ``skip`` across ranks and collect their fields.

        A collective: call it on every rank, with the same ``skip``. An analysis whose fields cannot be made from its
        reduced states (a bug, or data no analysis foresaw) is left out, with its error in :attr:`finalize_failures`;
        the others' fields are kept.

        Returns:
            The fields, each model's ``layers`` and ``label`` included.
        """
        active = [analysis for analysis in self.analyses if analysis.name not in skip]
        reduced = [analysis.reduce() for analysis in active]
        fields: dict[str, Any] = {}
        for model in self.models.values():
            fields[f"{model.prefix}layers"] = list(model.names)
            if model.label:
                fields[f"{model.prefix}label"] = model.label
        self.finalize_failures = {}
        for analysis, states in zip(active, reduced, strict=True):
            try:
                fields.update(analysis.finalize(states))
            except Exception as err:  # a bug, or data no analysis foresaw: this analysis only
                self.finalize_failures[analysis.name] = err
        return fields

    def result_analyses(self, skip: Sequence[str] = ()) -> list[Analysis]:
        """The analyses whose fields the last :meth:`compute` made: those not in ``skip`` that did not fail."""
        failed = {*skip, *self.finalize_failures}
        return [analysis for analysis in self.analyses if analysis.name not in failed]

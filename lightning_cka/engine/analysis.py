"""The unit every analysis is written as: what it taps, accumulates, stores, draws and logs, in one class."""

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_cka.figures.spec import Figure
from lightning_cka.taps.base import Tap

if TYPE_CHECKING:
    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.engine.options import ProbeOptions
    from lightning_cka.result import CKAResult

FieldKind = Literal["array", "names", "float", "int", "ints", "text"]


@dataclass(frozen=True)
class Field:
    """One array of the probe's ``.npz`` file.

    Attributes:
        key: the name in the file and the :class:`lightning_cka.CKAResult` attribute.
        kind: ``array`` (float64), ``names`` (strings), ``float``, ``int``, ``ints`` (int64 array) or ``text``.
        doc: what it holds, with its shape.
        per_model: also stored for the reference model, as ``reference_<key>``.
    """

    key: str
    kind: FieldKind
    doc: str
    per_model: bool = False


@dataclass(frozen=True)
class View:
    """How a probe is labelled in figures and scalars.

    Attributes:
        run: which run (``vit-digits/version_0``), shown in every figure's subtitle.
        local_threshold: a head is local when its mean distance is below this fraction of the uniform-attention
            distance.
    """

    run: str = ""
    local_threshold: float = 0.5

    def subtitle(self, result: "CKAResult") -> str:
        """``vit-digits/version_0 · step 300 · 256 probe images``: which run and probe a figure shows."""
        parts = [self.run or (result.run or "")]
        parts.append(f"step {result.step}" if result.step >= 0 else "not from training")
        if result.num_examples:
            parts.append(f"{result.num_examples} probe images")
        return " · ".join(part for part in parts if part)


@dataclass
class Minibatch:
    """One probe minibatch as every model saw it.

    Attributes:
        index: its number among all minibatches of the probe (all ranks together).
        start: the probe index of its first example.
        size: its number of examples.
        values: per model role (``"model"``, ``"reference"``), the value of each tap by its key.
        labels: ``(n,)`` class labels, when the probe has them.
    """

    index: int
    start: int
    size: int
    values: Mapping[str, Mapping[Hashable, Any]]
    labels: Tensor | None = None


class Analysis:
    """One analysis of the paper as a unit.

    A probe calls, in order: :meth:`bind` once per fit (choose what to measure, reject what cannot work),
    :meth:`taps` for each model, then per probe :meth:`start`, :meth:`update` for each of this rank's minibatches (no
    collective calls), :meth:`reduce` on every rank in the same order (the only collective calls: metric syncs), and
    :meth:`finalize`, which turns the reduced states into the fields it declares. :meth:`figures` and :meth:`scalars`
    read those fields back from a :class:`lightning_cka.CKAResult`, so the monitor, ``CKAResult.plot()``, the command
    line and the dashboard draw the same pictures from a live probe or from its ``.npz`` file.

    Attributes:
        name: the analysis's name (the option that turns it on, where there is one).
        fields: what it stores in the ``.npz``.
    """

    name: ClassVar[str]
    fields: ClassVar[tuple[Field, ...]] = ()

    def __init__(self, options: "ProbeOptions") -> None:
        self.options = options

    def bind(self, models: Mapping[str, "ProbedModel"]) -> bool:
        """Choose what to measure on these models, once per fit; ``False`` when the analysis does not apply."""
        return True

    def taps(self, model: "ProbedModel") -> list[Tap]:
        """The taps this analysis needs on ``model`` (taps with equal keys are shared with other analyses)."""
        return []

    def start(self, num_minibatches: int, device: torch.device) -> None:
        """A probe of ``num_minibatches`` minibatches (all ranks) begins: reset the states."""

    def update(self, batch: Minibatch) -> None:
        """Accumulate one minibatch; local to this rank."""

    def reduce(self) -> Any:
        """Sum the states over ranks (collective; it must not fail on the data: NaN stays NaN)."""
        return None

    def finalize(self, reduced: Any) -> dict[str, Any]:
        """The fields of this probe from what :meth:`reduce` returned (local; may raise, then they are left out)."""
        return {}

    @classmethod
    def figures(cls, result: "CKAResult", previous: "CKAResult | None", view: View) -> list[Figure]:
        """The figures of a probe (``previous``: the probe before it in the same run, or ``None``)."""
        return []

    @classmethod
    def scalars(cls, result: "CKAResult", view: View) -> dict[str, float]:
        """The probe's headline numbers by tag, for every logger and the command line's tables."""
        return {}

"""The unit every analysis is written as: its options, what it taps, accumulates, stores, draws and logs, in one class.

This module imports neither torch nor timm: reading, summarizing and drawing a probe file needs the analyses' classes
(their fields, figures and scalars) and nothing of the machinery that measured it. An analysis imports its torch side
(taps, metrics) inside the methods that run during a probe.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lightning_cka.figures.spec import Figure

if TYPE_CHECKING:
    from torch import Tensor, device

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.findings import Criteria, Criterion, Event, Evidence, Finding
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap

FieldKind = Literal["array", "names", "float", "int", "ints", "text"]
Dim = str | int | None


@dataclass(frozen=True)
class Field:
    """One array of the probe's ``.npz`` file.

    Attributes:
        key: the name in the file and the :class:`lightning_cka.CKAResult` attribute.
        kind: ``array`` (float64), ``names`` (strings), ``float``, ``int``, ``ints`` (int64 array) or ``text``.
        doc: what it holds, with its shape.
        per_model: also stored for the reference model, as ``reference_<key>``.
        shape: the shape of an ``array`` or ``ints`` field, checked when a file is read: per dim, the key of a
            ``names`` field (its length, e.g. ``"layers"``), of an ``int`` field (its value, ``"num_minibatches"``), a
            number, ``None`` (any size), or another name (any size, but the same wherever the name appears). Names of
            a per-model field are looked up with the same ``reference_`` prefix. ``None`` checks nothing.
    """

    key: str
    kind: FieldKind
    doc: str
    per_model: bool = False
    shape: tuple[Dim, ...] | None = None


@dataclass(frozen=True)
class View:
    """How a probe is labelled in figures and scalars.

    Attributes:
        run: which run (``vit-digits/version_0``), shown in every figure's subtitle.
        local_threshold: overrides the attention analysis's ``local_threshold`` (a fraction of the uniform-attention
            distance) where it is not ``None``: the command line's ``--local-threshold``.
    """

    run: str = ""
    local_threshold: float | None = None

    def subtitle(self, result: CKAResult) -> str:
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


@dataclass(frozen=True)
class ProbeSetup:
    """What a probe is run on, as analyses see it when they bind.

    Attributes:
        models: the probed models by role (``"model"``, and ``"reference"`` when there is one).
        seed: the probe's seed (the permutations of the null).
    """

    models: Mapping[str, ProbedModel]
    seed: int = 0


_BY_NAME: dict[str, type[Analysis]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Analysis:
    """One analysis as a unit: its options, then per fit and probe the protocol below, then its fields and pictures.

    Options are the constructor's arguments, stored under the same names (``self.permutations``), validated there
    with messages that name the argument, and JSON-ready: :meth:`config` reads them back, every probe file and
    checkpoint stores them, and ``lightning-cka analyze`` rebuilds the analysis from them. A subclass that defines
    ``name`` can be given by that name wherever analyses are taken (``CKAMonitor(analyses=[...])``).

    A probe calls, in order: :meth:`bind` once per fit (choose what to measure; say why not when it does not apply;
    raise ``ValueError`` for an option that cannot work on these models), :meth:`taps` for each model, then per probe
    :meth:`start`, :meth:`update` for each of this rank's minibatches (no collective calls), :meth:`reduce` on every
    rank in the same order (the only collective calls: metric syncs), and :meth:`finalize`, which turns the reduced
    states into the fields it declares. :meth:`figures` and :meth:`scalars` read those fields back from a
    :class:`lightning_cka.CKAResult`, so the monitor, ``CKAResult.plot()``, the command line and the dashboard draw
    the same pictures from a live probe or from its ``.npz`` file. :meth:`findings` states what the probes say about
    the paper's findings, with a verdict by the :attr:`criteria` it declares, for ``lightning-cka report``;
    :meth:`events` notices moments of training (the monitor logs them as they happen, the report's timeline lists
    them).

    Attributes:
        name: the analysis's name: its key in files and the name users pass.
        fields: what it stores in the ``.npz``.
        default: whether ``CKAMonitor`` and ``compare_models`` run it when no analyses are given.
        position: where its fields and figures come among the default analyses (smaller first).
        needs_labels: it needs the probe's class labels (the monitor checks that the probe has them).
        criteria: the thresholds its verdicts and events rest on, with their defaults (overridable by
            ``"<name>.<key>"``).
        event_fields: the fields its :meth:`events` read; the monitor keeps them from every probe of a fit.
    """

    name: ClassVar[str]
    fields: ClassVar[tuple[Field, ...]] = ()
    default: ClassVar[bool] = False
    position: ClassVar[int] = 1000
    needs_labels: ClassVar[bool] = False
    criteria: ClassVar[tuple[Criterion, ...]] = ()
    event_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not isinstance(name, str):
            return
        if not _NAME.match(name):
            raise TypeError(f"analysis name {name!r} of {_path(cls)} must be lowercase letters, digits and '_'.")
        taken = _BY_NAME.get(name)
        if taken is not None and _path(taken) != _path(cls):
            raise TypeError(f"analysis name {name!r} is taken by {_path(taken)}; give {_path(cls)} another name.")
        _BY_NAME[name] = cls

    # ------------------------------------------------------------------------------------------------------ options

    def config(self) -> dict[str, Any]:
        """The options: the constructor's arguments, read back from the attributes of the same names."""
        return {name: getattr(self, name) for name in _parameters(type(self))}

    def describe(self) -> dict[str, Any]:
        """What rebuilds this analysis: ``{"name", "class" ("module:Qualname"), "config"}``, JSON-ready."""
        return {"name": self.name, "class": _path(type(self)), "config": self.config()}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({options})"

    # ------------------------------------------------------------------------------------------------ the protocol

    def bind(self, setup: ProbeSetup) -> bool | str:
        """Choose what to measure on these models, once per fit.

        Returns:
            ``True`` when it applies, or the reason it does not (a sentence: "the model has no attention modules").

        Raises:
            ValueError: an option set to something impossible on these models (a layer that does not exist).
        """
        return True

    def taps(self, model: ProbedModel) -> list[Tap]:
        """The taps this analysis needs on ``model`` (taps with equal keys are shared with other analyses)."""
        return []

    def start(self, num_minibatches: int, device: device) -> None:
        """A probe of ``num_minibatches`` minibatches (all ranks) begins: reset the states."""

    def update(self, batch: Minibatch) -> None:
        """Accumulate one minibatch; local to this rank."""

    def reduce(self) -> Any:
        """Sum the states over ranks (collective; it must not fail on the data: NaN stays NaN)."""
        return None

    def finalize(self, reduced: Any) -> dict[str, Any]:
        """The fields of this probe from what :meth:`reduce` returned (local; may raise, then they are left out)."""
        return {}

    # ---------------------------------------------------------------------------------------- reading the result

    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        """The figures of a probe (``previous``: the probe before it in the same run, or ``None``)."""
        return []

    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
        """The probe's headline numbers by tag, for every logger and the command line's tables."""
        return {}

    def findings(self, evidence: Evidence) -> list[Finding]:
        """What the probes of ``evidence`` (one side, or A against B) say about the paper's findings, with verdicts."""
        return []

    def events(self, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
        """The moments worth telling over the probes of one run (``history``: its probes in order of step).

        The monitor passes every probe of the fit so far, holding only the :attr:`event_fields`, and logs the events
        of the newest; the report passes every probe of a run. Both therefore see the same events.
        """
        return []


class UnresolvedAnalysis(Analysis):
    """An analysis named in a probe file whose class cannot be imported here: its fields are kept, it draws nothing.

    Args:
        record: the file's record of the analysis (``name``, ``class``, ``config``, ``fields``).
        reason: why its class could not be imported.
    """

    def __init__(self, record: Mapping[str, Any], reason: str) -> None:
        self.record, self.reason = dict(record), reason
        self.name = str(record.get("name", "unknown"))  # type: ignore[misc]
        self.fields = tuple(field_from_json(f) for f in record.get("fields") or ())  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        """The options the file recorded."""
        return dict(self.record.get("config") or {})

    def describe(self) -> dict[str, Any]:
        """The file's record, as it was (minus the field declarations, which :meth:`CKAResult.save` adds again)."""
        return {k: v for k, v in self.record.items() if k != "fields"}


def field_to_json(f: Field) -> dict[str, Any]:
    """A field declaration as JSON-ready builtins (probe files record the declarations of their analyses)."""
    return {"key": f.key, "kind": f.kind, "doc": f.doc, "per_model": f.per_model, "shape": f.shape}


def field_from_json(data: Mapping[str, Any]) -> Field:
    """The inverse of :func:`field_to_json`."""
    shape = data.get("shape")
    return Field(
        str(data["key"]),
        data["kind"],
        str(data.get("doc", "")),
        bool(data.get("per_model", False)),
        None if shape is None else tuple(shape),
    )


def declared_anywhere(key: str) -> bool:
    """Whether any analysis class defined so far declares the field ``key`` (``reference_<key>`` for per-model ones)."""
    for cls in _BY_NAME.values():
        for f in cls.fields:
            if key == f.key or (f.per_model and key == f"reference_{f.key}"):
                return True
    return False


def registered(name: str) -> type[Analysis] | None:
    """The analysis class defined with ``name`` (once its module has been imported), or ``None``."""
    return _BY_NAME.get(name)


def resolve_class(path: str) -> type[Analysis]:
    """The analysis class at ``"module:Qualname"``, importing its module.

    Raises:
        ImportError: the module cannot be imported, or holds no such subclass of :class:`Analysis`.
    """
    module_name, _, qualname = path.partition(":")
    if not all(part.isidentifier() for part in (*module_name.split("."), *qualname.split("."))):
        raise ImportError(f"{path!r} is not a 'module:Class' path")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if not (isinstance(target, type) and issubclass(target, Analysis)):
        raise ImportError(f"{path} is not an Analysis subclass")
    return target


def from_record(record: Mapping[str, Any]) -> Analysis:
    """An analysis rebuilt from its :meth:`Analysis.describe` record.

    An :class:`UnresolvedAnalysis` when its class cannot be imported or rejects the stored options.
    """
    try:
        cls = resolve_class(str(record.get("class", "")))
    except Exception as err:  # an unimportable module: the fields the record declares are kept
        return UnresolvedAnalysis(record, f"{type(err).__name__}: {err}")
    try:
        return cls(**dict(record.get("config") or {}))
    except Exception as err:  # options this version does not take: the class's fields are kept
        declared = {**record, "fields": [field_to_json(f) for f in cls.fields]}
        return UnresolvedAnalysis(declared, f"its stored options are refused here ({type(err).__name__}: {err})")


def describe_error(error: BaseException) -> str:
    """``RuntimeError: what went wrong``: an error as one readable line."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def json_ready(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` (the option ``name``) survives a round trip through JSON unchanged."""
    try:
        same = json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(f"{name} must be made of plain types (bool, int, float, str, lists, dicts), got {value!r}.")


def _parameters(cls: type) -> list[str]:
    signature = inspect.signature(cls.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, p in list(signature.parameters.items())[1:] if p.kind in kinds]


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"

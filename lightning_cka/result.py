"""One probe's results as named fields, with the ``.npz`` layout shared by the monitor, the CLI and the one-shot API.

A result knows the analyses that made it; their classes declare the fields (the probe's own are below,
:data:`PROBE_FIELDS`). A probe file records its analyses (class, options and field declarations), so reading it needs
no list of analyses kept anywhere, and imports neither torch nor timm. A field the probe did not measure is ``None``,
never an empty placeholder.
"""

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cka.engine.analysis import (
    Analysis,
    Field,
    UnresolvedAnalysis,
    View,
    declared_anywhere,
    field_to_json,
    from_record,
)
from lightning_cka.probe_file import FORMAT_VERSION, FieldError, check_shapes, decode, encode, read_arrays, write_arrays

PROBE_FIELDS = (
    Field("layers", "names", "(L,) names of the monitored layers", per_model=True),
    Field(
        "label", "text", "what the model is (the reference's timm name or checkpoint, trained or not)", per_model=True
    ),
    Field("step", "int", "trainer global_step of the probe (-1 outside training)"),
    Field("epoch", "int", "trainer epoch of the probe (-1 outside training)"),
    Field("num_examples", "int", "probe images used"),
    Field("run", "text", "the run the probe belongs to (logger name/version)"),
    Field("probe_hash", "text", "SHA-1 of the probe images (equal hashes: the same images in the same order)"),
    Field(
        "probe_indices",
        "ints",
        "(N,) dataset indices of the probe images, when drawn from a dataset",
        shape=("num_examples",),
    ),
    Field("settings", "text", "JSON: what the probe ran with (layers, reductions, minibatch size, probe source, ...)"),
    Field("events", "text", "JSON: the events the monitor noticed at this probe (step, analysis, kind, text, subject)"),
)
_DEFAULTS = {"step": -1, "epoch": -1, "num_examples": 0}
_RECORD_KEYS = ("format_version", "analyses")  # stored beside the fields: the layout and the analyses' records


class CKAResult:
    """The results of one probe: CKA matrices with error bars, attention statistics and the other analyses' arrays.

    Every field is an attribute (``result.intra``, ``result.reference``, ``result.mean_attention_distance``...) that is
    ``None`` when the probe did not measure it; ``docs/tags/arrays.md`` lists them all. Fields of the reference model
    carry a ``reference_`` prefix (``reference_intra``, ``reference_layers``); :meth:`part` gives one model's fields
    without it.

    Args:
        fields: field values by key.
        analyses: the analyses that made the fields (they declare them and draw them). Default: the built-in analyses
            of lightning-cka 0.1 (every one of them, with default options).
        values: more field values as keywords.

    Example:
        >>> import numpy as np
        >>> result = CKAResult(layers=["a", "b"], intra=np.eye(2), step=3)
        >>> result.intra.shape, result.reference is None, result.epoch
        ((2, 2), True, -1)
    """

    def __init__(
        self, fields: Mapping[str, Any] | None = None, /, *, analyses: Sequence[Analysis] | None = None, **values: Any
    ) -> None:
        if analyses is None:
            analyses = [from_record(record) for record in legacy_records({})]
        schema = _schema(analyses)
        merged = {**(fields or {}), **values}
        unknown = sorted(set(merged) - set(schema))
        if unknown:
            raise TypeError(
                f"CKAResult has no field(s) {unknown} (its analyses: {', '.join(a.name for a in analyses)}); see "
                "docs/tags/arrays.md for the fields."
            )
        object.__setattr__(self, "_analyses", tuple(analyses))
        object.__setattr__(self, "_schema", schema)
        object.__setattr__(self, "_values", {k: v for k, v in merged.items() if v is not None})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = self.__dict__["_values"]
        if name in values:
            return values[name]
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        if name in self.__dict__["_schema"] or declared_anywhere(name):  # a field of an analysis this probe did not run
            return None
        raise AttributeError(f"CKAResult has no field {name!r}; see docs/tags/arrays.md for the fields.")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._schema:
            raise AttributeError(f"CKAResult has no field {name!r}; see docs/tags/arrays.md for the fields.")
        if value is None:
            self._values.pop(name, None)
        else:
            self._values[name] = value

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __repr__(self) -> str:
        return f"CKAResult(step={self.step}, fields={sorted(self._values)})"

    @property
    def analyses(self) -> tuple[Analysis, ...]:
        """The analyses that made this probe, in the order of their figures."""
        return self._analyses

    @property
    def schema(self) -> dict[str, Field]:
        """The declaration of every field this result can hold, by key (per-model fields also as ``reference_*``)."""
        return dict(self._schema)

    def analysis(self, name: str) -> Analysis | None:
        """The analysis called ``name`` that made this probe, or ``None``."""
        return next((a for a in self._analyses if a.name == name), None)

    def get(self, key: str, default: Any = None) -> Any:
        """The field ``key``, or ``default`` when the probe did not measure it."""
        return self._values.get(key, default)

    def part(self, role: str) -> "CKAResult":
        """The fields of one model (``"model"`` or ``"reference"``) under their per-model names.

        For the reference, ``part("reference").intra`` is ``reference_intra``; the probe's own fields (step, run, ...)
        are kept. Fields that compare the two models (``reference``, ``previous``) belong to neither part.
        """
        if role == "model":
            return self
        prefix = f"{role}_"
        per_model = {f.key for f in self._schema.values() if f.per_model}
        shared = {f.key for f in PROBE_FIELDS if not f.per_model}
        values = {key: self._values[key] for key in shared if key in self._values}
        values |= {key: self._values[prefix + key] for key in per_model if prefix + key in self._values}
        return CKAResult(values, analyses=self._analyses)

    def settings_dict(self) -> dict[str, Any]:
        """The probe's settings (layers, reductions, minibatch size, probe source, ...) as a dict; empty if unknown."""
        return json.loads(self.settings) if self.settings else {}

    # ------------------------------------------------------------------------------------------------------ file I/O

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.npz`` atomically (a temporary file renamed into place) and return its path.

        The file records the analyses (class, options, field declarations) beside their fields. A kill mid-write
        leaves the temporary file (``.<name>.<pid>.tmp``), never a truncated file under the final name.
        """
        records = [
            {**analysis.describe(), "fields": [field_to_json(f) for f in analysis.fields]} for analysis in self.analyses
        ]
        arrays = {"format_version": encode(Field("format_version", "int", ""), FORMAT_VERSION)}
        arrays["analyses"] = encode(Field("analyses", "text", ""), json.dumps(records))
        for key, value in self._values.items():
            arrays[key] = encode(self._schema[key], value)
        return write_arrays(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CKAResult":
        """Read a ``.npz`` written by :meth:`save` or ``CKAMonitor`` (also the files of lightning-cka 0.1).

        Every field is checked against its declaration (kind, dtype, and a shape that agrees with the layer lists)
        and no array is allocated before its size is checked against the file.

        Raises:
            ValueError: the file cannot be read, is not a probe file, was written by a newer lightning-cka, or holds a
                field that does not match its declaration (the message names the file and the field).
        """
        try:
            return cls._from_arrays(read_arrays(path))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def check(cls, path: str | os.PathLike) -> None:
        """Check a probe file as :meth:`load` does (kinds, dtypes, shapes) from its headers and small arrays only.

        Raises:
            ValueError: what :meth:`load` would raise for the file's structure (its large arrays' values are not read).
        """
        try:
            cls._from_arrays(read_arrays(path, headers_only=True))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def _from_arrays(cls, raw: dict[str, Any]) -> "CKAResult":
        if "layers" not in raw:
            raise ValueError("not a lightning-cka probe file: it has no 'layers'")
        version = decode(Field("format_version", "int", ""), "format_version", raw.pop("format_version", np.asarray(1)))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"written by a newer lightning-cka (file format {version}, this one reads up to {FORMAT_VERSION}): "
                "upgrade lightning-cka"
            )
        if "analyses" in raw:
            records = json.loads(decode(Field("analyses", "text", ""), "analyses", raw.pop("analyses")) or "[]")
            if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
                raise FieldError("analyses", "is not a list of analysis records")
            analyses = [from_record(record) for record in records]
        else:  # files of lightning-cka 0.1 and 0.2: the analyses of those versions, with the options they stored
            settings = raw.get("settings")
            records = legacy_records(json.loads(str(settings)) if settings is not None and str(settings) else {})
            analyses = [from_record(record) for record in records]
        schema = _schema(analyses)
        values = {}
        for key, array in raw.items():
            if key in schema:
                value = decode(schema[key], key, array)
                if value is not None:
                    values[key] = value
        check_shapes(schema, values)
        return cls(values, analyses=analyses)

    # ------------------------------------------------------------------------------------------------- pictures, tags

    def figures(self, previous: "CKAResult | None" = None, view: View | None = None) -> list:
        """Every figure of this probe (:class:`lightning_cka.figures.spec.Figure`), as the monitor logs them."""
        view = view or View(run=self.run or "")
        meta = {"step": self.step, "run": view.run, "probe": self.probe_hash or "", "num_examples": self.num_examples}
        return [
            replace(figure, meta={**meta, **figure.meta})
            for analysis in self.analyses
            for figure in analysis.figures(self, previous, view)
        ]

    def scalars(self, view: View | None = None) -> dict[str, float]:
        """The probe's headline numbers by tag, as the monitor logs them."""
        view = view or View(run=self.run or "")
        return {tag: value for analysis in self.analyses for tag, value in analysis.scalars(self, view).items()}

    def unresolved(self) -> list[str]:
        """Why analyses of this probe draw nothing here (their classes could not be imported), one line each."""
        return [
            f"{a.name} ({a.record.get('class')}): {a.reason}"
            for a in self.analyses
            if isinstance(a, UnresolvedAnalysis)
        ]

    def plot(self, previous: "CKAResult | None" = None, view: View | None = None) -> Any:
        """One matplotlib figure with every figure of this probe, one row each."""
        from lightning_cka.figures.render import draw_figures

        return draw_figures(self.figures(previous, view))


def _schema(analyses: Sequence[Analysis]) -> dict[str, Field]:
    out: dict[str, Field] = {}
    for f in (*PROBE_FIELDS, *(f for analysis in analyses for f in analysis.fields)):
        if f.key in _RECORD_KEYS:
            raise ValueError(f"field name {f.key!r} is reserved by the probe file layout.")
        out[f.key] = f
        if f.per_model:
            out[f"reference_{f.key}"] = f
    return out


def legacy_records(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The analyses of a file written before files recorded their own (lightning-cka 0.1, formats 1 and 2).

    Those files hold the fields of a fixed set of built-in analyses, and format 2 stores the options they ran with in
    its ``settings``: this is that set, as the records a newer file would hold. The list is frozen; an analysis added
    later cannot be in those files.

    Example:
        >>> [record["name"] for record in legacy_records({"options": {"permutations": 39}})][:3]
        ['cka', 'attention', 'heads']
        >>> legacy_records({"options": {"permutations": 39}})[0]["config"]
        {'permutations': 39}
    """
    options = settings.get("options") if isinstance(settings.get("options"), dict) else {}
    null = {key: options[key] for key in ("permutations", "minibatch_weights") if key in options}
    attention = {
        "renormalize": bool(options.get("renormalize_attention", False)),
        "local_threshold": settings.get("local_threshold", 0.5),
    }
    classes = [
        ("cka", "layer_cka:LayerCKA", null),
        ("attention", "attention:AttentionStats", attention),
        ("heads", "heads:HeadCKA", null),
        ("residual", "residual:ResidualRatio", {}),
        ("localization", "localization:Localization", {"layer": options.get("localization_layer"), **null}),
        ("linear_probe", "linear_probe:LinearProbe", {}),
        ("rank", "rank:EffectiveRank", {}),
    ]
    return [
        {"name": name, "class": f"lightning_cka.analyses.{path}", "config": config} for name, path, config in classes
    ]

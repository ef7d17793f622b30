"""One probe's results as named fields, with the ``.npz`` layout shared by the monitor, the CLI and the one-shot API.

The fields are declared where they are computed: the probe's own below (:data:`PROBE_FIELDS`), every analysis's in its
class (``lightning_cka.analyses``). A field the probe did not measure is ``None``, never an empty placeholder.
"""

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cka.engine.analysis import Field, View

FORMAT_VERSION = 2
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
    Field("probe_indices", "ints", "(N,) dataset indices of the probe images, when drawn from a dataset"),
    Field("settings", "text", "JSON: the options and reductions the probe ran with"),
    Field("format_version", "int", "version of this file layout (2; files without it are version 1)"),
)
_DEFAULTS = {"step": -1, "epoch": -1, "num_examples": 0}


def all_fields() -> dict[str, Field]:
    """Every field a probe file can hold, by key (per-model fields also under ``reference_<key>``)."""
    from lightning_cka.analyses import ANALYSES

    declared = [*PROBE_FIELDS, *(f for analysis in ANALYSES for f in analysis.fields)]
    out: dict[str, Field] = {}
    for f in declared:
        out[f.key] = f
        if f.per_model:
            out[f"reference_{f.key}"] = f
    return out


class CKAResult:
    """The results of one probe: CKA matrices with error bars, attention statistics and the other analyses' arrays.

    Every field is an attribute (``result.intra``, ``result.reference``, ``result.mean_attention_distance``...) that is
    ``None`` when the probe did not measure it; ``docs/tags/arrays.md`` lists them all. Fields of the reference model
    carry a ``reference_`` prefix (``reference_intra``, ``reference_layers``); :meth:`part` gives one model's fields
    without it.

    Args:
        fields: field values by key.
        values: more field values as keywords.

    Example:
        >>> import numpy as np
        >>> result = CKAResult(layers=["a", "b"], intra=np.eye(2), step=3)
        >>> result.intra.shape, result.reference is None, result.epoch
        ((2, 2), True, -1)
    """

    def __init__(self, fields: Mapping[str, Any] | None = None, /, **values: Any) -> None:
        merged = {**(fields or {}), **values}
        known = all_fields()
        unknown = sorted(set(merged) - set(known))
        if unknown:
            raise TypeError(f"CKAResult has no field(s) {unknown}; see docs/tags/arrays.md for the fields.")
        object.__setattr__(self, "_values", {k: v for k, v in merged.items() if v is not None})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = self.__dict__["_values"]
        if name in values:
            return values[name]
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        if name in all_fields():
            return None
        raise AttributeError(f"CKAResult has no field {name!r}; see docs/tags/arrays.md for the fields.")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in all_fields():
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
        per_model = {key for key, f in all_fields().items() if f.per_model and not key.startswith(prefix)}
        shared = {f.key for f in PROBE_FIELDS if not f.per_model}
        values = {key: self._values[key] for key in shared if key in self._values}
        values |= {key: self._values[prefix + key] for key in per_model if prefix + key in self._values}
        return CKAResult(values)

    def settings_dict(self) -> dict[str, Any]:
        """The probe's settings (options, reductions, layers) as a dict; empty for files written before version 2."""
        return json.loads(self.settings) if self.settings else {}

    # ------------------------------------------------------------------------------------------------------ file I/O

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` atomically (a temporary file renamed into place) and return its path.

        A kill mid-write leaves the temporary file (``.<name>.<pid>.tmp``), never a truncated file under the final
        name; parent directories are created.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        known = all_fields()
        arrays = {"format_version": np.asarray(FORMAT_VERSION, dtype=np.int64)}
        for key, value in self._values.items():
            arrays[key] = _encode(known[key].kind, value)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CKAResult":
        """Read a ``.npz`` written by :meth:`save` or ``CKAMonitor`` (also files of lightning-cka 0.1, version 1).

        Raises:
            ValueError: the file is empty, truncated, not a probe file, or written by a newer lightning-cka (the
                message says which).
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                raw = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); it may be cut short.") from err
        if not {"layers", "intra"} <= set(raw):
            raise ValueError(f"{path} is not a lightning-cka probe file: it lacks 'layers' and 'intra'.")
        version = int(raw.pop("format_version", 1))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer lightning-cka (file format {version}, this one reads up to "
                f"{FORMAT_VERSION}): upgrade lightning-cka."
            )
        known = all_fields()
        values = {}
        for key, value in raw.items():
            if key in known:
                decoded = _decode(known[key].kind, value)
                if decoded is not None:
                    values[key] = decoded
        return cls(values)

    # ------------------------------------------------------------------------------------------------- pictures, tags

    def figures(self, previous: "CKAResult | None" = None, view: View | None = None) -> list:
        """Every figure of this probe (:class:`lightning_cka.figures.spec.Figure`), as the monitor logs them."""
        from lightning_cka.analyses import ANALYSES

        view = view or View(run=self.run or "")
        meta = {"step": self.step, "run": view.run, "probe": self.probe_hash or "", "num_examples": self.num_examples}
        return [
            replace(figure, meta={**meta, **figure.meta})
            for analysis in ANALYSES
            for figure in analysis.figures(self, previous, view)
        ]

    def scalars(self, view: View | None = None) -> dict[str, float]:
        """The probe's headline numbers by tag, as the monitor logs them."""
        from lightning_cka.analyses import ANALYSES

        view = view or View(run=self.run or "")
        return {tag: value for analysis in ANALYSES for tag, value in analysis.scalars(self, view).items()}

    def plot(self, previous: "CKAResult | None" = None, view: View | None = None) -> Any:
        """One matplotlib figure with every figure of this probe, one row each."""
        from lightning_cka.figures.render import draw_figures

        return draw_figures(self.figures(previous, view))


def _encode(kind: str, value: Any) -> np.ndarray:
    if kind == "names":
        return np.asarray(list(value), dtype=str).reshape(-1)
    if kind == "text":
        return np.asarray(str(value), dtype=str)
    if kind == "int":
        return np.asarray(int(value), dtype=np.int64)
    if kind == "ints":
        return np.asarray(value, dtype=np.int64).reshape(-1)
    return np.asarray(value, dtype=np.float64)


def _decode(kind: str, value: np.ndarray) -> Any:
    """A stored array as its field value; ``None`` for what version-1 files wrote for "absent"."""
    if kind == "names":
        return [str(v) for v in value] if value.size else None
    if kind == "text":
        return str(value) if str(value) else None
    if kind == "int":
        return int(value)
    if kind == "ints":
        return value.astype(np.int64) if value.size else None
    if kind == "float":
        return None if np.isnan(value) else float(value)
    return value if value.size else None  # version 1 wrote absent matrices as empty arrays

"""One probe's matrices and distances, with the ``.npz`` layout shared by the callback, the CLI and the one-shot API."""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cka.plotting import attention_distance_plot, cka_heatmap

_NAME_FIELDS = ("layers", "reference_layers", "attention_layers", "reference_attention_layers")
_SCALAR_FIELDS = ("step", "epoch", "num_examples")
_FLOAT_FIELDS = ("uniform_attention_distance", "reference_uniform_attention_distance")


@dataclass
class CKAResult:
    """CKA matrices and mean attention distances of one probe.

    Saved as ``.npz`` with one array per field; absent parts are empty arrays, names are unicode arrays (no pickle).

    Attributes:
        layers: the monitored model's layer names (model A in :func:`lightning_cka.compare_models`).
        intra: ``(La, La)`` minibatch CKA of those layers with each other.
        reference_layers: the reference model's layer names (model B), or empty.
        reference: ``(La, Lb)`` CKA of the model's layers (rows) with the reference's layers (columns).
        reference_intra: ``(Lb, Lb)`` CKA of the reference's layers with each other.
        previous: ``(La, La)`` CKA of the model's layers now (rows) with the same layers at the previous probe
            (columns), on the same probe images; empty for the first probe.
        attention_layers: names of the attention modules of the model.
        mean_attention_distance: ``(Lh, heads)`` in pixels.
        uniform_attention_distance: the mean distance, in pixels, that uniform attention over the model's patch grid
            would have: the scale against which heads are called local (NaN without attention layers).
        reference_attention_layers: the same for the reference.
        reference_mean_attention_distance: the same for the reference.
        reference_uniform_attention_distance: the same for the reference.
        step: trainer ``global_step`` of the probe (-1 outside training).
        epoch: trainer epoch of the probe (-1 outside training).
        num_examples: probe images used.
    """

    layers: list[str]
    intra: np.ndarray
    reference_layers: list[str] = field(default_factory=list)
    reference: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    reference_intra: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    previous: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    attention_layers: list[str] = field(default_factory=list)
    mean_attention_distance: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    reference_attention_layers: list[str] = field(default_factory=list)
    reference_mean_attention_distance: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    uniform_attention_distance: float = float("nan")
    reference_uniform_attention_distance: float = float("nan")
    step: int = -1
    epoch: int = -1
    num_examples: int = 0

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` (parent directories are created) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _NAME_FIELDS:
                arrays[f.name] = np.asarray(value, dtype=str).reshape(-1)
            elif f.name in _SCALAR_FIELDS:
                arrays[f.name] = np.asarray(value, dtype=np.int64)
            else:
                arrays[f.name] = np.asarray(value, dtype=np.float64)
        with path.open("wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CKAResult":
        """Read a ``.npz`` written by :meth:`save` (or by ``CKAMonitor``)."""
        with np.load(Path(path), allow_pickle=False) as data:
            missing = {"layers", "intra"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a lightning-cka array file: it lacks {sorted(missing)}.")
            values: dict[str, Any] = {}
            for f in fields(cls):
                if f.name not in data.files:
                    continue
                value = data[f.name]
                if f.name in _NAME_FIELDS:
                    values[f.name] = [str(v) for v in value]
                elif f.name in _SCALAR_FIELDS:
                    values[f.name] = int(value)
                elif f.name in _FLOAT_FIELDS:
                    values[f.name] = float(value)
                else:
                    values[f.name] = value
        return cls(**values)

    def plot(self) -> Any:
        """One figure: the intra-model heatmap, the reference heatmaps and the attention distances, as available."""
        from matplotlib.figure import Figure

        panels = [("intra", self.intra, self.layers, self.layers, "model layers", "model layers")]
        if self.reference.size:
            panels.append(("reference", self.reference, self.layers, self.reference_layers, "model", "reference"))
            panels.append(
                ("reference_intra", self.reference_intra, self.reference_layers, self.reference_layers, "ref", "ref")
            )
        distances = [(self.attention_layers, self.mean_attention_distance, "model")]
        distances.append((self.reference_attention_layers, self.reference_mean_attention_distance, "reference"))
        distances = [d for d in distances if d[1].size]
        count = len(panels) + len(distances)
        fig = Figure(figsize=(5.5 * count, 5), layout="constrained")
        axes = fig.subplots(1, count, squeeze=False)[0]
        for ax, (title, matrix, rows, cols, row_label, col_label) in zip(axes, panels, strict=False):
            cka_heatmap(matrix, rows, cols, ax=ax, title=title, row_label=row_label, col_label=col_label)
        for ax, (names, values, who) in zip(axes[len(panels) :], distances, strict=True):
            attention_distance_plot(values, names, ax=ax, title=f"mean attention distance ({who})")
        suffix = f" at step {self.step}" if self.step >= 0 else ""
        fig.suptitle(f"CKA over {self.num_examples} probe images{suffix}")
        return fig

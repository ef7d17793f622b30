"""The states of the linear probe, reduced over ranks into ridge fits and their accuracy.

Sufficient statistics of the fit half and the scored half's features (see :mod:`lightning_cka.analyses.linear_probe`).
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cka.functional.ridge import RidgeFit, fit_ridge, score
from lightning_cka.metrics.sums import TensorMaxima, TensorSums

if TYPE_CHECKING:
    from lightning_cka.taps.linear_probe import ProbeFeatures

LABEL_FIX = (
    "pass labels with the probe data ((image, label) batches, or label_key for dict batches; CKAMonitor takes them "
    "from the validation set's (image, label) batches) or leave the linear_probe analysis out"
)


class LinearProbeStates:
    """Per layer and feature set (CLS, pooled), what the ridge probes need, accumulated minibatch by minibatch.

    Even probe indices are fitted, odd ones scored. Summed over ranks in :meth:`reduce`, where every rank solves the
    same ridge problems and scores its own kept features.

    Args:
        num_layers: the monitored layers.
        device: where the states live.
    """

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self._num_layers = num_layers
        self._device = device
        self._classes = 0
        self._counts: dict[str, Tensor] = {}  # "fit", "score": (C,) class counts
        self._stats: dict[tuple[int, int], dict[str, Tensor]] = {}  # (layer, kind) -> xtx, xty, sx
        self._kept: dict[tuple[int, int], list[Tensor]] = {}  # (layer, kind) -> scored-half features per minibatch
        self._kept_labels: list[Tensor] = []

    def update(self, value: "ProbeFeatures", labels: Tensor | None, start: int, size: int, index: int) -> None:
        """Add one minibatch: its features, its labels and where it starts in the probe (which images are fitted)."""
        device = value.gap[0].device
        labels = self._labels(labels, size, index, device)
        fit = (start + torch.arange(size, device=device)) % 2 == 0
        self._grow(int(labels.max()) + 1 if labels.numel() else 0, device)
        fit_labels, score_labels = labels[fit], labels[~fit]
        onehot = F.one_hot(fit_labels, self._classes).to(torch.float64)  # a product, not index_add: deterministic
        self._counts["fit"] += onehot.sum(dim=0)
        self._counts["score"] += torch.bincount(score_labels, minlength=self._classes).to(torch.float64)
        self._kept_labels.append(score_labels)
        for layer, (cls, gap, dtype) in enumerate(zip(value.cls, value.gap, value.dtypes, strict=True)):
            for kind, x in enumerate((cls, gap)):
                if x is None:
                    continue
                xf = x[fit]
                stats = self._stats.get((layer, kind))
                if stats is None:
                    d = x.shape[1]
                    stats = {
                        "xtx": x.new_zeros((d, d)),
                        "xty": x.new_zeros((d, self._classes)),
                        "sx": x.new_zeros(d),
                    }
                    self._stats[(layer, kind)] = stats
                stats["xtx"] += xf.T @ xf
                stats["xty"] += xf.T @ onehot
                stats["sx"] += xf.sum(dim=0)
                self._kept.setdefault((layer, kind), []).append(x[~fit].to(dtype))

    def _labels(self, labels: Tensor | None, size: int, index: int, device: torch.device) -> Tensor:
        if labels is None:
            raise ValueError(f"linear_probe needs class labels, but probe minibatch {index} has none: {LABEL_FIX}.")
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"linear_probe: labels must be integer class indices, got dtype {labels.dtype}.")
        if labels.shape != (size,):
            raise ValueError(
                f"linear_probe: labels must have shape ({size},) (one class index per image), got "
                f"{tuple(labels.shape)}."
            )
        labels = labels.to(device, torch.int64)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("linear_probe: labels must be class indices >= 0 (drop ignored examples from the probe).")
        return labels

    def _grow(self, classes: int, device: torch.device) -> None:
        """Widen the class axis of every state to ``classes`` (labels arrive minibatch by minibatch)."""
        if not self._counts:
            self._counts = {k: torch.zeros(0, dtype=torch.float64, device=device) for k in ("fit", "score")}
        extra = classes - self._classes
        if extra <= 0:
            return
        self._classes = classes
        self._counts = {k: F.pad(v, (0, extra)) for k, v in self._counts.items()}
        for stats in self._stats.values():
            stats["xty"] = F.pad(stats["xty"], (0, extra))

    def reduce(self) -> dict[str, Tensor]:
        """Agree on shapes, sum the statistics over ranks, solve and score (collective: every rank, same order).

        Returns:
            ``correct`` ``(L, 2)`` scored images classified right (NaN where no fit), ``ridge`` ``(L, 2)`` the chosen
            λ, ``fit_counts`` and ``score_counts`` ``(C,)`` per class, all on the CPU.
        """
        num_layers, device = self._num_layers, self._device
        # 1. Shapes (feature dims, classes) agreed over ranks: a rank without minibatches knows none of them.
        local = torch.zeros(2 * num_layers + 1, dtype=torch.float64)
        for (layer, kind), stats in self._stats.items():
            local[2 * layer + kind] = stats["sx"].shape[0]
        local[-1] = self._classes
        maxima = TensorMaxima(local.numel()).to(device)
        maxima.update(local.to(device))
        agreed = maxima.compute().cpu().long()
        classes, dims = int(agreed[-1]), agreed[:-1].view(num_layers, 2)
        # 2. Sufficient statistics summed over ranks (every rank the same names, shapes and order).
        shapes: dict[str, tuple[int, ...]] = {"fit_counts": (classes,), "score_counts": (classes,)}
        present = [(layer, kind) for layer in range(num_layers) for kind in range(2) if dims[layer, kind] > 0]
        for layer, kind in present:
            d = int(dims[layer, kind])
            shapes |= {f"xtx_{layer}_{kind}": (d, d), f"xty_{layer}_{kind}": (d, classes), f"sx_{layer}_{kind}": (d,)}
        sums = TensorSums(shapes).to(device)
        for name, shape in shapes.items():
            sums.update(name, self._local(name, shape, device))
        totals = sums.compute()
        fit_counts, score_counts = totals["fit_counts"], totals["score_counts"]
        n_fit = float(fit_counts.sum())
        # 3. Every rank solves the same problems, scores its own scored half; the correct counts are summed.
        ridge = torch.full((num_layers, 2), torch.nan, dtype=torch.float64)
        correct = torch.full((num_layers, 2), torch.nan, dtype=torch.float64, device=device)
        for layer, kind in present:
            fit = self._solve(totals, layer, kind, fit_counts) if n_fit >= 2 else None
            if fit is None:
                continue
            ridge[layer, kind] = fit.ridge
            total = torch.zeros((), dtype=torch.float64, device=device)
            # minibatch by minibatch: no float64 copy of the whole scored half
            for features, labels in zip(self._kept.get((layer, kind), []), self._kept_labels, strict=False):
                total = total + score(fit, features.to(device), labels.to(device), fit_counts > 0)
            correct[layer, kind] = total
        counts = TensorSums({"correct": (num_layers, 2)}).to(device)
        counts.update("correct", correct)
        correct = counts.compute()["correct"]
        return {
            "correct": correct.cpu(),
            "ridge": ridge,
            "fit_counts": fit_counts.cpu(),
            "score_counts": score_counts.cpu(),
        }

    def _local(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """This rank's part of the sum ``name``, zero-padded to the agreed ``shape``."""
        out = torch.zeros(shape, dtype=torch.float64, device=device)
        if name in ("fit_counts", "score_counts"):
            value = self._counts.get(name.split("_")[0])
        else:
            key, layer, kind = name.split("_")
            value = self._stats.get((int(layer), int(kind)), {}).get(key)
        if value is not None:
            out[tuple(slice(0, s) for s in value.shape)] = value.to(device)
        return out

    @staticmethod
    def _solve(totals: dict[str, Tensor], layer: int, kind: int, counts: Tensor) -> RidgeFit | None:
        """The ridge fit of one layer's features, or ``None`` when its statistics are not finite (NaN stays NaN)."""
        xtx, xty, sx = (totals[f"{key}_{layer}_{kind}"] for key in ("xtx", "xty", "sx"))
        if not (torch.isfinite(xtx).all() and torch.isfinite(sx).all()):
            return None
        try:
            return fit_ridge(xtx, xty, sx, counts)
        except torch.linalg.LinAlgError:  # same statistics on every rank, so every rank lands here together
            return None

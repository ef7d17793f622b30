"""The states of the linear probe, reduced over ranks into ridge fits and their accuracy.

Sufficient statistics of the fit half, the fit half's features (for the shuffled-label probes) and the scored half's
features (see :mod:`lightning_cka.analyses.linear_probe`).
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cka.functional.ridge import RidgeBasis, RidgeFit, label_permutation, ridge_basis, score, solve_ridge
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

    The chance level: ``shuffles`` more ridge fits per layer and feature set on the same fit-half features, with the
    fit half's labels permuted across the whole fit half (:func:`lightning_cka.functional.ridge.label_permutation` of
    the fit images in the order of their global probe index, seeded from ``seed`` and the shuffle: the same whatever
    the ranks), each with its own GCV λ, scored on the scored half with the true labels. The fit half's labels are
    summed over ranks into one ``(N/2,)`` vector for it, and its features are kept (in the layer's precision, like the
    scored half), so the memory does not grow with the shuffles or the classes. A permutation within each minibatch
    would leave label information in: an image would keep a label of its own class with probability
    ``1/C + (1 - 1/C)/m`` (``m`` fitted images per minibatch), 0.16 instead of 0.10 for 10 classes and ``m = 16``.

    Args:
        num_layers: the monitored layers.
        device: where the states live.
        shuffles: shuffled-label probes (0: none, no chance level).
        seed: the probe's seed.
    """

    def __init__(self, num_layers: int, device: torch.device, shuffles: int = 0, seed: int = 0) -> None:
        self._num_layers = num_layers
        self._device = device
        self._shuffles = shuffles
        self._seed = seed
        self._classes = 0
        self._counts: dict[str, Tensor] = {}  # "fit", "score": (C,) class counts
        self._stats: dict[tuple[int, int], dict[str, Tensor]] = {}  # (layer, kind) -> xtx, xty, sx
        self._kept: dict[tuple[int, int], list[Tensor]] = {}  # (layer, kind) -> scored-half features per minibatch
        self._kept_labels: list[Tensor] = []
        self._fit_kept: dict[tuple[int, int], list[Tensor]] = {}  # (layer, kind) -> fit-half features per minibatch
        self._fit_slots: list[Tensor] = []  # per minibatch, its fit images' places in the fit half (global index // 2)
        self._fit_labels: list[Tensor] = []  # per minibatch, its fit images' labels

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
        if self._shuffles:
            self._fit_slots.append((start + torch.arange(size, device=device))[fit] // 2)
            self._fit_labels.append(fit_labels)
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
                if self._shuffles:
                    self._fit_kept.setdefault((layer, kind), []).append(xf.to(dtype))

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
            ``correct`` ``(L, 2)`` scored images classified right (NaN where no fit), ``shuffled`` ``(P, L, 2)`` the
            same for each shuffled-label probe, ``ridge`` ``(L, 2)`` the chosen λ, ``fit_counts`` and ``score_counts``
            ``(C,)`` per class, all on the CPU.
        """
        num_layers, device = self._num_layers, self._device
        # 1. Shapes (feature dims, fit-half size, classes) agreed over ranks: a rank without minibatches knows none.
        local = torch.zeros(2 * num_layers + 2, dtype=torch.float64)
        for (layer, kind), stats in self._stats.items():
            local[2 * layer + kind] = stats["sx"].shape[0]
        local[-2] = max((int(slots.max()) + 1 for slots in self._fit_slots if slots.numel()), default=0)
        local[-1] = self._classes
        maxima = TensorMaxima(local.numel()).to(device)
        maxima.update(local.to(device))
        agreed = maxima.compute().cpu().long()
        slots, classes, dims = int(agreed[-2]), int(agreed[-1]), agreed[:-2].view(num_layers, 2)
        # 2. Sufficient statistics summed over ranks (every rank the same names, shapes and order).
        shapes: dict[str, tuple[int, ...]] = {"fit_counts": (classes,), "score_counts": (classes,)}
        if self._shuffles:
            shapes["fit_labels"] = (slots,)  # label + 1 of each fit image by its place (0: no image there)
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
        if self._shuffles:
            self._shuffled = self._shuffle(totals["fit_labels"])
        # 3. Every rank solves the same problems, scores its own scored half; the correct counts are summed.
        ridge = torch.full((num_layers, 2), torch.nan, dtype=torch.float64)
        correct = torch.full((num_layers, 2), torch.nan, dtype=torch.float64, device=device)
        shuffled = torch.full((self._shuffles, num_layers, 2), torch.nan, dtype=torch.float64, device=device)
        present_classes = fit_counts > 0
        for layer, kind in present:
            basis = self._basis(totals, layer, kind, fit_counts) if n_fit >= 2 else None
            if basis is None:
                continue
            fit = solve_ridge(basis, totals[f"xty_{layer}_{kind}"])
            ridge[layer, kind] = fit.ridge
            correct[layer, kind] = self._score(fit, layer, kind, present_classes)
            if self._shuffles:  # one collective per layer and feature set: every rank has the same `present`
                shape = (self._shuffles, *totals[f"xty_{layer}_{kind}"].shape)
                permuted = TensorSums({"xty": shape}).to(device)
                permuted.update("xty", self._permuted_xty(layer, kind, shape, device))
                for p, xty in enumerate(permuted.totals()["xty"]):
                    shuffled[p, layer, kind] = self._score(solve_ridge(basis, xty), layer, kind, present_classes)
        counts = TensorSums({"correct": (num_layers, 2), "shuffled": (self._shuffles, num_layers, 2)}).to(device)
        counts.update("correct", correct)
        counts.update("shuffled", shuffled)
        summed = counts.totals()
        return {
            "correct": summed["correct"].cpu(),
            "shuffled": summed["shuffled"].cpu(),
            "ridge": ridge,
            "fit_counts": fit_counts.cpu(),
            "score_counts": score_counts.cpu(),
        }

    def _local(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """This rank's part of the sum ``name``, zero-padded to the agreed ``shape``."""
        out = torch.zeros(shape, dtype=torch.float64, device=device)
        if name == "fit_labels":
            for slots, labels in zip(self._fit_slots, self._fit_labels, strict=True):
                out[slots.to(device)] = labels.to(device, torch.float64) + 1
            return out
        if name in ("fit_counts", "score_counts"):
            value = self._counts.get(name.split("_")[0])
        else:
            key, layer, kind = name.split("_")
            value = self._stats.get((int(layer), int(kind)), {}).get(key)
        if value is not None:
            out[tuple(slice(0, s) for s in value.shape)] = value.to(device)
        return out

    def _score(self, fit: RidgeFit, layer: int, kind: int, present: Tensor) -> Tensor:
        """This rank's scored images that ``fit`` classifies right (true labels).

        Minibatch by minibatch: no float64 copy of the whole scored half.
        """
        total = torch.zeros((), dtype=torch.float64, device=self._device)
        for features, labels in zip(self._kept.get((layer, kind), []), self._kept_labels, strict=False):
            total = total + score(fit, features.to(self._device), labels.to(self._device), present)
        return total

    def _shuffle(self, labels: Tensor) -> Tensor:
        """``(P, slots)`` each shuffle's label of each place of the fit half (-1 where no image is).

        ``labels`` holds label + 1 of every fit image by its place (summed over ranks); the places that hold an image
        are permuted among themselves, in the order of their global probe index, the same on every rank.
        """
        labels = labels.round().long() - 1
        places = torch.nonzero(labels >= 0).flatten()
        out = labels.expand(self._shuffles, -1).clone()
        for p in range(self._shuffles):
            out[p, places] = labels[places][label_permutation(self._seed, p, places.numel()).to(labels.device)]
        return out

    def _permuted_xty(self, layer: int, kind: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """``(P, D, C)`` this rank's ``Σ x yᵀ`` of the fit half with each shuffle's labels."""
        out = torch.zeros(shape, dtype=torch.float64, device=device)
        for features, slots in zip(self._fit_kept.get((layer, kind), []), self._fit_slots, strict=False):
            if not slots.numel():
                continue
            labels = self._shuffled[:, slots.to(self._shuffled.device)]  # (P, n)
            onehot = F.one_hot(labels.to(device), shape[2]).to(torch.float64)  # (P, n, C)
            out += features.to(device, torch.float64).T @ onehot  # (D, n) @ (P, n, C): one batched product
        return out

    @staticmethod
    def _basis(totals: dict[str, Tensor], layer: int, kind: int, counts: Tensor) -> RidgeBasis | None:
        """The eigendecomposition of one layer's features, or ``None``.

        ``None`` when its statistics are not finite (NaN stays NaN) or it does not converge.
        """
        xtx, sx = (totals[f"{key}_{layer}_{kind}"] for key in ("xtx", "sx"))
        if not (torch.isfinite(xtx).all() and torch.isfinite(sx).all()):
            return None
        try:
            return ridge_basis(xtx, sx, counts)
        except torch.linalg.LinAlgError:  # same statistics on every rank, so every rank lands here together
            return None

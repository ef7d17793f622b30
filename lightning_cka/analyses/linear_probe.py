"""Linear probes of the class at every layer: closed-form ridge regression (Raghu et al. 2021, Figures 12-13).

Taps each monitored layer's output reduced on the spot to two ``(n, D)`` feature sets: the CLS token (token 0 of
``(n, T, D)`` outputs of a model with a class token) and the global average pool (mean over the patch tokens, prefix
tokens left out; spatial mean of 4-D conv maps). The probe images are split by the parity of their global probe index
(even: fit, odd: scored), so the split is the same whatever the ranks and minibatches.

State: on the fit half, per layer and feature set, the sufficient statistics ``XᵀX``, ``XᵀY``, ``Σx`` and the class
counts (float64, summed over ranks with ``dist_reduce_fx="sum"``); on the scored half, this rank's features, kept
until the solve (``N/2 × D × layers × 2`` values in the layer's precision, at least float32). In :meth:`reduce`
every rank solves the same ridge problem, picks λ by generalized cross-validation in closed form, scores its own kept
features and the correct counts are summed over ranks. Fields ``linear_probe_*``; figure ``linear_probe/accuracy``.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from typing_extensions import override

from lightning_cka.engine.analysis import Analysis, Field, Minibatch, View
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.spec import Curves, Figure, Line, Series
from lightning_cka.metrics.sums import TensorSums
from lightning_cka.result import CKAResult
from lightning_cka.taps.base import Tap, first_tensor
from lightning_cka.taps.grams import TokenLayout

KINDS = ("cls", "gap")  # the columns of every (L, 2) field
# λ grid of the GCV search: s_max · 10^k for k = -6, -5.75, ..., 2 (s_max: the largest eigenvalue of XcᵀXc). The low
# end is almost least squares, the high end shrinks every coefficient to ~0 (the majority-class predictor).
RIDGE_EXPONENTS = tuple(k / 4 for k in range(-24, 9))
LABEL_FIX = (
    "pass labels with the probe data ((image, label) batches, or label_key for dict batches; CKAMonitor takes them "
    "from the validation set's (image, label) batches) or set linear_probe=False"
)


@dataclass
class ProbeFeatures:
    """One forward pass through the monitored layers, reduced to the probe's features.

    Attributes:
        cls: per layer, the ``(n, D)`` float64 CLS token, or ``None`` (no class token, or not a token output).
        gap: per layer, the ``(n, D)`` mean over patch tokens / spatial positions (2-D outputs as they are), taken in
            the output's precision (at least float32) and widened to float64.
        dtypes: per layer, the precision the scored half is kept in: the output's, at least float32.
    """

    cls: list[Tensor | None]
    gap: list[Tensor]
    dtypes: list[torch.dtype]


def probe_features(output: Tensor, layout: TokenLayout, name: str) -> tuple[Tensor | None, Tensor]:
    """The CLS token and the global average pool of one layer's output, as new float64 tensors.

    ``(n, T, D)`` tokens: CLS is token 0 when the model has a class token, the pool is the mean over the tokens after
    the ``num_prefix_tokens`` prefix (CLS, distillation and register tokens are left out). ``(n, C, H, W)`` maps (``(n,
    H, W, C)`` when the layout is channels-last): the spatial mean, no CLS. ``(n, D)`` outputs are already pooled: they
    are the pool, no CLS. Means are taken in the output's precision, at least float32 (a float64 copy of a whole
    ``(n, T, D)`` output would double the hook's memory on the GPU), then widened to float64.
    """
    precision = torch.promote_types(output.dtype, torch.float32)
    if output.dim() == 3:
        cls = output[:, 0].to(torch.float64, copy=True) if layout.has_class_token else None
        return cls, output[:, layout.num_prefix_tokens :].mean(dim=1, dtype=precision).to(torch.float64)
    if output.dim() == 4:
        spatial = (1, 2) if layout.channels_last else (2, 3)
        return None, output.mean(dim=spatial, dtype=precision).to(torch.float64)
    if output.dim() == 2:
        return None, output.to(torch.float64, copy=True)
    raise ValueError(
        f"linear_probe: layer '{name}' returned shape {tuple(output.shape)}; the probe needs (n, T, D) tokens, "
        "(n, C, H, W) maps or (n, D) vectors. Monitor other layers or set linear_probe=False."
    )


class LinearProbeTap(Tap):
    """The CLS and pooled features of every monitored layer, reduced in the hook (no activation is kept).

    Args:
        layers: module names.
        layouts: each layer's :class:`TokenLayout`.
    """

    def __init__(self, layers: list[str], layouts: list[TokenLayout]) -> None:
        self.layers = list(layers)
        self.layouts = list(layouts)
        self.key = ("linear_probe", tuple(layers))
        self._values: dict[str, tuple[Tensor | None, Tensor, torch.dtype]] = {}
        self._batch_size: int | None = None

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        return [
            modules[name].register_forward_hook(self._hook(name, layout))
            for name, layout in zip(self.layers, self.layouts, strict=True)
        ]

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._values = {}
        self._batch_size = None if inputs is None else inputs.shape[0]

    def _hook(self, name: str, layout: TokenLayout):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if name in self._values:
                raise RuntimeError(
                    f"module '{name}' ran more than once in one forward pass, so it has no single output to probe. "
                    "Monitor its parent block or a module that runs once."
                )
            tensor = first_tensor(output, name)
            if self._batch_size is not None and tensor.shape[0] != self._batch_size:
                raise RuntimeError(
                    f"layer '{name}' returned {tuple(tensor.shape)}, but the batch has {self._batch_size} examples: "
                    "the first dim of a monitored output must be the batch."
                )
            cls, gap = probe_features(tensor, layout, name)  # new tensors: in-place ops after the hook cannot reach
            self._values[name] = (cls, gap, torch.promote_types(tensor.dtype, torch.float32))

        return hook

    @override
    def collect(self) -> ProbeFeatures:
        missing = [name for name in self.layers if name not in self._values]
        if missing:
            raise RuntimeError(
                f"layer(s) {', '.join(missing)} did not run in the latest forward pass (or no forward pass ran). "
                "Choose layers the forward pass uses."
            )
        values = [self._values[name] for name in self.layers]
        return ProbeFeatures([v[0] for v in values], [v[1] for v in values], [v[2] for v in values])


class _Maxima(Metric):
    """Elementwise maxima over ranks (``dist_reduce_fx="max"``): the shapes every rank must agree on before a sum."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("value", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, value: Tensor) -> None:
        """Raise the maxima to ``value`` where it is larger."""
        self.value = torch.maximum(self.value, value.to(self.value))

    def compute(self) -> Tensor:
        """The maxima."""
        return self.value


@dataclass
class RidgeFit:
    """A ridge probe fitted on centered sufficient statistics.

    Attributes:
        weights: ``(D, C)`` coefficients; predictions are ``(x - mean_x) @ weights + mean_y``.
        mean_x: ``(D,)`` fit-half feature means.
        mean_y: ``(C,)`` fit-half class frequencies.
        ridge: the chosen λ (NaN for constant features: then ``weights`` is 0, the majority-class predictor).
        lambdas: ``(K,)`` the λ grid (empty for constant features).
        gcv: ``(K,)`` the GCV criterion on it.
    """

    weights: Tensor
    mean_x: Tensor
    mean_y: Tensor
    ridge: float
    lambdas: Tensor
    gcv: Tensor


def fit_ridge(xtx: Tensor, xty: Tensor, sx: Tensor, counts: Tensor) -> RidgeFit:
    """Ridge regression of one-hot classes on features with an intercept, λ chosen by generalized cross-validation.

    With ``Xc``, ``Yc`` the fit half's features and one-hot targets centered with their means (which fits the
    intercept, unpenalized) and ``XcᵀXc = V diag(s) Vᵀ``, ``Z = Vᵀ XcᵀYc``, everything follows from ``s`` and ``Z``:

    - ``W(λ) = V diag(1 / (s + λ)) Z``;
    - ``RSS(λ) = ‖Yc‖² - Σᵢ ‖Zᵢ‖² (sᵢ + 2λ) / (sᵢ + λ)²`` (summed over the classes), ``‖Yc‖² = n - Σ_c n_c² / n``;
    - ``df(λ) = Σᵢ sᵢ / (sᵢ + λ)``, the trace of the centered hat matrix;
    - ``GCV(λ) = n · RSS(λ) / (n - 1 - df(λ))²`` (the 1 counts the intercept; infinite where the denominator is not
      positive), minimized over ``λ = s_max · 10^k``, ``k`` in :data:`RIDGE_EXPONENTS` (the first minimum).

    Args:
        xtx: ``(D, D)`` ``Σ x xᵀ`` over the fit half (float64).
        xty: ``(D, C)`` ``Σ x yᵀ`` with one-hot ``y``.
        sx: ``(D,)`` ``Σ x``.
        counts: ``(C,)`` examples of each class (``n = Σ counts``, at least 2).

    Returns:
        The fit. Constant features (``s_max = 0``) give zero weights and λ NaN.

    Raises:
        torch.linalg.LinAlgError: when the eigendecomposition does not converge (callers turn it into NaN).
    """
    n = counts.sum()
    mean_x, mean_y = sx / n, counts / n
    cxx = xtx - n * torch.outer(mean_x, mean_x)
    cxx = (cxx + cxx.T) / 2  # exactly symmetric for eigh
    cxy = xty - n * torch.outer(mean_x, mean_y)
    yy = n - (counts * counts).sum() / n
    s, v = torch.linalg.eigh(cxx)
    s = s.clamp_min(0.0)  # rounding can make zero eigenvalues slightly negative
    s_max = s.max()
    if not s_max > 0:
        empty = torch.zeros(0, dtype=s.dtype, device=s.device)
        return RidgeFit(torch.zeros_like(cxy), mean_x, mean_y, float("nan"), empty, empty)
    z = v.T @ cxy  # (D, C)
    z2 = (z * z).sum(dim=1)  # (D,)
    lambdas = s_max * 10.0 ** torch.tensor(RIDGE_EXPONENTS, dtype=s.dtype, device=s.device)
    denom = s[None, :] + lambdas[:, None]  # (K, D)
    rss = (yy - (z2 * (s[None, :] + 2 * lambdas[:, None]) / denom.square()).sum(dim=1)).clamp_min(0.0)
    residual_df = n - 1 - (s[None, :] / denom).sum(dim=1)
    gcv = torch.where(residual_df > 0, n * rss / residual_df.clamp_min(1e-300).square(), torch.inf)
    best = int(torch.argmin(gcv))
    weights = v @ (z / (s + lambdas[best])[:, None])
    return RidgeFit(weights, mean_x, mean_y, float(lambdas[best]), lambdas, gcv)


def score(fit: RidgeFit, features: Tensor, labels: Tensor, present: Tensor) -> Tensor:
    """How many of ``features`` the probe classifies as ``labels`` (a float64 0-dim tensor; NaN for non-finite input).

    Classes absent from the fit half (``present`` False) are never predicted; ties go to the lower class index.
    """
    if not features.shape[0]:
        return torch.zeros((), dtype=torch.float64, device=features.device)
    x = features.to(torch.float64)
    scores = (x - fit.mean_x) @ fit.weights + fit.mean_y
    scores = scores.masked_fill(~present, -torch.inf)
    correct = (scores.argmax(dim=1) == labels).sum().to(torch.float64)
    return torch.where(torch.isfinite(x).all(), correct, torch.nan)


class LinearProbe(Analysis):
    """Closed-form ridge probes of the class on the CLS token and the pooled features of every monitored layer."""

    name = "linear_probe"
    fields = (
        Field(
            "linear_probe_accuracy",
            "array",
            "(L, 2) accuracy of the ridge probe on the scored half, columns (CLS token, global average pool); "
            "NaN where the layer has no CLS token or its features were not finite",
        ),
        Field(
            "linear_probe_chance",
            "float",
            "majority baseline: the scored half's frequency of the fit half's most frequent class",
        ),
        Field("linear_probe_ridge", "array", "(L, 2) the ridge strength λ chosen by GCV (NaN: none)"),
        Field("linear_probe_examples", "ints", "(2,) examples fitted (even probe indices) and scored (odd)"),
    )

    @override
    def bind(self, models: Mapping[str, ProbedModel]) -> bool:
        if not self.options.linear_probe:
            return False
        model = models["model"]
        self._model = model
        self._tap = LinearProbeTap(model.layers, model.layouts)
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        return [self._tap] if model.role == "model" else []

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        self._device = device
        self._classes = 0
        self._counts: dict[str, Tensor] = {}  # "fit", "score": (C,) class counts
        self._stats: dict[tuple[int, int], dict[str, Tensor]] = {}  # (layer, kind) -> xtx, xty, sx
        self._kept: dict[tuple[int, int], list[Tensor]] = {}  # (layer, kind) -> scored-half features per minibatch
        self._kept_labels: list[Tensor] = []

    @override
    def update(self, batch: Minibatch) -> None:
        value: ProbeFeatures = batch.values["model"][self._tap.key]
        device = value.gap[0].device
        labels = self._labels(batch, device)
        fit = (batch.start + torch.arange(batch.size, device=device)) % 2 == 0
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

    def _labels(self, batch: Minibatch, device: torch.device) -> Tensor:
        labels = batch.labels
        if labels is None:
            raise ValueError(
                f"linear_probe=True needs class labels, but probe minibatch {batch.index} has none: {LABEL_FIX}."
            )
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"linear_probe: labels must be integer class indices, got dtype {labels.dtype}.")
        if labels.shape != (batch.size,):
            raise ValueError(
                f"linear_probe: labels must have shape ({batch.size},) (one class index per image), got "
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

    @override
    def reduce(self) -> Any:
        num_layers, device = len(self._model.layers), self._device
        # 1. Shapes (feature dims, classes) agreed over ranks: a rank without minibatches knows none of them.
        local = torch.zeros(2 * num_layers + 1, dtype=torch.float64)
        for (layer, kind), stats in self._stats.items():
            local[2 * layer + kind] = stats["sx"].shape[0]
        local[-1] = self._classes
        maxima = _Maxima(local.numel()).to(device)
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

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
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

    @classmethod
    @override
    def figures(cls, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
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

    @classmethod
    @override
    def scalars(cls, result: CKAResult, view: View) -> dict[str, float]:
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

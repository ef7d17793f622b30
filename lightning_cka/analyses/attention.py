"""Mean attention distance and attention entropy of every head (Raghu et al. 2021, Figure 3).

Taps timm attention modules (probabilities recomputed from ``q`` and ``k``, fused kernels untouched); accumulates per
(layer, head) the sum over images of the mean distance and of the entropy; stores ``mean_attention_distance``,
``attention_entropy`` and the uniform-attention distance; draws ``attention/mean_distance``.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn
from typing_extensions import override

from lightning_cka.engine.analysis import Analysis, Field, Minibatch, View
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.spec import Dots, Figure, Line, Series
from lightning_cka.functional.attention import _attention_distance_update
from lightning_cka.metrics.sums import TensorSums
from lightning_cka.result import CKAResult
from lightning_cka.stats import nanmean
from lightning_cka.taps.attention import AttentionSite, AttentionTap, attention_sites
from lightning_cka.taps.base import Tap
from lightning_cka.taps.layers import display_names


class AttentionStatsTap(AttentionTap):
    """Per forward pass, the sums over images of each head's mean attention distance and attention entropy."""

    def __init__(self, sites: list[AttentionSite], renormalize: bool) -> None:
        super().__init__(sites)
        self.renormalize = renormalize
        self.num_heads = max(site.num_heads for site in sites)
        self._sums: dict[str, Tensor] = {}

    @override
    def begin(self, inputs: Tensor | None) -> None:
        super().begin(inputs)
        device = inputs.device if inputs is not None else torch.device("cpu")
        shape = (len(self.sites), self.num_heads)
        self._sums = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k in _SUMS}

    @override
    def consume(self, layer: int, probs: Tensor, distances: Tensor) -> None:
        site = self.sites[layer]
        heads = probs.shape[1]
        self._sums["distance"][layer, :heads] += _attention_distance_update(
            probs, distances, site.num_prefix_tokens, self.renormalize
        )
        # Entropy (nats) of each query's attention over all keys, averaged over queries, summed over images.
        entropy = torch.special.entr(probs).sum(dim=-1)  # (b, H, T): -p log p, one fused op
        self._sums["entropy"][layer, :heads] += entropy.mean(dim=-1).sum(dim=0, dtype=torch.float64)
        self._sums["count"][layer, :heads] += probs.shape[0]

    @override
    def collect(self) -> dict[str, Tensor]:
        return self._sums


_SUMS = ("distance", "entropy", "count")


class AttentionStats(Analysis):
    """Mean attention distance (pixels) and entropy (nats) per head of every timm attention module."""

    name = "attention"
    fields = (
        Field("attention_layers", "names", "(La,) attention modules measured", per_model=True),
        Field("mean_attention_distance", "array", "(La, H) mean attention distance per head, pixels", per_model=True),
        Field("attention_entropy", "array", "(La, H) mean entropy of each head's attention, nats", per_model=True),
        Field(
            "uniform_attention_distance",
            "float",
            "distance (pixels) of a head attending to every patch alike: the scale of local and global",
            per_model=True,
        ),
        Field("attention_skipped", "names", "attention modules left out, with the reason", per_model=True),
    )

    @override
    def bind(self, models: Mapping[str, ProbedModel]) -> bool:
        setting = self.options.attention
        if setting is False:
            return False
        self._models = dict(models)
        self._sites = {role: attention_sites(model.modules) for role, model in models.items()}
        self._sites = {role: sites for role, sites in self._sites.items() if sites}
        if setting is True and "model" not in self._sites:
            raise ValueError(
                f"attention=True, but {type(models['model'].module).__name__} has no timm Attention module under a "
                "patch_embed with a patch grid (a timm ViT). Pass attention=False (or 'auto')."
            )
        self._taps = {
            role: AttentionStatsTap(sites, self.options.renormalize_attention) for role, sites in self._sites.items()
        }
        self._warned: set[str] = set()
        return bool(self._sites)

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        tap = self._taps.get(model.role)
        return [tap] if tap is not None else []

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        self._sums = {
            role: TensorSums({k: (len(tap.sites), tap.num_heads) for k in _SUMS}).to(device)
            for role, tap in self._taps.items()
        }

    @override
    def update(self, batch: Minibatch) -> None:
        for role, tap in self._taps.items():
            sums = batch.values[role][tap.key]
            for key, value in sums.items():
                self._sums[role].update(key, value)

    @override
    def reduce(self) -> Any:
        return {role: sums.totals() for role, sums in self._sums.items()}

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, sums in reduced.items():
            model, tap = self._models[role], self._taps[role]
            count = sums["count"].cpu().numpy()
            kept = np.flatnonzero((count > 0).any(axis=1))
            skipped = [f"{name}: {why}" for name, why in sorted(tap.skipped.items())]
            new = [s for s in skipped if s not in self._warned]
            if new:
                self._warned.update(new)
                rank_zero_warn(f"lightning-cka: attention left out of {model.role} layers: {'; '.join(new)}.")
            if not kept.size:
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                distance = sums["distance"].cpu().numpy() / count
                entropy = sums["entropy"].cpu().numpy() / count
            names = display_names(model.module, [tap.sites[i].name for i in kept])
            out[f"{model.prefix}attention_layers"] = names
            out[f"{model.prefix}mean_attention_distance"] = distance[kept]
            out[f"{model.prefix}attention_entropy"] = entropy[kept]
            out[f"{model.prefix}uniform_attention_distance"] = tap.uniform_distance(tap.sites[int(kept[0])])
            if skipped:
                out[f"{model.prefix}attention_skipped"] = skipped
        return out

    @classmethod
    @override
    def figures(cls, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        figures = []
        for role, tag in (("model", "attention/mean_distance"), ("reference", "attention/reference_mean_distance")):
            part = result.part(role)
            if part.mean_attention_distance is None:
                continue
            panel = distance_panel(
                part.mean_attention_distance,
                part.attention_layers,
                part.uniform_attention_distance,
                view.local_threshold,
            )
            caption = (
                "One dot per head (heads at the same distance are spread sideways). Below the dashed line a head "
                "attends locally, near the top it attends everywhere. Raghu et al. 2021: lower ViT layers mix local "
                "and global heads; with too little data they learn no local heads."
            )
            title = "Mean attention distance per head" + (" of the reference" if role == "reference" else "")
            figures.append(Figure(tag, title, (panel,), caption, view.subtitle(result)))
        return figures

    @classmethod
    @override
    def scalars(cls, result: CKAResult, view: View) -> dict[str, float]:
        scalars: dict[str, float] = {}
        distances, layers = result.mean_attention_distance, result.attention_layers
        if distances is None:
            return scalars
        threshold = view.local_threshold * (result.uniform_attention_distance or float("nan"))
        entropy = result.attention_entropy
        finite = distances[np.isfinite(distances)]
        scalars["attention/first_layer_distance"] = nanmean(distances[0])
        scalars["attention/last_layer_distance"] = nanmean(distances[-1])
        if finite.size and np.isfinite(threshold):
            scalars["attention/local_fraction"] = float((finite < threshold).mean())
        for i, name in enumerate(layers):
            heads = distances[i][np.isfinite(distances[i])]
            scalars[f"attention/mean_distance/{name}"] = nanmean(heads)
            scalars[f"attention/min_distance/{name}"] = float(heads.min()) if heads.size else float("nan")
            local = float((heads < threshold).mean()) if heads.size and np.isfinite(threshold) else float("nan")
            scalars[f"attention/local_fraction/{name}"] = local
            if entropy is not None:
                scalars[f"attention/entropy/{name}"] = nanmean(entropy[i])
        return scalars


def distance_panel(
    distances: np.ndarray, layers: list[str], uniform: float | None, fraction: float, label: str = ""
) -> Dots:
    """The heads' distances per layer with a labelled local-threshold line and the uniform-attention line."""
    lines = []
    top = float(np.nanmax(distances, initial=0.0)) if np.isfinite(distances).any() else 0.0
    if uniform:
        lines = [
            Line(fraction * uniform, f"local below {fraction * uniform:.1f} px", style="dashed"),
            Line(uniform, f"uniform attention {uniform:.1f} px (global)", style="dotted"),
        ]
        top = max(top, uniform)
    return Dots(
        x=tuple(layers),
        series=(Series(label, np.asarray(distances, dtype=np.float64)),),
        x_label="attention layer",
        y_label="mean attention distance (pixels)",
        lines=tuple(lines),
        ylim=(-0.03 * top, top * 1.15) if top else (0.0, 1.0),  # no head cut off by the frame, at 0 either
    )

"""Mean attention distance and attention entropy of every head (Raghu et al. 2021, Figure 3).

Taps timm attention modules (probabilities recomputed from ``q`` and ``k``, fused kernels untouched); accumulates per
(layer, head) the sum over images of the mean distance and of the entropy; stores ``mean_attention_distance``,
``attention_entropy`` and the uniform-attention distance; draws ``attention/mean_distance``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Dots, Figure, Line, Series
from lightning_cka.stats import nanmean

if TYPE_CHECKING:
    import torch

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap


class AttentionStats(Analysis):
    """Mean attention distance (pixels) and entropy (nats) per head of every timm attention module.

    Args:
        renormalize: renormalize each query's attention over the patch keys before its distance, so that attention
            paid to CLS, distillation or register tokens does not count as distance 0 (see
            :func:`lightning_cka.functional.mean_attention_distance`).
        local_threshold: a head counts as local when its mean distance is below this fraction of the distance of
            uniform attention over the patch grid (16.5 px for 8 x 8 patches of 4 px, 116.5 px for ViT-B/16 at 224).
    """

    name = "attention"
    default = True
    position = 20
    fields = (
        Field("attention_layers", "names", "(La,) attention modules measured", per_model=True),
        Field(
            "mean_attention_distance",
            "array",
            "(La, H) mean attention distance per head, pixels",
            True,
            ("attention_layers", "H"),
        ),
        Field(
            "attention_entropy",
            "array",
            "(La, H) mean entropy of each head's attention, nats",
            True,
            ("attention_layers", "H"),
        ),
        Field(
            "uniform_attention_distance",
            "float",
            "distance (pixels) of a head attending to every patch alike: the scale of local and global",
            per_model=True,
        ),
        Field("attention_skipped", "names", "attention modules left out, with the reason", per_model=True),
        Field(
            "attention_renormalized",
            "int",
            "1: distances renormalized over patch keys; 0: attention to prefix tokens counted as distance 0",
            per_model=True,
        ),
    )

    def __init__(self, renormalize: bool = False, local_threshold: float = 0.5) -> None:
        owner = type(self).__name__
        self.renormalize = check.flag(owner, "renormalize", renormalize)
        self.local_threshold = check.number(
            owner, "local_threshold", local_threshold, 0.0, 1.0, "a fraction of the uniform-attention distance"
        )

    def threshold(self, view: View) -> float:
        """The local-head fraction in force: the view's override, else this analysis's own."""
        return view.local_threshold if view.local_threshold is not None else self.local_threshold

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from lightning_cka.taps.attention import AttentionStatsTap, attention_sites

        self._models = dict(setup.models)
        sites = {role: attention_sites(model.modules) for role, model in self._models.items()}
        sites = {role: found for role, found in sites.items() if found}
        if not sites:
            names = [model.label or type(model.module).__name__ for model in self._models.values()]
            who = f"{names[0]} has no" if len(names) == 1 else "neither the model nor the reference has a"
            return f"{who} timm Attention module under a patch grid (that of a timm ViT)"
        self._taps = {role: AttentionStatsTap(found, self.renormalize) for role, found in sites.items()}
        self._warned: set[str] = set()
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        tap = self._taps.get(model.role)
        return [tap] if tap is not None else []

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        from lightning_cka.metrics.sums import TensorSums
        from lightning_cka.taps.attention import ATTENTION_SUMS

        self._sums = {
            role: TensorSums({k: (len(tap.sites), tap.num_heads) for k in ATTENTION_SUMS}).to(device)
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
        from pytorch_lightning.utilities.rank_zero import rank_zero_warn

        from lightning_cka.taps.layers import display_names

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
            out[f"{model.prefix}attention_renormalized"] = int(self.renormalize)
            if skipped:
                out[f"{model.prefix}attention_skipped"] = skipped
        return out

    @override
    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        figures = []
        for role, tag in (("model", "attention/mean_distance"), ("reference", "attention/reference_mean_distance")):
            part = result.part(role)
            if part.mean_attention_distance is None:
                continue
            panel = distance_panel(
                part.mean_attention_distance,
                part.attention_layers,
                part.uniform_attention_distance,
                self.threshold(view),
            )
            caption = (
                "One dot per head (heads at the same distance are spread sideways). Below the dashed line a head "
                "attends locally, near the top it attends everywhere. Raghu et al. 2021: lower ViT layers mix local "
                f"and global heads; with too little data they learn no local heads. {_convention(part)}"
            ).strip()
            title = "Mean attention distance per head" + (" of the reference" if role == "reference" else "")
            figures.append(Figure(tag, title, (panel,), caption, view.subtitle(result)))
        return figures

    @override
    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
        scalars: dict[str, float] = {}
        distances, layers = result.mean_attention_distance, result.attention_layers
        if distances is None:
            return scalars
        threshold = self.threshold(view) * (result.uniform_attention_distance or float("nan"))
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


def _convention(part: CKAResult) -> str:
    """Which convention the distances follow, where the model has prefix tokens for it to matter."""
    if part.attention_renormalized is None:
        return ""
    if part.attention_renormalized:
        return "Distances renormalized over the patch keys (attention to CLS/register tokens left out)."
    return "Attention paid to CLS/register tokens counts as distance 0 (renormalize=False)."


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

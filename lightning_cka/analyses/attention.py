"""Mean attention distance and attention entropy of every head (Raghu et al. 2021, Figure 3).

Taps timm attention modules (probabilities recomputed from ``q`` and ``k``, fused kernels untouched); accumulates per
(layer, head) the sum over images of the mean distance and of the entropy; stores ``mean_attention_distance``,
``attention_entropy`` and the uniform-attention distance; draws ``attention/mean_distance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Dots, Figure, Line, Series
from lightning_cka.findings import (
    CANNOT_TELL,
    DOES_NOT,
    NOT_MEASURED,
    PARTLY,
    SHOWS,
    Criteria,
    Criterion,
    Estimate,
    Event,
    Evidence,
    Finding,
    Side,
    figures_of,
    group_difference,
    per_side,
    seed_estimate,
    side_estimate,
    threshold_verdict,
)
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
        from lightning_cka.taps.attention_site import READABLE

        self._models = dict(setup.models)
        sites = {role: attention_sites(model.modules) for role, model in self._models.items()}
        sites = {role: found for role, found in sites.items() if found}
        if not sites:
            names = [model.label or type(model.module).__name__ for model in self._models.values()]
            who = f"{names[0]} has no" if len(names) == 1 else "neither the model nor the reference has an"
            return f"{who} attention module it reads ({READABLE}) under a patch grid"
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

    event_fields = ("mean_attention_distance", "attention_entropy", "attention_layers", "uniform_attention_distance")
    criteria = (
        Criterion(
            "global_fraction",
            0.8,
            "a head counts as global above this fraction of the uniform-attention distance (local: below the "
            "analysis's local_threshold, 0.5 unless set)",
        ),
        Criterion(
            "lower_local",
            0.0,
            "share of the lower half's heads that are local: above it the lower layers have local heads",
        ),
        Criterion(
            "hysteresis",
            0.1,
            "a head becomes local once its distance falls this fraction below the local threshold, and stops being "
            "local once it rises this fraction above it (events)",
        ),
        Criterion(
            "collapse_tokens",
            2.0,
            "a layer's attention has collapsed when its heads attend to fewer tokens than this on average (the "
            "exponential of the mean entropy; event)",
        ),
    )

    @override
    def findings(self, evidence: Evidence) -> list[Finding]:
        found = per_side(evidence, lambda side: _local_global(self, side, evidence))
        if evidence.paired:
            found.append(_data_scale(self, evidence))
        return found

    @override
    def events(self, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
        return [*_local_events(self, history, criteria), *_collapse_events(self, history, criteria)]


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


# ------------------------------------------------------------------------------------------------------------ findings

LOCAL_GLOBAL = ("attention.local_global", "Local and global heads")
LOCAL_GLOBAL_PAPER = (
    "The lower layers of a ViT mix heads that attend locally with heads that attend globally; the higher layers attend "
    "globally (Raghu et al. 2021, Figure 3)."
)
DATA_SCALE = ("attention.data_scale", "Local heads and the amount of training data")
DATA_SCALE_PAPER = (
    "Trained on too little data, the lower layers of a ViT learn no local heads (ViT-L/16 and H/14 on ImageNet alone, "
    "Figure 4)."
)


def head_shares(analysis: AttentionStats, result: CKAResult, evidence: Evidence) -> dict[str, float]:
    """Shares of local heads in the lower and upper half of the attention layers, and of global heads in the lower."""
    distances, uniform = result.mean_attention_distance, result.uniform_attention_distance
    if distances is None or not uniform:
        return {}
    local = distances < analysis.local_threshold * uniform  # (La, H)
    wide = distances > evidence.criterion(analysis, "global_fraction") * uniform
    half = -(-len(distances) // 2)
    measured = np.isfinite(distances)

    def share(mask: np.ndarray, rows: slice) -> float:
        count = measured[rows].sum()
        return float(mask[rows][measured[rows]].sum() / count) if count else float("nan")

    return {
        "lower_local": share(local, slice(0, half)),
        "upper_local": share(local, slice(half, None)),
        "lower_global": share(wide, slice(0, half)),
    }


def _local_global(analysis: AttentionStats, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*LOCAL_GLOBAL, LOCAL_GLOBAL_PAPER)
    if first.mean_attention_distance is None:
        return Finding(
            *header,
            NOT_MEASURED,
            "the model has no attention the analysis could measure",
            needs="a ViT as the model (timm, torchvision or Hugging Face); a CNN has no heads",
        )
    shares = {
        key: side_estimate(side, lambda r, k=key: Estimate(head_shares(analysis, r, evidence).get(k, float("nan"))))
        for key in ("lower_local", "upper_local", "lower_global")
    }
    uniform = first.uniform_attention_distance
    local_px = analysis.local_threshold * uniform
    lower, upper = shares["lower_local"], shares["upper_local"]
    has_local, reason = threshold_verdict(
        lower, evidence.criterion(analysis, "lower_local"), True, "share of local heads in the lower half"
    )
    if has_local == SHOWS:
        more_below = lower.value > upper.value
        verdict = SHOWS if more_below and shares["lower_global"].value > 0 else PARTLY
        reason += (
            f"; the upper half has {'fewer' if more_below else 'as many or more'} ({upper.percent()})"
            f" and the lower half {'also' if shares['lower_global'].value > 0 else 'no'} global heads"
        )
    else:
        verdict = has_local
    lowest = _lowest_head(side)
    statement = (
        f"Local means a mean distance below {local_px:.1f} px ({analysis.local_threshold:g} of the "
        f"{uniform:.1f} px of uniform attention). {lower.percent()} of the lower half's heads are local, "
        f"{upper.percent()} of the upper half's; the most local head at the last probe is at "
        f"{np.nanmin(first.mean_attention_distance):.1f} px. {lowest}"
    ).strip()
    numbers = [
        ("share of local heads, lower half", lower.percent(basis=True)),
        ("share of local heads, upper half", upper.percent(basis=True)),
        ("share of global heads, lower half", shares["lower_global"].percent(basis=True)),
        ("uniform-attention distance", f"{uniform:.2f} px"),
    ]
    figures = figures_of(analysis, first, ("attention/mean_distance",), View(run=first.run or side.label))
    needs = ""
    if verdict == DOES_NOT:
        needs = (
            "local heads come with more data and training (the paper: JFT-300M); at CIFAR scale, CutMix is reported "
            "to make early heads local (examples/train.py --cutmix)"
        )
    return Finding(*header, verdict, reason, statement, numbers, figures, needs)


def _lowest_head(side: Side) -> str:
    """When and where the most local head of the first run was over training."""
    run = side.runs[0]
    best = (np.inf, -1, "")
    for step in run.steps:
        result = run.probes[step]
        distances = result.mean_attention_distance
        if distances is None or not np.isfinite(distances).any():
            continue
        layer, head = np.unravel_index(np.nanargmin(distances), distances.shape)
        if distances[layer, head] < best[0]:
            best = (float(distances[layer, head]), step, f"{result.attention_layers[layer]} head {head}")
    if best[1] < 0 or len(run.steps) < 2:
        return ""
    return f"Over training ({run.label}), the most local head was {best[2]} at {best[0]:.1f} px, at step {best[1]}."


def _data_scale(analysis: AttentionStats, evidence: Evidence) -> Finding:
    header = (*DATA_SCALE, DATA_SCALE_PAPER)
    a, b = evidence.sides
    values = [
        [head_shares(analysis, r, evidence).get("lower_local", float("nan")) for r in side.last] for side in (a, b)
    ]
    if any(not np.isfinite(v).any() for v in values):
        return Finding(*header, NOT_MEASURED, "a side has no attention measured", needs="ViTs on both sides")
    sizes = [_train_examples(side) for side in (a, b)]
    text = [f"{side.label}{f' ({n:,} training images)' if n else ''}" for side, n in zip((a, b), sizes, strict=True)]
    estimates = [seed_estimate(v, evidence.level) for v in values]
    shares = [f"{t} {e.percent()}" for t, e in zip(text, estimates, strict=True)]
    statement = f"Share of local heads in the lower half: {', '.join(shares)}."
    numbers = [
        (f"share of local heads, lower half: {t}", e.percent(basis=True)) for t, e in zip(text, estimates, strict=True)
    ]
    if all(np.nanmax(v) == 0 for v in values):
        reason = "neither side has a local head in its lower half: both are in the paper's too-little-data regime"
        return Finding(*header, DOES_NOT, reason, statement, numbers, needs=DATA_NEEDS)
    if min(len(v) for v in values) < 2:
        reason = "one run per side: seed variation unknown"
        return Finding(*header, CANNOT_TELL, reason, statement, numbers, needs="2 or more seeds a side (3 for a claim)")
    test = group_difference(values[0], values[1], evidence.alpha)
    numbers.append((f"difference {a.label} − {b.label}", test.text()))
    if not all(sizes) or sizes[0] == sizes[1]:
        reason = f"the difference is {test.text()}, but which side had less data is not recorded"
        return Finding(
            *header, CANNOT_TELL, reason, statement, numbers, needs="runs whose monitor records the training-set size"
        )
    smaller = 0 if sizes[0] < sizes[1] else 1
    fewer_on_small = (test.difference < 0) == (smaller == 0)
    if test.significant and fewer_on_small:
        verdict, reason = SHOWS, f"the side with less data has fewer local heads ({test.text()})"
    elif test.significant:
        verdict, reason = DOES_NOT, f"the side with less data has more local heads ({test.text()})"
    else:
        verdict, reason = CANNOT_TELL, f"no difference the seeds can tell ({test.text()})"
    return Finding(*header, verdict, reason, statement, numbers, needs="" if test.significant else test.needs)


DATA_NEEDS = (
    "local heads need more data and training than these runs had: longer training, a larger dataset, or CutMix "
    "(examples/train.py --cutmix)"
)


def _train_examples(side: Side) -> int:
    """The training-set size the side's runs recorded (0 when unknown or when they differ)."""
    sizes = {int(r.settings_dict().get("train_examples") or 0) for r in side.last}
    return sizes.pop() if len(sizes) == 1 else 0


# -------------------------------------------------------------------------------------------------------------- events


def _local_events(analysis: AttentionStats, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
    """A head that became local (its distance fell clearly below the threshold) or stopped being local.

    Each head's state starts at its first probe (local below the threshold) and changes only when its distance
    crosses the threshold by the ``hysteresis`` margin, so a head near the threshold does not flicker.
    """
    margin = criteria.value(analysis, "hysteresis")
    state: dict[tuple[str, int], bool] = {}
    last: dict[tuple[str, int], tuple[int, float]] = {}
    events = []
    for result in history:
        distances, uniform = result.mean_attention_distance, result.uniform_attention_distance
        if distances is None or not uniform:
            continue
        threshold = analysis.local_threshold * uniform
        for layer, name in enumerate(result.attention_layers):
            for head, distance in enumerate(distances[layer]):
                if not np.isfinite(distance):
                    continue
                key = (name, head)
                local = state.get(key)
                if local is None:
                    state[key] = bool(distance < threshold)
                elif not local and distance < threshold * (1 - margin):
                    state[key] = True
                    events.append(_head_event(analysis, result.step, key, distance, threshold, last.get(key), True))
                elif local and distance > threshold * (1 + margin):
                    state[key] = False
                    events.append(_head_event(analysis, result.step, key, distance, threshold, last.get(key), False))
                last[key] = (result.step, float(distance))
    return events


def _head_event(
    analysis: AttentionStats,
    step: int,
    key: tuple[str, int],
    distance: float,
    threshold: float,
    before: tuple[int, float] | None,
    local: bool,
) -> Event:
    name, head = key
    was = f" (it was {before[1]:.1f} px at step {before[0]})" if before else ""
    what = "became local" if local else "stopped being local"
    where = "below" if local else "above"
    text = (
        f"Head {head} of {name} {what}: mean distance {distance:.1f} px, {where} the {threshold:.1f} px threshold{was}."
    )
    return Event(step, analysis.name, "head_local" if local else "head_global", text, f"{name} head {head}")


def _collapse_events(analysis: AttentionStats, history: Sequence[CKAResult], criteria: Criteria) -> list[Event]:
    """A layer whose heads came to attend to fewer than ``collapse_tokens`` tokens on average (entropy collapse)."""
    limit = criteria.value(analysis, "collapse_tokens")
    collapsed: dict[str, bool] = {}
    events = []
    for result in history:
        entropy = result.attention_entropy
        if entropy is None:
            continue
        for name, row in zip(result.attention_layers, entropy, strict=True):
            finite = row[np.isfinite(row)]
            if not finite.size:
                continue
            tokens = float(np.exp(finite.mean()))
            now, before = tokens < limit, collapsed.get(name)
            if now and before is False:
                events.append(
                    Event(
                        result.step,
                        analysis.name,
                        "entropy_collapse",
                        f"The attention of {name} collapsed: its heads attend to {tokens:.2f} tokens on average "
                        f"(exp of the mean entropy, {finite.mean():.2f} nats), fewer than {limit:g}.",
                        name,
                    )
                )
            collapsed[name] = now
    return events

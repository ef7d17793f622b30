"""Skip connections versus branches: ‖residual stream‖ / ‖branch‖ per token and block (Raghu et al. 2021, Figure 7).

Taps the residual blocks among the monitored layers (:class:`lightning_cka.taps.residual.ResidualTap`, which says
where each block family's stream and branch are), at the modules where the stream entering a branch and the branch's
output (after layer scale, at drop-path) exist as tensors; each hook reduces its tensor to per-token norms on the spot.
Accumulates, per (block, branch, token), the sum over probe images of ``‖stream‖ / ‖branch‖`` and the count; stores
``residual_ratio`` with its CLS and patch-token summaries; draws ``residual/norm_ratio``. EfficientNet blocks without a
skip connection (``has_skip`` False: stride 2 or a change of width) are not residual blocks and are left out
(``residual_skipped`` says so, and the caption counts them); any other monitored layer whose branch cannot be located is
left out with one warning per fit naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import override

from lightning_cka.engine.analysis import Analysis, Field, Minibatch, ProbeSetup, View
from lightning_cka.figures.spec import Curves, Figure, Heatmap, Line, Series
from lightning_cka.findings import (
    NOT_MEASURED,
    PARTLY,
    SHOWS,
    Criterion,
    Estimate,
    Evidence,
    Finding,
    Side,
    architecture,
    figures_of,
    named,
    per_side,
    side_estimate,
    threshold_verdict,
    transformer,
)

if TYPE_CHECKING:
    import torch

    from lightning_cka.engine.models import ProbedModel
    from lightning_cka.result import CKAResult
    from lightning_cka.taps.base import Tap

_SUMS = ("ratio_sum", "defined", "images")


class ResidualRatio(Analysis):
    """‖residual stream‖ / ‖branch‖ per token of every residual block among the monitored layers.

    For each branch of a block (attention and MLP of a transformer block, the one branch of a ResNet, ConvNeXt or
    EfficientNet block), at every token (every position of a Swin stage), the norm over channels of the stream the
    branch is added to divided by the norm of what the branch adds, averaged over probe images. Convolutional blocks
    average their per-position ratios over positions (one token). Applies where recognized residual blocks are among
    the monitored layers.

    A branch that is exactly zero gives ``inf`` (kept in the arrays; blank with a dot in the heatmap, a gap in the
    curves, left out of the scalars' means and counted by ``residual/zero_branches``).
    """

    name = "residual"
    default = True
    position = 40
    fields = (
        Field("residual_blocks", "names", "(B,) residual blocks measured", per_model=True),
        Field("residual_branches", "names", "(K,) branch names ('attention', 'mlp' or 'branch')", per_model=True),
        Field(
            "residual_ratio",
            "array",
            "(B, K, T) mean over probe images of ‖stream‖ / ‖branch‖ per token (conv blocks: over positions too, "
            "T = 1); NaN where a block has fewer tokens or lacks the branch; inf for a branch that is exactly zero",
            True,
            ("residual_blocks", "residual_branches", "T"),
        ),
        Field(
            "residual_ratio_cls",
            "array",
            "(B, K) the ratio of the class token (NaN without one)",
            True,
            ("residual_blocks", "residual_branches"),
        ),
        Field(
            "residual_ratio_patch",
            "array",
            "(B, K) its mean over patch tokens / positions",
            True,
            ("residual_blocks", "residual_branches"),
        ),
        Field(
            "residual_prefix_tokens",
            "ints",
            "(B,) leading non-patch tokens of each block",
            True,
            ("residual_blocks",),
        ),
        Field("residual_skipped", "names", "monitored layers left out, with the reason", per_model=True),
    )

    @override
    def bind(self, setup: ProbeSetup) -> bool | str:
        from pytorch_lightning.utilities.rank_zero import rank_zero_warn

        from lightning_cka.taps.residual import NO_SKIP, ResidualTap, auto_blocks, residual_sites, token_capacity

        self._models = dict(setup.models)
        self._sites: dict[str, list[Any]] = {}
        self._skipped: dict[str, dict[str, str]] = {}
        for role, model in self._models.items():
            sites, skipped = residual_sites(model)
            self._skipped[role] = skipped
            if sites:
                self._sites[role] = sites
            # Only the model's own residual blocks whose branches are unknown deserve a warning; a LayerNorm or an MLP
            # among explicitly chosen layers is simply not a block.
            blocks = auto_blocks(model)
            unlocated = [f"{name} ({why})" for name, why in skipped.items() if why != NO_SKIP and name in blocks]
            if unlocated:
                shown = "; ".join(unlocated[:4]) + (f"; and {len(unlocated) - 4} more" if len(unlocated) > 4 else "")
                rank_zero_warn(
                    f"lightning-cka: residual ratios leave out {len(unlocated)} {role} layer(s) whose residual branch "
                    f"cannot be located: {shown}."
                )
        if "model" not in self._sites:
            model = self._models["model"]
            skipped = self._skipped["model"]
            kinds = sorted({type(model.modules[name]).__name__ for name in skipped})
            reasons = list(dict.fromkeys(skipped.values()))
            shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
            return (
                f"no monitored layer is a residual block whose stream and branch it knows ({', '.join(kinds)}: "
                f"{shown or 'no layer'}); monitor the residual blocks of a timm ViT, Swin, ResNet, ConvNeXt or "
                "EfficientNet, of torchvision's ViT, Swin, ResNet, EfficientNet or ConvNeXt, or of Hugging Face's ViT, "
                "DeiT, Dinov2, Swin, ConvNext or ResNet (layers='auto' finds them)"
            )
        self._taps = {role: ResidualTap(sites) for role, sites in self._sites.items()}
        self._branch_names = {
            role: list(dict.fromkeys(b.name for site in sites for b in site.branches))
            for role, sites in self._sites.items()
        }
        self._capacity = {role: token_capacity(self._models[role], sites) for role, sites in self._sites.items()}
        return True

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        tap = self._taps.get(model.role)
        return [tap] if tap is not None else []

    def _new_sums(self, role: str, tokens: int, device: torch.device) -> Any:
        from lightning_cka.metrics.sums import TensorSums

        shape = (len(self._sites[role]), len(self._branch_names[role]), tokens)
        return TensorSums(dict.fromkeys(_SUMS, shape)).to(device)

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        self._device = device
        # Created here, not at the first minibatch, so that a rank without minibatches takes part in the reduction.
        self._sums = {role: self._new_sums(role, self._capacity[role], device) for role in self._taps}

    @override
    def update(self, batch: Minibatch) -> None:
        import torch

        for role, tap in self._taps.items():
            rows = batch.values[role][tap.key]
            tokens = max((entry[0].shape[0] for row in rows for entry in row if entry is not None), default=1)
            sums = self._sums[role]
            if tokens > sums.ratio_sum.shape[-1]:
                # More tokens than the geometry said (a dynamic-size model): widen the sums, keeping what they hold.
                wider = self._new_sums(role, tokens, self._device)
                held = sums.ratio_sum.shape[-1]
                for name in _SUMS:
                    getattr(wider, name)[..., :held] = getattr(sums, name)
                self._sums[role] = sums = wider
                self._capacity[role] = tokens
            index = self._branch_index(role)
            for i, (site, row) in enumerate(zip(self._sites[role], rows, strict=True)):
                for branch, entry in zip(site.branches, row, strict=True):
                    if entry is None:
                        continue
                    total, defined, images = entry
                    k, t = index[branch.name], total.shape[0]
                    sums.update("ratio_sum", total, index=(i, k, slice(0, t)))
                    sums.update("defined", defined, index=(i, k, slice(0, t)))
                    sums.update("images", torch.full_like(defined, float(images)), index=(i, k, slice(0, t)))

    def _branch_index(self, role: str) -> dict[str, int]:
        return {name: k for k, name in enumerate(self._branch_names[role])}

    @override
    def reduce(self) -> Any:
        return {role: sums.compute() for role, sums in self._sums.items()}

    @override
    def finalize(self, reduced: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, sums in reduced.items():
            model, sites = self._models[role], self._sites[role]
            prefix = model.prefix
            skipped = [f"{name}: {why}" for name, why in self._skipped[role].items()]
            if skipped:
                out[f"{prefix}residual_skipped"] = skipped
            shape = (len(sites), len(self._branch_names[role]), -1)  # compute() squeezes one-element sums to 0-dim
            total, count, seen = (sums[name].cpu().numpy().reshape(shape) for name in _SUMS)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)
            ratio[seen == 0] = np.nan
            present = (seen > 0).any(axis=(0, 1))
            tokens = int(np.flatnonzero(present).max()) + 1 if present.any() else 1
            ratio = ratio[..., :tokens]
            cls = np.full(ratio.shape[:2], np.nan)
            patch = np.full(ratio.shape[:2], np.nan)
            for i, site in enumerate(sites):
                for k in range(ratio.shape[1]):
                    length = int((seen[i, k] > 0).sum())
                    if length == 0:
                        continue
                    if site.has_class_token:
                        cls[i, k] = ratio[i, k, 0]
                    if length > site.num_prefix_tokens:
                        patch[i, k] = float(np.mean(ratio[i, k, site.num_prefix_tokens : length]))
            names = dict(zip(model.layers, model.names, strict=True))
            out[f"{prefix}residual_blocks"] = [names[site.name] for site in sites]
            out[f"{prefix}residual_branches"] = list(self._branch_names[role])
            out[f"{prefix}residual_ratio"] = ratio
            out[f"{prefix}residual_ratio_cls"] = cls
            out[f"{prefix}residual_ratio_patch"] = patch
            out[f"{prefix}residual_prefix_tokens"] = np.asarray([s.num_prefix_tokens for s in sites], dtype=np.int64)
        return out

    @override
    def figures(self, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
        figures = []
        for role, tag in (("model", "residual/norm_ratio"), ("reference", "residual/reference_norm_ratio")):
            if role == "reference" and previous is not None:  # a frozen reference: drawn once per run
                continue
            part = result.part(role)
            if part.residual_ratio is None or not len(part.residual_blocks or []):
                continue
            title = "Residual stream vs branch norm per token" + (" of the reference" if role == "reference" else "")
            figures.append(Figure(tag, title, norm_ratio_panels(part), _caption(part), view.subtitle(result)))
        return figures

    @override
    def scalars(self, result: CKAResult, view: View) -> dict[str, float]:
        scalars: dict[str, float] = {}
        blocks, patch, cls_ratio = result.residual_blocks, result.residual_ratio_patch, result.residual_ratio_cls
        if patch is None or not blocks:
            return scalars
        patch, cls_ratio = np.asarray(patch, dtype=np.float64), np.asarray(cls_ratio, dtype=np.float64)
        for i, name in enumerate(blocks):
            scalars[f"residual/patch_ratio/{name}"] = _branch_mean(patch[i])
            if np.isfinite(cls_ratio[i]).any():
                scalars[f"residual/cls_ratio/{name}"] = _branch_mean(cls_ratio[i])
        finite = patch[np.isfinite(patch) & (patch > 0)]
        scalars["residual/mean_ratio"] = float(np.exp(np.log(finite).mean())) if finite.size else float("nan")
        scalars["residual/zero_branches"] = float(np.isposinf(patch).sum())
        if np.isfinite(cls_ratio).any() and len(blocks) >= 2:
            with np.errstate(invalid="ignore", divide="ignore"):
                excess = np.log10(cls_ratio) - np.log10(patch)  # (B, K): > 0 where CLS rides the skip more
            half = len(blocks) // 2
            scalars["residual/cls_vs_patch_lower"] = _finite_mean(excess[:half])
            scalars["residual/cls_vs_patch_upper"] = _finite_mean(excess[half:])
        return scalars

    criteria = (
        Criterion(
            "cls_excess",
            0.0,
            "mean log10 of the class token's stream-to-branch ratio over the patch tokens' in the lower half of the "
            "blocks: above it the skip connections carry the class token there",
        ),
        Criterion(
            "vit_over_cnn",
            2.0,
            "how many times higher the ViT's geometric-mean stream-to-branch ratio must be than the CNN's",
        ),
    )

    @override
    def findings(self, evidence: Evidence) -> list[Finding]:
        return [
            *per_side(evidence, lambda side: _cls_rides_skip(self, side, evidence)),
            *per_side(evidence, lambda side: _vit_vs_cnn(self, side, evidence)),
        ]


def _branch_mean(values: np.ndarray) -> float:
    """Geometric mean over a block's branches; ``inf`` when a branch is exactly zero, NaN when none has a ratio."""
    values = values[~np.isnan(values)]
    if not values.size:
        return float("nan")
    if np.isposinf(values).any():
        return float("inf")
    with np.errstate(divide="ignore"):
        return float(np.exp(np.log(values).mean()))


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _has_cls(part: CKAResult) -> bool:
    return part.residual_ratio_cls is not None and bool((~np.isnan(part.residual_ratio_cls)).any())


def _prefix(part: CKAResult) -> int:
    prefix = part.residual_prefix_tokens
    return int(prefix[0]) if prefix is not None and len(prefix) else 0


def _token_labels(part: CKAResult, tokens: int) -> tuple[str, ...]:
    prefix, has_cls = _prefix(part), _has_cls(part)
    labels = []
    for t in range(tokens):
        if t < prefix:
            labels.append("CLS" if t == 0 and has_cls else f"prefix {t}")
        else:
            labels.append(str(t - prefix))
    return tuple(labels)


def _log_limits(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    low, high = float(np.floor(finite.min())), float(np.ceil(finite.max()))
    return (low, high) if high > low else (low, low + 1.0)


def norm_ratio_panels(part: CKAResult) -> tuple[Heatmap | Curves, ...]:
    """One heatmap per branch (blocks x tokens, log10 of the ratio) when blocks have tokens, and the CLS/patch curves.

    The heatmaps hold ``log10(ratio)``: infinite ratios (zero branches) are blank cells with a dot, NaN padding (blocks
    with fewer tokens) is blank without one. Conv blocks have one token (the mean over positions): no heatmap.
    """
    ratio = np.asarray(part.residual_ratio, dtype=np.float64)
    blocks, branches = tuple(part.residual_blocks), list(part.residual_branches)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(ratio)
    panels: list[Heatmap | Curves] = []
    if ratio.shape[2] > 1:
        vmin, vmax = _log_limits(logs)
        labels = _token_labels(part, ratio.shape[2])
        if not _prefix(part):
            column_label = "position (row-major; later stages have fewer)"
        else:
            column_label = f"token ({'CLS' if _has_cls(part) else 'prefix tokens'} first, then patches, row-major)"
        for k, branch in enumerate(branches):
            values = np.where(np.isposinf(logs[:, k]), np.nan, logs[:, k])
            infinite = np.isposinf(ratio[:, k])
            panels.append(
                Heatmap(
                    values=values,
                    rows=blocks,
                    cols=labels,
                    row_label="block",
                    col_label=column_label,
                    title=f"{branch} branch",
                    vmin=vmin,
                    vmax=vmax,
                    colorbar="log10(‖stream‖ / ‖branch‖)",
                    marked=infinite if infinite.any() else None,
                    mark_label="dot: the branch is exactly zero (ratio infinite)" if infinite.any() else "",
                )
            )
    series = []
    cls_ratio, patch, has_cls = part.residual_ratio_cls, part.residual_ratio_patch, _has_cls(part)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, branch in enumerate(branches):
            if has_cls:
                series.append(Series(f"{branch}: CLS", _finite_or_nan(np.log10(cls_ratio[:, k]))))
            label = f"{branch}: patch tokens" if has_cls else branch
            series.append(Series(label, _finite_or_nan(np.log10(patch[:, k]))))
    title = "class token vs patch tokens (mean over patches)" if has_cls else "mean over patch tokens / positions"
    panels.append(
        Curves(
            x=blocks,
            series=tuple(series),
            x_label="block",
            y_label="log10(‖stream‖ / ‖branch‖)",
            title=title,
            lines=(Line(0.0, "ratio 1", style="dotted"),),
        )
    )
    return tuple(panels)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def _caption(part: CKAResult) -> str:
    ratio = np.asarray(part.residual_ratio_patch, dtype=np.float64)
    zero = int(np.isposinf(ratio).sum())
    text = (
        "How much of each token passes through the skip connection: the norm of the residual stream over the norm of "
        "what a branch adds, log10 (2: the stream is 100 times larger)."
    )
    if _has_cls(part):
        text += (
            " Raghu et al. 2021: in ViTs the class token rides the skip connections in the lower half and the patch "
            "tokens in the upper half; ViT ratios are far higher than ResNet ones."
        )
    elif np.asarray(part.residual_ratio).shape[-1] > 1:
        text += " This model has no class token: the paper's class-token pattern does not apply; its ratios can be set "
        text += "against a CNN's (the paper: ViT ratios are far higher than ResNet ones)."
    else:
        text += " Raghu et al. 2021: a ResNet's ratios are far lower than a ViT's (its branches change more)."
    if zero:
        text += f" {zero} branch(es) are exactly zero (infinite ratio: dots, gaps in the curves), e.g. zero-init BN."
    skipped = [s for s in part.residual_skipped or [] if "no skip connection" in s]
    if skipped:
        total = len(skipped) + len(part.residual_blocks)
        names = ", ".join(s.split(":")[0] for s in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        text += f" {len(skipped)} of {total} blocks have no skip connection and are not shown ({names})."
    return text


# ------------------------------------------------------------------------------------------------------------ findings

CLS_SKIP = ("residual.cls_rides_skip", "Skip connections carry the class token in the lower half")
CLS_SKIP_PAPER = (
    "In the lower half of a class-token ViT the skip connections carry the class token (its stream-to-branch norm "
    "ratio is far above the patch tokens'), in the upper half the patch tokens (Raghu et al. 2021, Figure 7)."
)
VIT_VS_CNN = ("residual.vit_vs_cnn", "Skip connections matter more in the ViT than in the CNN")
VIT_VS_CNN_PAPER = "The stream-to-branch norm ratios of ViTs are far higher than those of ResNets (Figure 7)."


def cls_excess(result: CKAResult) -> tuple[float, float]:
    """Mean ``log10`` of the class token's ratio over the patch tokens', in the lower and the upper half of blocks."""
    scalars = result.scalars()
    return (
        scalars.get("residual/cls_vs_patch_lower", float("nan")),
        scalars.get("residual/cls_vs_patch_upper", float("nan")),
    )


def stream_ratio(part: CKAResult) -> float:
    """The geometric mean of a model's stream-to-branch ratios over its blocks, branches and patch tokens."""
    patch = part.residual_ratio_patch
    if patch is None:
        return float("nan")
    finite = np.asarray(patch, dtype=np.float64)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    return float(np.exp(np.log(finite).mean())) if finite.size else float("nan")


def _cls_rides_skip(analysis: ResidualRatio, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*CLS_SKIP, CLS_SKIP_PAPER)
    if first.residual_ratio is None:
        return Finding(*header, NOT_MEASURED, "no residual block was measured", needs="a ViT (or ResNet) as the model")
    if not _has_cls(first):
        who = named(architecture(first))
        why = f"{who} has no class token" if transformer(first) else f"{who} is not a ViT with a class token"
        return Finding(
            *header,
            NOT_MEASURED,
            why,
            needs="a ViT that classifies from its class token (timm global_pool='token'; examples/train.py "
            "--global-pool token)",
        )
    lower = side_estimate(side, lambda r: Estimate(cls_excess(r)[0]))
    upper = side_estimate(side, lambda r: Estimate(cls_excess(r)[1]))
    what = "log10 of the class token's ratio over the patch tokens', lower half"
    verdict, reason = threshold_verdict(lower, evidence.criterion(analysis, "cls_excess"), True, what)
    if verdict == SHOWS and not upper.value < lower.value:
        verdict, reason = PARTLY, f"{reason}, but the upper half's is not lower ({upper.text()})"
    statement = (
        f"In the lower half the class token's stream is {10**lower.value:.2g} times as large, relative to its "
        f"branches, as the patch tokens' (log10 {lower.text(2)}); in the upper half {10**upper.value:.2g} times "
        f"(log10 {upper.text(2)})."
    )
    numbers = [(what, lower.text(basis=True)), ("the same, upper half", upper.text(basis=True))]
    if len(side.runs) == 1:
        numbers.append(("uncertainty", "one run: no error bar (the ratios are means over all probe images)"))
    figures = figures_of(analysis, first, ("residual/norm_ratio",), View(run=first.run or side.label))
    return Finding(*header, verdict, reason, statement, numbers, figures)


def _vit_vs_cnn(analysis: ResidualRatio, side: Side, evidence: Evidence) -> Finding:
    first = side.last[0]
    header = (*VIT_VS_CNN, VIT_VS_CNN_PAPER)
    kinds = transformer(first), transformer(first, "reference")
    if (
        first.residual_ratio is None
        or first.reference_residual_ratio is None
        or kinds not in ((True, False), (False, True))
    ):
        return Finding(
            *header,
            NOT_MEASURED,
            "the runs do not hold the skip-connection ratios of both a ViT and a CNN",
            needs="a ViT with a CNN reference that has skip connections (a ResNet, ConvNeXt or EfficientNet)",
        )
    vit_role, cnn_role = ("model", "reference") if kinds[0] else ("reference", "model")

    def log_ratio(result: CKAResult) -> Estimate:
        return Estimate(np.log10(stream_ratio(result.part(vit_role)) / stream_ratio(result.part(cnn_role))))

    difference = side_estimate(side, log_ratio)
    vit, cnn = named(architecture(first, vit_role)), named(architecture(first, cnn_role))
    if not np.isfinite(difference.value):
        reason = (
            f"the ratios of {vit} or {cnn} are not finite: branches that add exactly zero (zero-initialized batch norm "
            "in an untrained CNN) make them infinite"
        )
        return Finding(
            *header, NOT_MEASURED, reason, needs="trained models (or ones without zero-initialized branches)"
        )
    factor = evidence.criterion(analysis, "vit_over_cnn")
    what = f"log10 of {vit}'s geometric-mean ratio over {cnn}'s"
    verdict, reason = threshold_verdict(difference, float(np.log10(factor)), True, what)
    statement = (
        f"The residual stream is {stream_ratio(first.part(vit_role)):.3g} times as large as a branch's output in "
        f"{vit} (geometric mean over blocks, branches and tokens) and {stream_ratio(first.part(cnn_role)):.3g} times "
        f"in {cnn}: {10**difference.value:.2g} times higher in {vit}."
    )
    figures = figures_of(
        analysis, first, ("residual/norm_ratio", "residual/reference_norm_ratio"), View(run=first.run or side.label)
    )
    return Finding(*header, verdict, reason, statement, [(what, difference.text(basis=True))], figures)

"""Skip connections versus branches: ‖residual stream‖ / ‖branch‖ per token and block (Raghu et al. 2021, Figure 7).

Taps the residual blocks among the monitored layers, at the modules where the stream entering a branch and the
branch's output (after layer scale, at drop-path) exist as tensors; each hook reduces its tensor to per-token norms on
the spot. Accumulates, per (block, branch, token), the sum over probe images of ``‖stream‖ / ‖branch‖`` and the count;
stores ``residual_ratio`` with its CLS and patch-token summaries; draws ``residual/norm_ratio``.

Where the two tensors are, per block class (verified numerically in timm 1.0.31 and torchvision 0.29, block output
equal to stream + branch with error 0):

=======================================================  ===========================  ================================
block class                                              stream (skip)                branch
=======================================================  ===========================  ================================
timm ``vision_transformer.Block`` (ViT, DeiT, register   attention: block input       attention: ``drop_path1`` output
ViTs, hybrids, vitamin, PiT)                             (``norm1`` input); MLP:      MLP: ``drop_path2`` output
                                                         ``norm2`` input
timm ``ResPostBlock``                                    ``attn`` / ``mlp`` input     ``drop_path1`` / ``drop_path2``
timm ``SwinTransformerBlock``                            ``norm1`` / ``norm2`` input  ``drop_path1`` / ``drop_path2``
timm ``SwinTransformerV2Block``                          block / ``mlp`` input        ``drop_path1`` / ``drop_path2``
timm and torchvision ResNet ``BasicBlock`` /             ``downsample`` output, else  the last of ``bn2``/``bn3``,
``Bottleneck``                                           the block input              ``se``, ``drop_path`` present
timm ``ConvNeXtBlock``                                   ``shortcut`` output          ``drop_path`` output
timm EfficientNet / MobileNet blocks with ``has_skip``   block input                  ``drop_path`` output
=======================================================  ===========================  ================================

``drop_path*`` modules (``DropPath`` or ``nn.Identity``) are hooked rather than ``ls*`` / ``attn`` / ``mlp``: in eval
mode they are equal, but only the drop-path output is exactly what is added to the stream. A block is recognized by
its class *and* by its forward being that class's own (a subclass that overrides ``forward`` may compute something
else). EfficientNet blocks without a skip connection (``has_skip`` False: stride 2 or a change of width) are not
residual blocks and are left out without a warning (``residual_skipped`` says so); any other monitored layer whose
branch cannot be located is left out with one warning per fit naming it.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchmetrics.utilities import rank_zero_warn
from typing_extensions import override

from lightning_cka.engine.analysis import Analysis, Field, Minibatch, View
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.spec import Curves, Figure, Heatmap, Line, Series
from lightning_cka.metrics.sums import TensorSums
from lightning_cka.result import CKAResult
from lightning_cka.taps.base import Tap, first_tensor, owners
from lightning_cka.taps.layers import find_layers

Side = Literal["in", "out"]
_NO_SKIP = "no skip connection (has_skip is False), not a residual block"
_SUMS = ("ratio_sum", "defined", "images")


@dataclass(frozen=True)
class Branch:
    """One residual branch of a block: where its input stream and its output are.

    Attributes:
        name: ``"attention"``, ``"mlp"`` or ``"branch"`` (the one branch of a convolutional block).
        skip: ``(module name, "in" | "out")``: the stream the branch is added to, as that module's first input or its
            output.
        branch: ``(module name, "in" | "out")``: what the branch adds.
    """

    name: str
    skip: tuple[str, Side]
    branch: tuple[str, Side]


@dataclass(frozen=True)
class ResidualSite:
    """A residual block among the monitored layers.

    Attributes:
        name: module name of the block.
        branches: its branches, in the order they run.
        maps: ``(n, C, H, W)`` convolutional maps: the channel norm is taken at each position and the ratios are
            averaged over positions (one token). Otherwise the tensors are ``(n, ..., C)`` tokens or positions with
            channels last (ViT ``(n, T, C)``, Swin ``(n, H, W, C)`` or ``(n, H·W, C)``), one ratio per token.
        num_prefix_tokens: leading non-patch tokens (CLS, distillation, registers).
        has_class_token: the first token is a class token.
    """

    name: str
    branches: tuple[Branch, ...]
    maps: bool
    num_prefix_tokens: int = 0
    has_class_token: bool = False


def _vit_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    return (
        Branch("attention", (f"{name}.norm1", "in"), (f"{name}.drop_path1", "out")),
        Branch("mlp", (f"{name}.norm2", "in"), (f"{name}.drop_path2", "out")),
    )


def _post_norm_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    return (
        Branch("attention", (f"{name}.attn", "in"), (f"{name}.drop_path1", "out")),
        Branch("mlp", (f"{name}.mlp", "in"), (f"{name}.drop_path2", "out")),
    )


def _swin_v2_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # The attention runs in a method (`_attn`), not a module: the stream is the block's own input.
    return (
        Branch("attention", (name, "in"), (f"{name}.drop_path1", "out")),
        Branch("mlp", (f"{name}.mlp", "in"), (f"{name}.drop_path2", "out")),
    )


def _resnet_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    end = "bn3" if hasattr(module, "bn3") else "bn2"
    for later in ("se", "drop_path"):  # timm: None when absent (not nn.Identity)
        if isinstance(getattr(module, later, None), nn.Module):
            end = later
    skip = (f"{name}.downsample", "out") if getattr(module, "downsample", None) is not None else (name, "in")
    return (Branch("branch", skip, (f"{name}.{end}", "out")),)


def _convnext_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    return (Branch("branch", (f"{name}.shortcut", "out"), (f"{name}.drop_path", "out")),)


def _efficientnet_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    if not getattr(module, "has_skip", False):
        return ()
    return (Branch("branch", (name, "in"), (f"{name}.drop_path", "out")),)


def _families() -> list[tuple[type, Callable[[str, nn.Module], tuple[Branch, ...]], bool]]:
    """``(block class, where its branches are, maps)`` of every block class whose branches are known."""
    from timm.models import _efficientnet_blocks as eff
    from timm.models import convnext, resnet, swin_transformer, swin_transformer_v2, vision_transformer

    families: list[tuple[type, Callable[[str, nn.Module], tuple[Branch, ...]], bool]] = [
        (vision_transformer.Block, _vit_branches, False),
        (vision_transformer.ResPostBlock, _post_norm_branches, False),
        (swin_transformer.SwinTransformerBlock, _vit_branches, False),
        (swin_transformer_v2.SwinTransformerV2Block, _swin_v2_branches, False),
        (resnet.BasicBlock, _resnet_branches, True),
        (resnet.Bottleneck, _resnet_branches, True),
        (convnext.ConvNeXtBlock, _convnext_branches, True),
    ]
    for cls_name in (
        "ConvBnAct",
        "DepthwiseSeparableConv",
        "InvertedResidual",
        "CondConvResidual",
        "EdgeResidual",
        "UniversalInvertedResidual",
    ):
        cls = getattr(eff, cls_name, None)
        if cls is not None:
            families.append((cls, _efficientnet_branches, True))
    try:
        from torchvision.models import resnet as tv_resnet
    except ImportError:  # torchvision is optional
        pass
    else:
        families += [(tv_resnet.BasicBlock, _resnet_branches, True), (tv_resnet.Bottleneck, _resnet_branches, True)]
    return families


def locate_branches(name: str, module: nn.Module) -> tuple[tuple[Branch, ...], bool] | str:
    """The branches of the residual block ``module`` (called ``name``) and whether it holds conv maps, or why not.

    Returns:
        ``(branches, maps)`` for a recognized residual block; :data:`_NO_SKIP` for a recognized block without a skip
        connection; another reason (a string) when the branch cannot be located.
    """
    for cls, branches, maps in _families():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            found = branches(name, module)
            return (found, maps) if found else _NO_SKIP
    known = isinstance(module, tuple(cls for cls, _, _ in _families()))
    if known:
        return f"{type(module).__name__} overrides its forward, so where its branches are is not known"
    return f"{type(module).__name__} is not a residual block whose branches are known"


def _auto_blocks(model: ProbedModel) -> set[str]:
    """The residual blocks ``layers="auto"`` finds in the model (empty when it finds none it recognizes)."""
    try:
        return set(find_layers(model.module, "auto"))
    except ValueError:
        return set()


def residual_sites(model: ProbedModel) -> tuple[list[ResidualSite], dict[str, str]]:
    """The residual blocks among ``model``'s monitored layers, and why each other layer was left out (by name)."""
    sites, skipped = [], {}
    for name, layout in zip(model.layers, model.layouts, strict=True):
        found = locate_branches(name, model.modules[name])
        if isinstance(found, str):
            skipped[name] = found
            continue
        branches, maps = found
        missing = [m for b in branches for m, _ in (b.skip, b.branch) if m not in model.modules]
        if missing:
            skipped[name] = f"module(s) {', '.join(missing)} not found"
            continue
        prefix = 0 if maps else layout.num_prefix_tokens
        sites.append(ResidualSite(name, branches, maps, prefix, layout.has_class_token and not maps))
    return sites, skipped


def token_capacity(model: ProbedModel, sites: list[ResidualSite]) -> int:
    """The most tokens any site's tensors have at the model's construction size (the states' first token axis).

    Conv maps are averaged to one token. Token models take ``prefix + grid`` from the innermost owner with a
    ``patch_embed`` (PiT's pooled stages have fewer). Dynamic-size models run at a larger size bring more tokens: the
    states then widen at the first minibatch (on every rank that has one; under DDP a rank without one keeps the
    construction size, and the probe's reduction fails on every rank alike, never hangs) and stay wide afterwards.
    """
    capacity = 1
    for site in sites:
        if site.maps:
            continue
        for owner in owners(model.modules, site.name):
            grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
            if grid is not None:
                capacity = max(capacity, site.num_prefix_tokens + int(grid[0]) * int(grid[1]))
                break
    return capacity


_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32: the scratch one chunk's norms may take


def _chunk_images(x: Tensor) -> int:
    """Images per chunk: vecdot materializes the squared activation, which must not add an activation to the peak."""
    return max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))


def _channel_norms(x: Tensor, maps: bool) -> Tensor:
    """Per-token (or per-position) channel norms of ``x``, in float32 or float64."""
    # vecdot is 8x faster than vector_norm over the channels of an NCHW map on the CPU (one fused multiply-add pass
    # instead of a strided reduction).
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return torch.linalg.vecdot(x, x, dim=1 if maps else -1).sqrt()


class ResidualTap(Tap):
    """Per forward pass, per site and branch: the sums over images of ``‖stream‖ / ‖branch‖`` per token.

    Each hook turns its tensor into per-token channel norms at once (an ``(n, T)`` float32 tensor), so in-place
    additions that follow (``x += shortcut`` in ResNets) cannot change what was measured and no activation is kept.
    A token where both norms are exactly 0 has no ratio and is left out of the averages (its count says so); a branch
    that is exactly 0 under a non-zero stream gives ``inf`` (timm ResNets zero-initialize their last BatchNorm).

    Args:
        sites: the residual blocks.
    """

    def __init__(self, sites: list[ResidualSite]) -> None:
        self.sites = list(sites)
        self.key = ("residual", tuple(site.name for site in sites))
        self._norms: dict[tuple[int, int, str], Tensor] = {}

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        handles = []
        for i, site in enumerate(self.sites):
            for k, branch in enumerate(site.branches):
                for role, (module_name, side) in (("skip", branch.skip), ("branch", branch.branch)):
                    record = self._recorder((i, k, role), site, module_name)
                    module = modules[module_name]
                    if side == "in":

                        def pre_hook(module: nn.Module, args: tuple, kwargs: dict, record: Callable = record) -> None:
                            tensors = [*args, *(v for v in kwargs.values() if isinstance(v, Tensor))]
                            record(tensors[0] if tensors else None)

                        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                    else:

                        def hook(module: nn.Module, args: tuple, output: object, record: Callable = record) -> None:
                            record(output)

                        handles.append(module.register_forward_hook(hook))
        return handles

    def _recorder(self, key: tuple[int, int, str], site: ResidualSite, module_name: str) -> Callable:
        def record(value: object) -> None:
            if key in self._norms:
                raise RuntimeError(
                    f"module '{module_name}' of residual block '{site.name}' ran more than once in one forward pass, "
                    "so its residual branch has no single output. Leave this block out (residual=False or other "
                    "layers)."
                )
            x = first_tensor(value, module_name)
            norms = torch.cat([_channel_norms(c, site.maps) for c in x.split(_chunk_images(x))])
            self._norms[key] = norms.reshape(norms.shape[0], -1)  # (n, tokens or positions)

        return record

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._norms = {}

    @override
    def collect(self) -> list[list[tuple[Tensor, Tensor, int] | None]]:
        """Per site and branch: ``(sum over images of the ratio (T,), defined count (T,), images)``, or ``None``.

        ``None`` marks a branch that did not run. For conv maps ``T`` is 1: the ratios are summed over positions too.
        """
        out: list[list[tuple[Tensor, Tensor, int] | None]] = []
        for i, site in enumerate(self.sites):
            row: list[tuple[Tensor, Tensor, int] | None] = []
            for k, branch in enumerate(site.branches):
                skip, added = self._norms.get((i, k, "skip")), self._norms.get((i, k, "branch"))
                if skip is None or added is None:
                    row.append(None)
                    continue
                if skip.shape != added.shape:
                    raise RuntimeError(
                        f"residual block '{site.name}', {branch.name} branch: the stream has {tuple(skip.shape)} "
                        f"token norms but the branch {tuple(added.shape)}; its branch is not where lightning-cka "
                        "expects it."
                    )
                undefined = (skip == 0) & (added == 0)  # 0 / 0: no ratio at this token
                ratio = torch.where(undefined, torch.zeros_like(skip), skip / added)  # x / 0 = inf stays inf
                defined = (~undefined).to(torch.float64)
                ratio = ratio.to(torch.float64)
                if site.maps:
                    ratio, defined = ratio.sum(dim=1, keepdim=True), defined.sum(dim=1, keepdim=True)
                row.append((ratio.sum(dim=0), defined.sum(dim=0), int(skip.shape[0])))
            out.append(row)
        return out


class ResidualRatio(Analysis):
    """‖residual stream‖ / ‖branch‖ per token of every residual block among the monitored layers.

    For each branch of a block (attention and MLP of a transformer block, the one branch of a ResNet, ConvNeXt or
    EfficientNet block), at every token (every position of a Swin stage), the norm over channels of the stream the
    branch is added to divided by the norm of what the branch adds, averaged over probe images. Convolutional blocks
    average their per-position ratios over positions (one token). The option ``residual`` is ``True`` (required),
    ``False`` or ``"auto"`` (on for models with recognized residual blocks among their monitored layers).

    A branch that is exactly zero gives ``inf`` (kept in the arrays; blank with a dot in the heatmap, a gap in the
    curves, left out of the scalars' means and counted by ``residual/zero_branches``).
    """

    name = "residual"
    fields = (
        Field("residual_blocks", "names", "(B,) residual blocks measured", per_model=True),
        Field("residual_branches", "names", "(K,) branch names ('attention', 'mlp' or 'branch')", per_model=True),
        Field(
            "residual_ratio",
            "array",
            "(B, K, T) mean over probe images of ‖stream‖ / ‖branch‖ per token (conv blocks: over positions too, "
            "T = 1); NaN where a block has fewer tokens or lacks the branch; inf for a branch that is exactly zero",
            per_model=True,
        ),
        Field("residual_ratio_cls", "array", "(B, K) the ratio of the class token (NaN without one)", per_model=True),
        Field("residual_ratio_patch", "array", "(B, K) its mean over patch tokens / positions", per_model=True),
        Field("residual_prefix_tokens", "ints", "(B,) leading non-patch tokens of each block", per_model=True),
        Field("residual_skipped", "names", "monitored layers left out, with the reason", per_model=True),
    )

    @override
    def bind(self, models: Mapping[str, ProbedModel]) -> bool:
        setting = self.options.residual
        if setting is False:
            return False
        self._models = dict(models)
        self._sites: dict[str, list[ResidualSite]] = {}
        self._skipped: dict[str, dict[str, str]] = {}
        for role, model in models.items():
            sites, skipped = residual_sites(model)
            self._skipped[role] = skipped
            if sites:
                self._sites[role] = sites
            # With "auto", only the model's own residual blocks whose branches are unknown deserve a warning; a
            # LayerNorm or an MLP among explicitly chosen layers is simply not a block.
            blocks = set(model.layers) if setting is True else _auto_blocks(model)
            unlocated = [f"{name} ({why})" for name, why in skipped.items() if why != _NO_SKIP and name in blocks]
            if unlocated:
                shown = "; ".join(unlocated[:4]) + (f"; and {len(unlocated) - 4} more" if len(unlocated) > 4 else "")
                rank_zero_warn(
                    f"lightning-cka: residual ratios leave out {len(unlocated)} {role} layer(s) whose residual branch "
                    f"cannot be located: {shown}."
                )
        if setting is True and "model" not in self._sites:
            reasons = "; ".join(f"{n}: {why}" for n, why in self._skipped["model"].items()) or "no layers"
            raise ValueError(
                f"residual=True, but none of the monitored layers of {type(models['model'].module).__name__} is a "
                f"residual block whose branches lightning-cka can locate ({reasons}). Monitor the residual blocks "
                "(layers='auto' on a timm ViT, Swin, ResNet, ConvNeXt or EfficientNet) or pass residual=False."
            )
        self._taps = {role: ResidualTap(sites) for role, sites in self._sites.items()}
        self._branch_names = {
            role: list(dict.fromkeys(b.name for site in sites for b in site.branches))
            for role, sites in self._sites.items()
        }
        self._capacity = {role: token_capacity(models[role], sites) for role, sites in self._sites.items()}
        return bool(self._sites)

    @override
    def taps(self, model: ProbedModel) -> list[Tap]:
        tap = self._taps.get(model.role)
        return [tap] if tap is not None else []

    def _new_sums(self, role: str, tokens: int, device: torch.device) -> TensorSums:
        shape = (len(self._sites[role]), len(self._branch_names[role]), tokens)
        return TensorSums(dict.fromkeys(_SUMS, shape)).to(device)

    @override
    def start(self, num_minibatches: int, device: torch.device) -> None:
        self._device = device
        # Created here, not at the first minibatch, so that a rank without minibatches takes part in the reduction.
        self._sums = {role: self._new_sums(role, self._capacity[role], device) for role in self._taps}

    @override
    def update(self, batch: Minibatch) -> None:
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

    @classmethod
    @override
    def figures(cls, result: CKAResult, previous: CKAResult | None, view: View) -> list[Figure]:
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

    @classmethod
    @override
    def scalars(cls, result: CKAResult, view: View) -> dict[str, float]:
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
        "what a branch adds, log10 (2: the stream is 100 times larger). Raghu et al. 2021: in ViTs the class token "
        "rides the skip connections in the lower half and the patch tokens in the upper half; ViT ratios are far "
        "higher than ResNet ones."
    )
    if zero:
        text += f" {zero} branch(es) are exactly zero (infinite ratio: dots, gaps in the curves), e.g. zero-init BN."
    return text

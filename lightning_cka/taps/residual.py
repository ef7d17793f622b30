"""The residual tap: where a block's skip stream and branch output are, and their norms per token.

Where the two tensors are, per block class (verified numerically in timm 1.0.31, torchvision 0.29 and transformers
4.57 and 5.25, block output equal to stream + branch; ``tests/test_residual_families.py``):

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
torchvision ViT ``EncoderBlock``                         ``ln_1`` / ``ln_2`` input    ``dropout`` / ``mlp`` output
torchvision ``SwinTransformerBlock``                     ``norm1`` / ``norm2`` input  ``attn`` / ``mlp`` output
torchvision ``SwinTransformerBlockV2``                   block / ``mlp`` input        ``norm1`` / ``norm2`` output
torchvision ``MBConv`` / ``FusedMBConv`` with a skip     block input                  ``stochastic_depth`` output
torchvision ConvNeXt ``CNBlock``                         block input                  ``stochastic_depth`` output
Hugging Face ``ViTLayer`` / ``DeiTLayer``                ``layernorm_before`` /       ``attention`` / ``mlp`` output
                                                         ``layernorm_after`` input    (4.x: ``output.dropout``)
Hugging Face ``Dinov2Layer`` (with registers too)        ``norm1`` / ``norm2`` input  ``layer_scale1`` / ``2`` output
Hugging Face ``SwinLayer``                               ``layernorm_before`` /       ``drop_path`` / ``mlp`` output
                                                         ``layernorm_after`` input    (4.x: ``output``)
Hugging Face ``ConvNextLayer``                           block input                  ``drop_path`` output
Hugging Face ``ResNetBasicLayer`` / ``BottleNeckLayer``  ``shortcut`` output          ``layer`` output
=======================================================  ===========================  ================================

In-place additions after a hooked output (``result += input`` in torchvision's MBConv and CNBlock, ``hidden +=
residual`` in Hugging Face's ResNet, ``out += identity`` in ResNets) cannot change what is measured: each hook reduces
its tensor to norms at once. A module called for two branches (torchvision Swin's ``stochastic_depth``, Dinov2's
``drop_path``, Hugging Face ViT's ``dropout``) is never hooked: the module before it gives the same tensor in eval
mode. Hugging Face blocks are recognized by class name and defining module, so ``transformers`` is never imported.

``drop_path*`` modules (``DropPath`` or ``nn.Identity``) are hooked rather than ``ls*`` / ``attn`` / ``mlp``: in eval
mode they are equal, but only the drop-path output is exactly what is added to the stream. A block is recognized by
its class *and* by its forward being that class's own (a subclass that overrides ``forward`` may compute something
else).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.functional.norms import channel_norms
from lightning_cka.taps.base import Tap, first_tensor, owners
from lightning_cka.taps.layers import family_layers

if TYPE_CHECKING:
    from lightning_cka.engine.models import ProbedModel

Side = Literal["in", "out"]
NO_SKIP = "no skip connection (has_skip is False), not a residual block"


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


def _tv_encoder_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # torchvision's ViT block: x = dropout(attention(ln_1(input))) + input; out = x + mlp(ln_2(x)).
    return (
        Branch("attention", (f"{name}.ln_1", "in"), (f"{name}.dropout", "out")),
        Branch("mlp", (f"{name}.ln_2", "in"), (f"{name}.mlp", "out")),
    )


def _tv_swin_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # One stochastic_depth module serves both branches (it would run twice): the branches are attn / mlp outputs, equal
    # to what is added in eval mode, where stochastic depth is the identity.
    return (
        Branch("attention", (f"{name}.norm1", "in"), (f"{name}.attn", "out")),
        Branch("mlp", (f"{name}.norm2", "in"), (f"{name}.mlp", "out")),
    )


def _tv_swin_v2_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # Post-norm: x = x + stochastic_depth(norm1(attn(x))); x = x + stochastic_depth(norm2(mlp(x))).
    return (
        Branch("attention", (name, "in"), (f"{name}.norm1", "out")),
        Branch("mlp", (f"{name}.mlp", "in"), (f"{name}.norm2", "out")),
    )


def _tv_mbconv_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # result = stochastic_depth(block(input)); result += input: the norms are taken in the hook, before the +=.
    if not getattr(module, "use_res_connect", False):
        return ()
    return (Branch("branch", (name, "in"), (f"{name}.stochastic_depth", "out")),)


def _tv_cnblock_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    return (Branch("branch", (name, "in"), (f"{name}.stochastic_depth", "out")),)


def _hf_vit_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # transformers 5: out = x + mlp(layernorm_after(x)); 4: ViTOutput adds its input after dense and dropout.
    mlp = f"{name}.mlp" if isinstance(getattr(module, "mlp", None), nn.Module) else f"{name}.output.dropout"
    return (
        Branch("attention", (f"{name}.layernorm_before", "in"), (f"{name}.attention", "out")),
        Branch("mlp", (f"{name}.layernorm_after", "in"), (mlp, "out")),
    )


def _hf_dinov2_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # drop_path is one module called for both branches: the layer scales' outputs are what is added (in eval mode).
    return (
        Branch("attention", (f"{name}.norm1", "in"), (f"{name}.layer_scale1", "out")),
        Branch("mlp", (f"{name}.norm2", "in"), (f"{name}.layer_scale2", "out")),
    )


def _hf_swin_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    mlp = f"{name}.mlp" if isinstance(getattr(module, "mlp", None), nn.Module) else f"{name}.output"
    return (
        Branch("attention", (f"{name}.layernorm_before", "in"), (f"{name}.drop_path", "out")),
        Branch("mlp", (f"{name}.layernorm_after", "in"), (mlp, "out")),
    )


def _hf_convnext_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    return (Branch("branch", (name, "in"), (f"{name}.drop_path", "out")),)


def _hf_resnet_branches(name: str, module: nn.Module) -> tuple[Branch, ...]:
    # hidden = layer(x); hidden += shortcut(x): the norms of layer's output are taken in the hook, before the +=.
    return (Branch("branch", (f"{name}.shortcut", "out"), (f"{name}.layer", "out")),)


# Hugging Face blocks by (defining module, class name): recognized without importing transformers, in 4.x and 5.x.
_HF_BLOCKS: dict[tuple[str, str], tuple[Callable[[str, nn.Module], tuple[Branch, ...]], bool]] = {
    ("transformers.models.vit.modeling_vit", "ViTLayer"): (_hf_vit_branches, False),
    ("transformers.models.deit.modeling_deit", "DeiTLayer"): (_hf_vit_branches, False),
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Layer"): (_hf_dinov2_branches, False),
    ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers", "Dinov2WithRegistersLayer"): (
        _hf_dinov2_branches,
        False,
    ),
    ("transformers.models.swin.modeling_swin", "SwinLayer"): (_hf_swin_branches, False),
    ("transformers.models.convnext.modeling_convnext", "ConvNextLayer"): (_hf_convnext_branches, True),
    ("transformers.models.resnet.modeling_resnet", "ResNetBasicLayer"): (_hf_resnet_branches, True),
    ("transformers.models.resnet.modeling_resnet", "ResNetBottleNeckLayer"): (_hf_resnet_branches, True),
}


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
        from torchvision.models import convnext as tv_convnext
        from torchvision.models import efficientnet as tv_efficientnet
        from torchvision.models import resnet as tv_resnet
        from torchvision.models import swin_transformer as tv_swin
        from torchvision.models import vision_transformer as tv_vit
    except ImportError:  # torchvision is optional
        pass
    else:
        families += [
            (tv_resnet.BasicBlock, _resnet_branches, True),
            (tv_resnet.Bottleneck, _resnet_branches, True),
            (tv_vit.EncoderBlock, _tv_encoder_branches, False),
            (tv_swin.SwinTransformerBlockV2, _tv_swin_v2_branches, False),  # a subclass: before its parent
            (tv_swin.SwinTransformerBlock, _tv_swin_branches, False),
            (tv_efficientnet.MBConv, _tv_mbconv_branches, True),
            (tv_efficientnet.FusedMBConv, _tv_mbconv_branches, True),
            (tv_convnext.CNBlock, _tv_cnblock_branches, True),
        ]
    return families


def locate_branches(name: str, module: nn.Module) -> tuple[tuple[Branch, ...], bool] | str:
    """The branches of the residual block ``module`` (called ``name``) and whether it holds conv maps, or why not.

    Returns:
        ``(branches, maps)`` for a recognized residual block; :data:`NO_SKIP` for a recognized block without a skip
        connection; another reason (a string) when the branch cannot be located.
    """
    hf = _HF_BLOCKS.get((type(module).__module__, type(module).__name__))
    if hf is not None:
        branches, maps = hf
        found = branches(name, module)
        return (found, maps) if found else NO_SKIP
    for cls, branches, maps in _families():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            found = branches(name, module)
            return (found, maps) if found else NO_SKIP
    known = isinstance(module, tuple(cls for cls, _, _ in _families()))
    if known:
        return f"{type(module).__name__} overrides its forward, so where its branches are is not known"
    return f"{type(module).__name__} is not a residual block whose branches are known"


def auto_blocks(model: "ProbedModel") -> set[str]:
    """The residual blocks ``layers="auto"`` recognizes in the model by its family (none for the fallback layers)."""
    return set(family_layers(model.module))


def residual_sites(model: "ProbedModel") -> tuple[list[ResidualSite], dict[str, str]]:
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


def token_capacity(model: "ProbedModel", sites: list[ResidualSite]) -> int:
    """The most tokens any site's tensors have at the model's construction size (the states' first token axis).

    Conv maps are averaged to one token. Token models take ``prefix + grid`` from the innermost owner with a
    ``patch_embed`` or Hugging Face ``embeddings.patch_embeddings`` (PiT's pooled stages have fewer), or torchvision
    ViT's ``seq_length``. Dynamic-size models run at a larger size bring more tokens: the
    states then widen at the first minibatch (on every rank that has one; under DDP a rank without one keeps the
    construction size, and the probe's reduction fails on every rank alike, never hangs) and stay wide afterwards.
    """
    capacity = 1
    for site in sites:
        if site.maps:
            continue
        for owner in owners(model.modules, site.name):
            grid = _grid_size(owner)
            if grid is not None:
                capacity = max(capacity, site.num_prefix_tokens + int(grid[0]) * int(grid[1]))
                break
            if isinstance(getattr(owner, "seq_length", None), int):  # torchvision's ViT: class token and patches
                capacity = max(capacity, int(owner.seq_length))
                break
    return capacity


def _grid_size(owner: nn.Module) -> tuple[int, int] | None:
    """The patch grid of timm's ``patch_embed`` or of a Hugging Face ``embeddings.patch_embeddings``."""
    grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
    if grid is not None:
        return grid
    patches = getattr(getattr(owner, "embeddings", None), "patch_embeddings", None)
    if hasattr(patches, "grid_size"):  # Swin
        return patches.grid_size
    image, patch = getattr(patches, "image_size", None), getattr(patches, "patch_size", None)
    if image is None or patch is None:
        return None
    image, patch = (v if isinstance(v, tuple | list) else (v, v) for v in (image, patch))
    return image[0] // patch[0], image[1] // patch[1]


# 1 MiB of float32: the squares one chunk of an NCHW map materializes stay in the L2 cache between the multiply and
# the sum (1.4x faster than 4 MiB chunks on a Zen 3 core), and never add an activation to the peak memory.
_CHUNK_ELEMENTS = 1 << 18


def _chunk_images(x: Tensor) -> int:
    """Images per chunk: vecdot materializes the squared activation, which must not add an activation to the peak."""
    return max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))


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

                        handles.append(self.on_input(module, pre_hook, with_kwargs=True))
                    else:

                        def hook(module: nn.Module, args: tuple, output: object, record: Callable = record) -> None:
                            record(output)

                        handles.append(self.on_output(module, hook))
        return handles

    def _recorder(self, key: tuple[int, int, str], site: ResidualSite, module_name: str) -> Callable:
        def record(value: object) -> None:
            if key in self._norms:
                raise RuntimeError(
                    f"module '{module_name}' of residual block '{site.name}' ran more than once in one forward pass, "
                    "so its residual branch has no single output. Monitor other layers, or leave the residual analysis "
                    "out."
                )
            x = first_tensor(value, module_name)
            dim = 1 if site.maps else -1
            if x.stride(dim) == 1:  # contiguous channels: one fused reduction that keeps nothing, no chunks needed
                norms = channel_norms(x, dim)
            else:
                norms = torch.cat([channel_norms(c, dim) for c in x.split(_chunk_images(x))])
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

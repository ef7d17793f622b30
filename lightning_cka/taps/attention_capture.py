"""Attention probabilities of Hugging Face and torchvision attention modules, without changing what they compute.

No model is asked for its attention weights: under SDPA or flash kernels they never exist, Hugging Face's
``output_attentions=True`` would switch the implementation, and ``need_weights=True`` would take torchvision's
``nn.MultiheadAttention`` off its fast path. Hooks read what the module computes anyway, and the probabilities are
formed again from ``q`` and ``k`` in float32, a few images at a time, and handed to
:meth:`lightning_cka.taps.attention.AttentionTap.consume`:

=====================  =============================================  ==============================================
site kind              what is read                                   what is added to ``q·scale @ kᵀ``
=====================  =============================================  ==============================================
``hf`` (ViT, DeiT,     outputs of ``q_proj`` / ``k_proj``             the ``attention_mask`` argument (``None`` for
Dinov2)                (``query`` / ``key`` in transformers 4)        images)
``hf_swin``            the same, per window                           the relative position bias and the shifted-
                                                                      window mask the block passes
``torchvision_mha``    the input of ``nn.MultiheadAttention`` and     its ``attn_mask`` / ``key_padding_mask``
                       its ``in_proj_weight`` / ``in_proj_bias``
``torchvision_swin``   the input of ``ShiftedWindowAttention`` and    its relative position bias and shift mask
                       its ``qkv`` weights (rolled and partitioned
                       into windows as its forward does)
=====================  =============================================  ==============================================

Window attention (Swin) is measured inside each window: its distances are those of the window's tokens, in input
pixels of that stage (the patch size times the stage's downsampling); a shifted window's tokens from different
regions attend to each other with weight ``exp(-100)``, so the window's grid gives their distances. Layers whose
windows need padding (a grid that is not a multiple of the window) are left out with the reason.

Nothing here imports ``transformers``: a module is recognized by its class name and the module that defines it, so
that models of both major versions are read (transformers 5 names the projections ``q_proj`` / ``k_proj`` / ``o_proj``
on the attention module; transformers 4 ``query`` / ``key`` on ``attention.attention`` and the output projection
``attention.output.dense``).
"""

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_cka.taps.attention_site import AttentionSite
from lightning_cka.taps.grams import token_layout

if TYPE_CHECKING:
    from lightning_cka.taps.attention import AttentionTap

# Hugging Face attention classes whose probabilities are softmax(q·scale @ kᵀ + mask), by the module defining them.
_HF_VIT = {
    "transformers.models.vit.modeling_vit": ("ViTAttention", "ViTSelfAttention", "ViTSdpaSelfAttention"),
    "transformers.models.deit.modeling_deit": ("DeiTAttention", "DeiTSelfAttention", "DeiTSdpaSelfAttention"),
    "transformers.models.dinov2.modeling_dinov2": (
        "Dinov2Attention",
        "Dinov2SelfAttention",
        "Dinov2SdpaSelfAttention",
    ),
    "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers": (
        "Dinov2WithRegistersAttention",
        "Dinov2WithRegistersSelfAttention",
        "Dinov2WithRegistersSdpaSelfAttention",
    ),
}
_HF_SWIN = {"transformers.models.swin.modeling_swin": ("SwinAttention", "SwinSelfAttention")}


def other_sites(modules: Mapping[str, nn.Module]) -> list[AttentionSite]:
    """The attention modules of Hugging Face ViT / DeiT / Dinov2 / Swin and torchvision ViT / Swin models."""
    sites: list[AttentionSite] = []
    for owner_name, owner in modules.items():
        prefix = f"{owner_name}." if owner_name else ""
        library = type(owner).__module__
        if library.startswith("transformers."):
            sites += _hf_vit_sites(modules, owner, prefix) + _hf_swin_sites(owner, prefix)
        elif library == "torchvision.models.vision_transformer" and hasattr(owner, "conv_proj"):
            sites += _torchvision_vit_sites(modules, owner, prefix)
        elif library == "torchvision.models.swin_transformer" and hasattr(owner, "features"):
            sites += _torchvision_swin_sites(owner, prefix)
    return sites


def _under(modules: Mapping[str, nn.Module], prefix: str, full: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules under the owner called ``prefix`` (names inside it, or ``full`` names)."""
    for name, module in modules.items():
        if name and name.startswith(prefix):
            yield (name if full else name[len(prefix) :]), module


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, tuple | list) else (int(value), int(value))


def _is_hf(module: nn.Module, classes: Mapping[str, tuple[str, ...]]) -> bool:
    return type(module).__name__ in classes.get(type(module).__module__, ())


def _hf_projections(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The ``q`` and ``k`` projections of a Hugging Face attention module (transformers 5, then 4)."""
    for q, k in (("q_proj", "k_proj"), ("query", "key")):
        if isinstance(getattr(module, q, None), nn.Linear) and isinstance(getattr(module, k, None), nn.Linear):
            return getattr(module, q), getattr(module, k)
    return None


def _hf_head_dim(module: nn.Module) -> int:
    return int(getattr(module, "head_dim", 0) or getattr(module, "attention_head_size", 0))


def _hf_proj(name: str, module: nn.Module, modules: Mapping[str, nn.Module]) -> str:
    """The module whose input is the heads' outputs: ``o_proj`` (transformers 5) or ``<parent>.output.dense`` (4)."""
    if isinstance(getattr(module, "o_proj", None), nn.Linear):
        return f"{name}.o_proj"
    parent = name.rsplit(".", 1)[0]
    return f"{parent}.output.dense" if isinstance(modules.get(f"{parent}.output.dense"), nn.Linear) else ""


def _hf_vit_sites(modules: Mapping[str, nn.Module], owner: nn.Module, prefix: str) -> list[AttentionSite]:
    """ViT, DeiT and Dinov2 (with registers): an owner whose ``embeddings`` hold the class token and the patches."""
    embeddings = getattr(owner, "embeddings", None)
    patches = getattr(embeddings, "patch_embeddings", None)
    if not isinstance(getattr(embeddings, "cls_token", None), Tensor) or not hasattr(patches, "patch_size"):
        return []
    patch = _pair(patches.patch_size)
    image = _pair(getattr(patches, "image_size", patch))
    grid = (image[0] // patch[0], image[1] // patch[1])
    embed = f"{prefix}embeddings.patch_embeddings"
    sites = []
    for name, module in _under(modules, prefix):
        if not _is_hf(module, _HF_VIT) or _hf_projections(module) is None or not _hf_head_dim(module):
            continue
        full = f"{prefix}{name}"
        layout = token_layout(modules, full)
        head_dim = _hf_head_dim(module)
        heads = _hf_projections(module)[0].out_features // head_dim
        sites.append(
            AttentionSite(
                full, heads, layout.num_prefix_tokens, grid, (float(patch[0]), float(patch[1])), embed, "hf", head_dim,
                _hf_proj(full, module, modules),
            )
        )  # fmt: skip
    return sites


def _hf_swin_sites(owner: nn.Module, prefix: str) -> list[AttentionSite]:
    """Swin: an owner whose ``encoder.layers`` are stages of ``blocks``; each stage halves the grid."""
    patches = getattr(getattr(owner, "embeddings", None), "patch_embeddings", None)
    stages = getattr(getattr(owner, "encoder", None), "layers", None)
    if not hasattr(patches, "patch_size") or not isinstance(stages, nn.ModuleList):
        return []
    patch = _pair(patches.patch_size)
    sites = []
    for s, stage in enumerate(stages):
        for j, block in enumerate(getattr(stage, "blocks", ())):
            block_name = f"{prefix}encoder.layers.{s}.blocks.{j}"
            attention = getattr(block, "attention", None)
            name = f"{block_name}.attention"
            if attention is not None and _hf_projections(attention) is None:  # transformers 4: attention.self
                attention, name = getattr(attention, "self", None), f"{name}.self"
            if attention is None or not _is_hf(attention, _HF_SWIN) or _hf_projections(attention) is None:
                continue
            head_dim = _hf_head_dim(attention)
            bias = getattr(attention, "relative_position_bias", attention)  # 5: a module; 4: on the attention itself
            window = _pair(getattr(bias, "window_size", getattr(block, "window_size", 0)))
            if isinstance(getattr(attention, "o_proj", None), nn.Linear):
                proj = f"{name}.o_proj"
            else:
                proj = f"{block_name}.attention.output.dense"
            stride = (float(patch[0] * 2**s), float(patch[1] * 2**s))
            heads = _hf_projections(attention)[0].out_features // head_dim
            sites.append(AttentionSite(name, heads, 0, window, stride, "", "hf_swin", head_dim, proj, block_name))
    return sites


def _torchvision_vit_sites(modules: Mapping[str, nn.Module], owner: nn.Module, prefix: str) -> list[AttentionSite]:
    """The ``nn.MultiheadAttention`` of every block of torchvision's ViT, on a fixed grid after the class token."""
    patch = _pair(getattr(owner, "patch_size", owner.conv_proj.stride))
    image = _pair(getattr(owner, "image_size", 0))
    grid = (image[0] // patch[0], image[1] // patch[1])
    prefix_tokens = 1 if isinstance(getattr(owner, "class_token", None), Tensor) else 0
    stride, embed = (float(patch[0]), float(patch[1])), f"{prefix}conv_proj"
    return [
        AttentionSite(name, module.num_heads, prefix_tokens, grid, stride, embed, "torchvision_mha", module.head_dim)
        for name, module in _under(modules, prefix, full=True)
        if isinstance(module, nn.MultiheadAttention)
    ]


def _torchvision_swin_sites(owner: nn.Module, prefix: str) -> list[AttentionSite]:
    """The ``ShiftedWindowAttention`` of every block of torchvision's Swin (v1); each stage halves the grid."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    children = list(owner.features.named_children())
    if not children:
        return []
    convs = [m for m in children[0][1].modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return []
    patch = _pair(convs[0].stride)
    sites, stage = [], -1
    for index, child in children[1:]:
        blocks = [(j, b) for j, b in child.named_children() if isinstance(getattr(b, "attn", None), nn.Module)]
        if not blocks:
            continue
        stage += 1
        stride = (float(patch[0] * 2**stage), float(patch[1] * 2**stage))
        for j, block in blocks:
            attn = block.attn
            if type(attn) is not ShiftedWindowAttention:  # V2 attention is cosine attention with a logit scale
                continue
            window = _pair(attn.window_size)
            name = f"{prefix}features.{index}.{j}.attn"
            head_dim = attn.qkv.out_features // 3 // attn.num_heads
            sites.append(AttentionSite(name, attn.num_heads, 0, window, stride, "", "torchvision_swin", head_dim))
    return sites


# ---------------------------------------------------------------------------------------------------------- captures


def capture_hooks(
    tap: "AttentionTap", sites: list[tuple[int, AttentionSite]], modules: Mapping[str, nn.Module]
) -> list[RemovableHandle]:
    """Register the hooks that hand the probabilities of ``sites`` (``(layer index, site)``) to ``tap.consume``."""
    grids: dict[str, _InputGrid] = {}
    handles: list[RemovableHandle] = []
    for layer, site in sites:
        if site.kind == "hf":
            if site.embed not in grids:
                grids[site.embed] = _InputGrid(modules[site.embed])
                handles.append(tap.on_input(modules[site.embed], grids[site.embed].hook))
            handles += _HFCapture(tap, layer, site, modules, grids[site.embed]).hooks(modules)
        elif site.kind == "hf_swin":
            handles += _HFCapture(tap, layer, site, modules, None).hooks(modules)
        elif site.kind == "torchvision_mha":
            capture = _ModuleCapture(tap, layer, site, _mha_probabilities)
            handles.append(tap.on_input(modules[site.name], capture.hook, with_kwargs=True))
        elif site.kind == "torchvision_swin":
            capture = _ModuleCapture(tap, layer, site, _swin_probabilities)
            handles.append(tap.on_input(modules[site.name], capture.hook, with_kwargs=True))
        else:
            raise ValueError(f"attention site '{site.name}' has an unknown kind {site.kind!r}.")
    return handles


def _chunks(
    q: Tensor, k: Tensor, scale: float, bias: Callable[[int, int], Tensor | None]
) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, probabilities)`` of ``q``, ``k`` ``(B, H, T, d)`` in float32, a few images at a time.

    Each chunk of ``(b, H, T, T)`` probabilities is about as large as the module's ``(B, T, H·d)`` input.
    """
    batch, _, tokens, head_dim = q.shape
    chunk = max(1, batch * head_dim // tokens)
    with torch.autocast(q.device.type, enabled=False):
        for start in range(0, batch, chunk):
            stop = min(batch, start + chunk)
            scores = (q[start:stop].float() @ k[start:stop].float().mT).mul_(scale)
            extra = bias(start, stop)
            if extra is not None:
                scores = scores + extra
            yield start, stop, scores.softmax(dim=-1)


def _additive(mask: Tensor | None, allowed_when_true: bool) -> Tensor | None:
    """A mask as float32 logits to add: a bool mask becomes 0 / -inf; a float mask is added as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask if allowed_when_true else mask
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(blocked, float("-inf"))
    return mask.float()


def _rows(bias: Tensor | None, batch: int) -> Callable[[int, int], Tensor | None]:
    """The bias of rows ``start:stop`` of a batch: a per-example ``(B, ...)`` bias is sliced, any other broadcast."""
    if bias is None:
        return lambda start, stop: None
    if bias.dim() == 4 and bias.shape[0] == batch and batch > 1:
        return lambda start, stop: bias[start:stop]
    return lambda start, stop: bias


def _window_bias(relative: Tensor, mask: Tensor | None) -> Callable[[int, int], Tensor]:
    """Relative position bias ``(1, H, T, T)`` plus the shift mask ``(nW, T, T)`` of each window row (row % nW)."""
    if mask is None:
        return lambda start, stop: relative
    windows = mask.shape[0]
    mask = mask.float()

    def bias(start: int, stop: int) -> Tensor:
        index = torch.arange(start, stop, device=mask.device) % windows
        return relative + mask[index].unsqueeze(1)

    return bias


def _relative_bias(owner: nn.Module, tokens: int) -> Tensor:
    """``(1, H, T, T)`` relative position bias from a Swin ``relative_position_bias_table`` and its index."""
    table, index = owner.relative_position_bias_table, owner.relative_position_index
    return table[index.reshape(-1)].reshape(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0).float()


class _InputGrid:
    """The patch grid of the image entering a Hugging Face patch embedding (Dinov2 interpolates to any size)."""

    def __init__(self, module: nn.Module) -> None:
        self.patch = _pair(module.patch_size)
        self.grid: tuple[int, int] | None = None

    def hook(self, module: nn.Module, args: tuple) -> None:
        pixels = args[0] if args else None
        if isinstance(pixels, Tensor) and pixels.dim() == 4:
            self.grid = (int(pixels.shape[-2]) // self.patch[0], int(pixels.shape[-1]) // self.patch[1])


class _HFCapture:
    """The hooks of one Hugging Face attention module: its call (masks), then ``q`` and ``k`` in either order."""

    def __init__(
        self,
        tap: "AttentionTap",
        layer: int,
        site: AttentionSite,
        modules: Mapping[str, nn.Module],
        grid: _InputGrid | None,
    ) -> None:
        self.tap, self.layer, self.site, self.input_grid = tap, layer, site, grid
        self.module = modules[site.name]
        self.scale = float(getattr(self.module, "scaling", site.head_dim**-0.5))
        self.signature = inspect.signature(self.module.forward)
        self._q: Tensor | None = None
        self._k: Tensor | None = None
        self._mask: Tensor | None = None
        self._stage_grid: tuple[int, int] | None = None

    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        q, k = _hf_projections(self.module)
        handles = [
            self.tap.on_input(self.module, self.on_call, with_kwargs=True),
            self.tap.on_output(q, self.on_q),
            self.tap.on_output(k, self.on_k),
        ]
        if self.site.block:
            handles.append(self.tap.on_input(modules[self.site.block], self.on_block, with_kwargs=True))
        return handles

    def on_block(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
        self._stage_grid = (int(dims[0]), int(dims[1])) if dims is not None else None

    def on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        if bound.get("head_mask") is not None:
            raise RuntimeError(
                f"attention module '{self.site.name}' is called with a head_mask, which rescales its probabilities; "
                "leave the attention analysis out, or call the model without head_mask."
            )
        self._mask = bound.get("attention_mask")
        self._q = self._k = None

    def on_q(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._q = output
        self._ready()

    def on_k(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._k = output
        self._ready()

    def _ready(self) -> None:
        if self._q is None or self._k is None:
            return
        q, k = (x.unflatten(-1, (-1, self.site.head_dim)).transpose(1, 2) for x in (self._q, self._k))  # (B, H, T, d)
        self._q = self._k = None
        if self.site.kind == "hf_swin":
            self._windows(q, k)
        else:
            self._patches(q, k)

    def _patches(self, q: Tensor, k: Tensor) -> None:
        site, tokens = self.site, q.shape[2]
        grid = (self.input_grid.grid if self.input_grid is not None else None) or site.grid
        if tokens != site.num_prefix_tokens + grid[0] * grid[1]:
            self.tap.skipped[site.name] = (
                f"its {tokens} tokens are not {site.num_prefix_tokens} prefix tokens + a {grid[0]}x{grid[1]} patch grid"
            )
            return
        distances = self.tap.distances(site, grid, q.device)
        self.tap.measured_grids[site.name] = grid
        bias = _rows(_additive(self._mask, allowed_when_true=True), q.shape[0])
        for _, _, probs in _chunks(q, k, self.scale, bias):
            self.tap.consume(self.layer, probs, distances)

    def _windows(self, q: Tensor, k: Tensor) -> None:
        site, tokens = self.site, q.shape[2]
        side = math.isqrt(tokens)
        stage = self._stage_grid
        if side * side != tokens:
            raise RuntimeError(f"Swin attention '{site.name}' has {tokens} tokens per window, not a square window.")
        if stage is not None and (stage[0] % side or stage[1] % side):
            self.tap.skipped[site.name] = (
                f"its {stage[0]}x{stage[1]} grid is padded to fit {side}x{side} windows: padded tokens have no place "
                "in the image"
            )
            return
        owner = getattr(self.module, "relative_position_bias", self.module)
        relative = _relative_bias(owner, tokens).to(q.device)
        mask = self._mask
        bias = _window_bias(relative, mask if isinstance(mask, Tensor) and mask.dim() == 3 else None)
        distances = self.tap.distances(site, (side, side), q.device)
        self.tap.measured_grids[site.name] = (side, side)
        for _, _, probs in _chunks(q, k, self.scale, bias):
            self.tap.consume(self.layer, probs, distances)


class _ModuleCapture:
    """A pre-hook on a torchvision attention module that forms its probabilities from its input."""

    def __init__(self, tap: "AttentionTap", layer: int, site: AttentionSite, probabilities: Callable) -> None:
        self.tap, self.layer, self.site, self.probabilities = tap, layer, site, probabilities

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = self.probabilities(module, self.site, args, kwargs)
        if isinstance(found, str):
            self.tap.skipped[self.site.name] = found
            return
        q, k, scale, bias, grid = found
        distances = self.tap.distances(self.site, grid, q.device)
        self.tap.measured_grids[self.site.name] = grid
        for _, _, probs in _chunks(q, k, scale, bias):
            self.tap.consume(self.layer, probs, distances)


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_inputs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = _MHA_SIGNATURE.bind_partial(module, *args, **kwargs).arguments
    query = bound["query"]
    key = bound.get("key", query)
    value = bound.get("value", key)
    if not module.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    return {**bound, "query": query, "key": key, "value": value}


def _mha_qkv(module: nn.MultiheadAttention, inputs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor] | str:
    """``q``, ``k``, ``v`` ``(B, H, T, d)`` of an ``nn.MultiheadAttention`` call, as its in-projection gives them."""
    if module.bias_k is not None or module.add_zero_attn:
        return "its bias_k / add_zero_attn add keys that are no patch"
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    out = []
    for x, weight, bias in zip((inputs["query"], inputs["key"], inputs["value"]), weights, biases, strict=True):
        out.append(F.linear(x, weight, bias).unflatten(-1, (module.num_heads, module.head_dim)).transpose(1, 2))
    return out[0], out[1], out[2]


def _mha_bias(module: nn.MultiheadAttention, inputs: dict[str, Any], q: Tensor, k: Tensor) -> Tensor | None:
    """The logits ``nn.MultiheadAttention`` adds: ``attn_mask`` and ``key_padding_mask`` (True: not attended)."""
    batch, heads, tokens, _ = q.shape
    keys = k.shape[2]
    total = None
    mask = _additive(inputs.get("attn_mask"), allowed_when_true=False)
    if mask is not None:
        total = mask.reshape(batch, heads, tokens, keys) if mask.dim() == 3 else mask
    elif inputs.get("is_causal"):
        total = torch.full((tokens, keys), float("-inf"), device=q.device).triu_(1)
    padding = _additive(inputs.get("key_padding_mask"), allowed_when_true=False)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, keys)
        total = padding if total is None else total + padding
    return total


def _mha_probabilities(
    module: nn.MultiheadAttention, site: AttentionSite, args: tuple, kwargs: dict
) -> tuple[Tensor, Tensor, float, Callable, tuple[int, int]] | str:
    inputs = _mha_inputs(module, args, kwargs)
    found = _mha_qkv(module, inputs)
    if isinstance(found, str):
        return found
    q, k, _ = found
    tokens = q.shape[2]
    if tokens != site.num_prefix_tokens + site.grid[0] * site.grid[1] or k.shape[2] != tokens:
        return (
            f"its {tokens} tokens are not {site.num_prefix_tokens} prefix tokens + a {site.grid[0]}x{site.grid[1]} "
            "patch grid"
        )
    bias = _rows(_mha_bias(module, inputs, q, k), q.shape[0])
    return q, k, module.head_dim**-0.5, bias, site.grid


def _swin_windows(module: nn.Module, x: Tensor) -> tuple[Tensor, list[int], list[int], int] | str:
    """The ``(B·nW, T, C)`` windows ``ShiftedWindowAttention`` forms of its ``(B, H, W, C)`` input, as it does."""
    _, height, width, _ = x.shape
    window, shift = list(module.window_size), list(module.shift_size)
    if height % window[0] or width % window[1]:
        return (
            f"its {height}x{width} grid is padded to fit {window[0]}x{window[1]} windows: padded tokens have no place "
            "in the image"
        )
    shift = [0 if window[i] >= size else shift[i] for i, size in enumerate((height, width))]  # as its forward does
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, cols = height // window[0], width // window[1]
    windows = x.reshape(x.shape[0], rows, window[0], cols, window[1], x.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(-1, window[0] * window[1], x.shape[-1]), window, shift, rows * cols


def _swin_shift_mask(height: int, width: int, window: list[int], shift: list[int], device: torch.device) -> Tensor:
    """``(nW, T, T)``: -100 between tokens of a shifted window that come from different regions of the image."""
    regions = torch.zeros((height, width), device=device)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    regions = regions.reshape(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3)
    regions = regions.reshape(-1, window[0] * window[1])
    different = regions.unsqueeze(1) != regions.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill_(different, -100.0)


def _swin_qkv(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Callable, list[int]] | str:
    windowed = _swin_windows(module, x)
    if isinstance(windowed, str):
        return windowed
    windows, window, shift, _ = windowed
    qkv = F.linear(windows, module.qkv.weight, module.qkv.bias)
    qkv = qkv.reshape(windows.shape[0], windows.shape[1], 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    relative = module.get_relative_position_bias().float()
    mask = _swin_shift_mask(x.shape[1], x.shape[2], window, shift, x.device) if sum(shift) > 0 else None
    return qkv[0], qkv[1], qkv[2], _window_bias(relative, mask), window


def _swin_probabilities(
    module: nn.Module, site: AttentionSite, args: tuple, kwargs: dict
) -> tuple[Tensor, Tensor, float, Callable, tuple[int, int]] | str:
    x = args[0] if args else kwargs["x"]
    found = _swin_qkv(module, x)
    if isinstance(found, str):
        return found
    q, k, _, bias, window = found
    return q, k, q.shape[-1] ** -0.5, bias, (window[0], window[1])


def head_outputs(site: AttentionSite, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """``(B, T', H·d)`` head-major outputs of the heads of a torchvision attention module, from its input.

    torchvision applies the output projection functionally, so no module receives them: they are formed again as
    ``probabilities @ v`` (float32). Swin's windows are laid side by side per image (``T' = nW·T``): a Gram over all
    tokens or their mean does not depend on the order of the tokens.
    """
    if site.kind == "torchvision_mha":
        inputs = _mha_inputs(module, args, kwargs)
        found = _mha_qkv(module, inputs)
        if isinstance(found, str):
            raise RuntimeError(f"the heads of '{site.name}' cannot be read: {found}.")
        q, k, v = found
        bias, scale, per_image = _rows(_mha_bias(module, inputs, q, k), q.shape[0]), module.head_dim**-0.5, 1
    elif site.kind == "torchvision_swin":
        x = args[0] if args else kwargs["x"]
        found = _swin_qkv(module, x)
        if isinstance(found, str):
            raise RuntimeError(f"the heads of '{site.name}' cannot be read: {found}.")
        q, k, v, bias, _ = found
        scale, per_image = q.shape[-1] ** -0.5, q.shape[0] // x.shape[0]
    else:
        raise ValueError(f"'{site.name}' ({site.kind}) passes its heads to a module: read that module's input.")
    out = torch.cat([probs @ v[start:stop].float() for start, stop, probs in _chunks(q, k, scale, bias)])
    out = out.transpose(1, 2).flatten(2)  # (B', T, H·d), head-major
    return out.reshape(out.shape[0] // per_image, -1, out.shape[-1])

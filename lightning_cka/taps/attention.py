"""Attention probabilities of timm attention modules during a probe, fused kernels or not.

With ``fused_attn`` on, ``F.scaled_dot_product_attention`` runs and no attention matrix ever exists. Instead of
re-running ``qkv`` (a quarter of a ViT's FLOPs), the tap reads ``q`` and ``k`` where the module already has them: the
outputs of its ``q_norm`` and ``k_norm`` submodules (``nn.Identity`` without QK-norm), which timm's ``Attention``
calls in that order right before the attention product. The probabilities ``softmax(q·scale @ kᵀ + mask)`` are then
formed in float32, a few images at a time, and handed to :meth:`AttentionTap.consume`; the module's own forward,
fused kernel included, is untouched.
"""

from collections.abc import Callable, Mapping

import torch
from timm.layers import Attention
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_cka.functional.attention import attention_logits, attention_softmax, attention_sums, patch_distances
from lightning_cka.taps.attention_site import AttentionSite
from lightning_cka.taps.base import Tap

__all__ = ["ATTENTION_SUMS", "AttentionSite", "AttentionStatsTap", "AttentionTap", "attention_sites"]


def is_supported_attention(module: nn.Module) -> bool:
    """Timm's ``Attention`` (ViT, DeiT, register and hybrid ViTs, PiT) or a subclass that keeps its forward."""
    return isinstance(module, Attention) and type(module).forward is Attention.forward


def attention_sites(modules: Mapping[str, nn.Module]) -> list[AttentionSite]:
    """Every attention module of a model whose probabilities the monitor can read, under a patch grid, in order.

    timm's ``Attention`` under a ``patch_embed`` with a patch grid (this module), and the attention of Hugging Face
    ViT, DeiT, Dinov2 and Swin models and of torchvision's ViT and Swin
    (:func:`lightning_cka.taps.attention_capture.other_sites`).
    """
    from lightning_cka.taps.attention_capture import other_sites

    sites = []
    for name, module in modules.items():
        if not is_supported_attention(module):
            continue
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            owner_name = ".".join(parts[:depth])
            geometry = _geometry(modules[owner_name])
            if geometry is not None:
                grid, stride, prefix = geometry
                embed = f"{owner_name}.patch_embed" if owner_name else "patch_embed"
                head_dim = int(getattr(module, "head_dim", 0) or 0)
                proj = f"{name}.proj"
                sites.append(AttentionSite(name, module.num_heads, prefix, grid, stride, embed, "timm", head_dim, proj))
                break
    found = {site.name: site for site in [*sites, *other_sites(modules)]}
    return [found[name] for name in modules if name in found]  # module order, whoever found it


def _geometry(owner: nn.Module) -> tuple[tuple[int, int], tuple[float, float], int] | None:
    embed = getattr(owner, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is None:
        return None
    if callable(getattr(embed, "feat_ratio", None)):  # PatchEmbed: the patch size; HybridEmbed: backbone stride x patch
        stride = embed.feat_ratio(as_scalar=False)
    elif isinstance(getattr(embed, "conv", None), nn.Conv2d):  # PiT's overlapping patches
        stride = embed.conv.stride
    else:
        stride = embed.patch_size
    stride = (stride, stride) if isinstance(stride, int | float) else tuple(stride)
    if hasattr(owner, "num_prefix_tokens"):
        prefix = int(owner.num_prefix_tokens)
    else:
        prefix = int(getattr(owner, "num_tokens", 1))
    return (int(grid[0]), int(grid[1])), (float(stride[0]), float(stride[1])), prefix


class AttentionTap(Tap):
    """Hooks on the attention modules ``sites`` that hand their attention probabilities to :meth:`consume`.

    A module whose tokens are not its prefix tokens plus the patch grid (PiT's pooled stages) is skipped: it never
    reaches :meth:`consume`, and :attr:`skipped` says why.

    Args:
        sites: the attention modules.
    """

    def __init__(self, sites: list[AttentionSite]) -> None:
        self.sites = list(sites)
        self.key = ("attention", type(self).__name__, tuple(site.name for site in sites))
        self.skipped: dict[str, str] = {}
        self.measured_grids: dict[str, tuple[int, int]] = {}  # the grid each site's distances were measured on
        self._grids: dict[str, tuple[int, int]] = {}
        self._distances: dict[tuple, Tensor] = {}

    def consume(self, layer: int, probs: Tensor, distances: Tensor) -> None:
        """Take ``(b, H, T, T)`` float32 probabilities of site ``layer`` and the ``(P, P)`` patch distances."""
        raise NotImplementedError

    def consume_logits(self, layer: int, probs: Tensor, distances: Tensor, logits: Tensor) -> None:
        """:meth:`consume`, given also the finite logits ``probs`` is the softmax of (no ``-inf`` mask).

        A tap that can use the logits overrides this (they make the entropy cheaper:
        :func:`lightning_cka.functional.attention.attention_sums`); by default they are dropped.
        """
        self.consume(layer, probs, distances)

    @override
    def hooks(self, modules: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        handles = []
        timm_sites = [(layer, site) for layer, site in enumerate(self.sites) if site.kind == "timm"]
        others = [(layer, site) for layer, site in enumerate(self.sites) if site.kind != "timm"]
        if others:  # Hugging Face and torchvision attention: their own captures, the same consume()
            from lightning_cka.taps.attention_capture import capture_hooks

            handles += capture_hooks(self, others, modules)
        for embed in {site.embed for _, site in timm_sites}:
            handles.append(self.on_output(modules[embed], self._grid_hook(embed)))
        for layer, site in timm_sites:
            module = modules[site.name]
            capture = _QKCapture(self, layer, site, float(module.scale))
            handles += [
                self.on_input(module, capture.on_call, with_kwargs=True),
                self.on_output(module.q_norm, capture.on_q),
                self.on_output(module.k_norm, capture.on_k),
            ]
        return handles

    def _grid_hook(self, embed: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            # Dynamic-size ViTs embed to (B, gh, gw, C), PiT to (B, C, gh, gw); flat token outputs keep the grid of
            # the construction size.
            if isinstance(output, Tensor) and output.dim() == 4:
                channels_last = "NHWC" in str(getattr(module, "output_fmt", ""))
                grid = output.shape[1:3] if channels_last else output.shape[2:4]
                self._grids[embed] = (int(grid[0]), int(grid[1]))

        return hook

    @override
    def begin(self, inputs: Tensor | None) -> None:
        self._grids = {}

    def uniform_distance(self, site: AttentionSite) -> float:
        """The uniform-attention distance on the grid the site was measured on (its construction grid before)."""
        grid = self.measured_grids.get(site.name, site.grid)
        return float(patch_distances(grid, site.stride).mean())

    def grid(self, site: AttentionSite) -> tuple[int, int]:
        """The patch grid of the forward pass that is running."""
        return self._grids.get(site.embed, site.grid)

    def distances(self, site: AttentionSite, grid: tuple[int, int], device: torch.device) -> Tensor:
        """``(P, P)`` pixel distances between the patches of ``grid`` (cached)."""
        key = (grid, site.stride, device)
        if key not in self._distances:
            self._distances[key] = patch_distances(grid, site.stride, device=device)
        return self._distances[key]


class _QKCapture:
    """The hooks of one attention module: the call's mask, then ``q``, then ``k``, which triggers the probabilities."""

    def __init__(self, tap: AttentionTap, layer: int, site: AttentionSite, scale: float) -> None:
        self.tap, self.layer, self.site, self.scale = tap, layer, site, scale
        self._q: Tensor | None = None
        self._bias: Tensor | None = None

    def on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
        num_tokens = x.shape[1]
        if causal:
            self._bias = torch.full((num_tokens, num_tokens), float("-inf"), device=x.device).triu_(1)
        elif mask is not None and mask.dtype == torch.bool:
            self._bias = torch.zeros(mask.shape, device=x.device).masked_fill_(~mask, float("-inf"))
        else:
            self._bias = None if mask is None else mask.float()
        self._q = None

    def on_q(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._q = output

    def on_k(self, module: nn.Module, args: tuple, k: Tensor) -> None:
        q, self._q = self._q, None
        if q is None:
            raise RuntimeError(
                f"attention module '{self.site.name}' called k_norm without q_norm first; its forward is not the one "
                "of timm.layers.Attention. Leave the attention analysis out."
            )
        batch, _heads, tokens, head_dim = q.shape  # (B, H, T, d)
        grid = self.tap.grid(self.site)
        if tokens != self.site.num_prefix_tokens + grid[0] * grid[1]:
            self.tap.skipped[self.site.name] = (
                f"its {tokens} tokens are not {self.site.num_prefix_tokens} prefix tokens + a {grid[0]}x{grid[1]} "
                "patch grid (a pooled stage, as in PiT, has a grid of its own)"
            )
            return
        distances = self.tap.distances(self.site, grid, q.device)
        self.tap.measured_grids[self.site.name] = grid
        # Keep each chunk of (b, H, T, T) probabilities about as large as the module's (B, T, H·d) input.
        chunk = max(1, batch * head_dim // tokens)
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, batch, chunk):
                # One product per head on the strided q and k (no copies), the scale inside it (attention_logits).
                logits = attention_logits(q[start : start + chunk], k[start : start + chunk], self.scale)
                if self._bias is not None:  # may hold -inf: the entropy then comes from the probabilities alone
                    self.tap.consume(self.layer, attention_softmax(logits + self._bias), distances)
                else:
                    self.tap.consume_logits(self.layer, attention_softmax(logits), distances, logits)  # (b, H, T, T)


ATTENTION_SUMS = ("distance", "entropy", "count")  # what AttentionStatsTap sums per (layer, head)


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
        self._sums = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k in ATTENTION_SUMS}

    @override
    def consume(self, layer: int, probs: Tensor, distances: Tensor) -> None:
        self._add(layer, probs, distances, None)

    @override
    def consume_logits(self, layer: int, probs: Tensor, distances: Tensor, logits: Tensor) -> None:
        self._add(layer, probs, distances, logits)

    def _add(self, layer: int, probs: Tensor, distances: Tensor, logits: Tensor | None) -> None:
        site = self.sites[layer]
        heads = probs.shape[1]
        # Mean distance and entropy (nats, each query's attention over all keys) per head, summed over images.
        distance, entropy = attention_sums(probs, distances, site.num_prefix_tokens, self.renormalize, logits)
        self._sums["distance"][layer, :heads] += distance
        self._sums["entropy"][layer, :heads] += entropy
        self._sums["count"][layer, :heads] += probs.shape[0]

    @override
    def collect(self) -> dict[str, Tensor]:
        return self._sums


_SUMS = ("distance", "entropy", "count")

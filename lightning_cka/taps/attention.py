"""Attention probabilities of timm attention modules during a probe, fused kernels or not.

With ``fused_attn`` on, ``F.scaled_dot_product_attention`` runs and no attention matrix ever exists. Instead of
re-running ``qkv`` (a quarter of a ViT's FLOPs), the taps read ``q`` and ``k`` where the module already has them: the
outputs of its ``q_norm`` and ``k_norm`` submodules (``nn.Identity`` without QK-norm), which timm's ``Attention``
calls in that order right before the attention product. The probabilities ``softmax(q·scale @ kᵀ + mask)`` are then
formed in float32, a few images at a time, and handed to a :class:`MeanAttentionDistance` metric; the module's own
forward, fused kernel included, is untouched.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Attention
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_cka.metrics.attention_distance import MeanAttentionDistance


def is_supported_attention(module: nn.Module) -> bool:
    """Timm's ``Attention`` (ViT, DeiT, ...) or a subclass that keeps its forward."""
    return isinstance(module, Attention) and type(module).forward is Attention.forward


@dataclass(frozen=True)
class PatchGeometry:
    """Where the patch tokens of a ViT-style model sit in the image."""

    grid_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int


def patch_geometry(model: nn.Module) -> PatchGeometry | None:
    """Geometry from timm's ``patch_embed.grid_size``, ``patch_embed.patch_size`` and ``num_prefix_tokens``."""
    embed = getattr(model, "patch_embed", None)
    grid, patch = getattr(embed, "grid_size", None), getattr(embed, "patch_size", None)
    if grid is None or patch is None:
        return None
    return PatchGeometry(tuple(grid), tuple(patch), int(getattr(model, "num_prefix_tokens", 1)))


class AttentionTap:
    """Hooks on one timm ``Attention`` module that feed its attention maps to a metric."""

    def __init__(self, name: str, module: nn.Module, layer: int, sink: MeanAttentionDistance) -> None:
        self.name = name
        self.module = module
        self.layer = layer
        self.sink = sink
        self._q: Tensor | None = None
        self._bias: Tensor | None = None

    def register(self) -> list[RemovableHandle]:
        """Install the hooks; the caller removes them through the returned handles."""
        return [
            self.module.register_forward_pre_hook(self._on_call, with_kwargs=True),
            self.module.q_norm.register_forward_hook(self._keep(lambda q: setattr(self, "_q", q))),
            self.module.k_norm.register_forward_hook(self._keep(self._on_k)),
        ]

    @staticmethod
    def _keep(fn: Callable[[Tensor], None]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            fn(output)

        return hook

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
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

    def _on_k(self, k: Tensor) -> None:
        q, self._q = self._q, None
        if q is None:
            raise RuntimeError(
                f"attention module '{self.name}' called k_norm without q_norm first; its forward is not the one of "
                "timm.layers.Attention. Pass attention=False."
            )
        batch, _heads, tokens, head_dim = q.shape  # (B, H, T, d)
        # Keep each chunk of (b, H, T, T) probabilities about as large as the module's (B, T, H·d) input.
        chunk = max(1, batch * head_dim // tokens)
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, batch, chunk):
                scores = (q[start : start + chunk].float() * self.module.scale) @ k[start : start + chunk].float().mT
                if self._bias is not None:
                    scores = scores + self._bias
                self.sink.update(scores.softmax(dim=-1), layer=self.layer)  # (b, H, T, T)

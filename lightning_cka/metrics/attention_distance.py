"""Mean attention distance per (layer, head), accumulated over minibatches as a torchmetrics ``Metric``."""

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_cka.functional.attention import _attention_distance_update, patch_distances


class MeanAttentionDistance(Metric):
    """Mean attention distance in pixels of every head of every attention layer, averaged over images.

    See :func:`lightning_cka.functional.mean_attention_distance` for the definition and the prefix-token convention.
    States are sums over images (``dist_reduce_fx="sum"``), so under DDP the result covers all ranks' images.

    Args:
        num_layers: number of attention layers.
        num_heads: heads per layer (the largest, if layers differ; missing heads come out as NaN).
        grid_size: patch grid ``(gh, gw)``.
        patch_size: patch size in pixels.
        num_prefix_tokens: leading non-patch tokens (CLS, distillation, registers).
        renormalize: renormalize each query's attention over patch keys.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_cka import MeanAttentionDistance
        >>> metric = MeanAttentionDistance(num_layers=2, num_heads=1, grid_size=2, patch_size=16, num_prefix_tokens=0)
        >>> metric.update(torch.eye(4).expand(3, 1, 4, 4), layer=0)  # every patch attends to itself
        >>> metric.update(torch.full((3, 1, 4, 4), 0.25), layer=1)  # uniform attention
        >>> metric.compute()
        tensor([[ 0.0000],
                [13.6569]], dtype=torch.float64)

    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    distance_sum: Tensor
    num_images: Tensor

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        grid_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_prefix_tokens: int = 1,
        renormalize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_layers < 1 or num_heads < 1:
            raise ValueError(f"num_layers and num_heads must be positive, got {num_layers} and {num_heads}.")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}.")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.renormalize = renormalize
        self.register_buffer("distances", patch_distances(grid_size, patch_size), persistent=False)
        zeros = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.add_state("distance_sum", default=zeros, dist_reduce_fx="sum")
        self.add_state("num_images", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, attn: Tensor, layer: int = 0) -> None:
        """Add the attention maps of one layer on a minibatch.

        Args:
            attn: ``(B, H, T, T)`` softmax attention probabilities.
            layer: index of the attention layer they belong to.

        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be in [0, {self.num_layers}), got {layer}.")
        heads = attn.shape[1] if attn.dim() == 4 else -1
        if not 0 < heads <= self.num_heads:
            raise ValueError(f"attn must be (B, H, T, T) with H <= {self.num_heads} heads, got {tuple(attn.shape)}.")
        sums = _attention_distance_update(attn, self.distances, self.num_prefix_tokens, self.renormalize)
        self.distance_sum[layer, :heads] += sums
        self.num_images[layer, :heads] += attn.shape[0]

    def compute(self) -> Tensor:
        """``(num_layers, num_heads)`` mean distance in pixels; NaN where a head received no images."""
        return self.distance_sum / self.num_images

    @property
    def uniform_distance(self) -> float:
        """The distance in pixels of a head attending equally to every patch: the scale of "local" and "global"."""
        return float(self.distances.mean())

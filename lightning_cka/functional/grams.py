"""Batched centered Grams of parts of one output: every attention head, every grid position.

Each is centered as :func:`lightning_cka.functional.hsic.gram` centers (relative to the first example, then the
mean) and computed in float32 (float64 for float64 input) with one batched product, so a hook can reduce a whole
output to many ``(n, n)`` Grams without a copy per part.
"""

import torch
from torch import Tensor

from lightning_cka.functional.hsic import add_upper_gram_, mirror_upper_


def head_grams(heads: Tensor) -> Tensor:
    """``(H, B, B)`` centered Grams of every head of ``(B, [T,] H, d)`` features.

    One copy of the features per call: 3x cheaper than a Gram per head slice, whose strided features would each be
    copied and centered on their own.

    Example:
        >>> x = torch.randn(6, 5, 2, 3)  # (B, T, H, d)
        >>> grams = head_grams(x)
        >>> grams.shape
        torch.Size([2, 6, 6])
        >>> h = x[:, :, 1].reshape(6, -1)
        >>> h = h - h.mean(dim=0)
        >>> torch.allclose(grams[1], h @ h.T, atol=1e-5)
        True
    """
    dtype = torch.float64 if heads.dtype == torch.float64 else torch.float32
    with torch.autocast(heads.device.type, enabled=False):
        x = heads.to(dtype) - heads[:1].to(dtype)
        x = x - x.mean(dim=0)
        per_head = x.movedim(-2, 0).reshape(x.shape[-2], x.shape[0], -1)  # (H, B, [T·]d)
        out = per_head.new_zeros((per_head.shape[0], per_head.shape[1], per_head.shape[1]))
        return mirror_upper_(add_upper_gram_(out, per_head))  # the upper triangle only: fewer flops


def position_grams(maps: Tensor) -> Tensor:
    """``(P, n, n)`` centered Grams of ``(n, C, H, W)`` maps, one per position (``P = H·W``, row-major).

    Example:
        >>> maps = torch.randn(5, 3, 2, 2)
        >>> grams = position_grams(maps)
        >>> grams.shape
        torch.Size([4, 5, 5])
        >>> x = maps[:, :, 0, 1] - maps[:, :, 0, 1].mean(dim=0)
        >>> torch.allclose(grams[1], x @ x.T, atol=1e-5)
        True
    """
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    with torch.autocast(maps.device.type, enabled=False):
        x = maps.flatten(2).permute(2, 0, 1).to(dtype)  # (P, n, C)
        x = x - x[:, :1]
        x = x - x.mean(dim=1, keepdim=True)
        return torch.bmm(x, x.transpose(1, 2))

"""Mean attention distance per head (Raghu et al. 2021, Figure 3)."""

import torch
from torch import Tensor


def patch_distances(
    grid_size: int | tuple[int, int],
    patch_size: float | tuple[float, float],
    device: torch.device | str | None = None,
) -> Tensor:
    """Euclidean pixel distance between the centres of every pair of patches.

    Args:
        grid_size: patches per column and row ``(gh, gw)`` (an int for a square grid).
        patch_size: distance in pixels between neighbouring patch centres ``(ph, pw)`` (one number for square
            patches): the patch size of a plain ViT, the backbone stride times the patch size of a hybrid ViT.
        device: device of the result.

    Returns:
        ``(gh·gw, gh·gw)`` float32 matrix, patches in row-major order (the order of ViT tokens).

    Example:
        >>> from lightning_cka.functional import patch_distances
        >>> patch_distances(2, 16)
        tensor([[ 0.0000, 16.0000, 16.0000, 22.6274],
                [16.0000,  0.0000, 22.6274, 16.0000],
                [16.0000, 22.6274,  0.0000, 16.0000],
                [22.6274, 16.0000, 16.0000,  0.0000]])

    """
    (gh, gw), (ph, pw) = _pair(grid_size, "grid_size"), _pair(patch_size, "patch_size", integer=False)
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    # Centres are offset by half a patch on both axes, which cancels in the differences.
    centres = torch.stack([rows.flatten() * ph, cols.flatten() * pw], dim=1).to(torch.float64)  # (P, 2)
    return torch.cdist(centres, centres).to(torch.float32)


def mean_attention_distance(
    attn: Tensor,
    grid_size: int | tuple[int, int],
    patch_size: float | tuple[float, float],
    num_prefix_tokens: int = 1,
    renormalize: bool = False,
) -> Tensor:
    """Mean attention distance of each head in pixels.

    For each query patch token, the attention weights on the key patch tokens times the distance between the patch
    centres are summed; this is averaged over query tokens and then over images. Prefix tokens (CLS, distillation,
    registers) are dropped as queries and as keys. By default the remaining weights are not renormalized (the weight a
    query puts on prefix tokens counts as distance 0, the convention of the common reimplementation of the paper);
    ``renormalize=True`` divides each query's weights by their sum over patch keys instead.

    Args:
        attn: ``(B, H, T, T)`` softmax attention probabilities, ``T = num_prefix_tokens + gh·gw``.
        grid_size: patch grid ``(gh, gw)`` (timm: ``model.patch_embed.grid_size``).
        patch_size: distance in pixels between neighbouring patch centres (timm:
            ``model.patch_embed.feat_ratio(as_scalar=False)``, which is the patch size of a plain ViT and the backbone
            stride times the patch size of a hybrid ViT; ``patch_embed.patch_size`` of a hybrid counts feature-map
            pixels).
        num_prefix_tokens: leading non-patch tokens (timm: ``model.num_prefix_tokens``).
        renormalize: renormalize each query's attention over patch keys.

    Returns:
        ``(H,)`` float64 mean distance per head.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import mean_attention_distance
        >>> uniform = torch.full((1, 1, 5, 5), 1 / 5)  # CLS + 2x2 patches, every query attends to all tokens
        >>> mean_attention_distance(uniform, grid_size=2, patch_size=16, renormalize=True)
        tensor([13.6569], dtype=torch.float64)

    """
    distances = patch_distances(grid_size, patch_size, device=attn.device)
    return _attention_distance_update(attn, distances, num_prefix_tokens, renormalize) / attn.shape[0]


def _attention_distance_update(
    attn: Tensor,
    distances: Tensor,
    num_prefix_tokens: int,
    renormalize: bool,
) -> Tensor:
    """Sum over images of each head's mean attention distance: ``(B, H, T, T)`` to ``(H,)`` float64."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, heads, tokens, tokens) attention probabilities, got {tuple(attn.shape)}.")
    num_patches = distances.shape[0]
    if attn.shape[-1] != num_prefix_tokens + num_patches:
        raise ValueError(
            f"attn has {attn.shape[-1]} tokens, but {num_prefix_tokens} prefix tokens + {num_patches} patches were "
            "expected: check grid_size and num_prefix_tokens (the probe images must have the model's input size)."
        )
    weights = attn[..., num_prefix_tokens:, num_prefix_tokens:].float()  # (B, H, P, P)
    per_query = (weights * distances).sum(dim=-1)  # (B, H, P)
    if renormalize:
        per_query = per_query / weights.sum(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return per_query.mean(dim=-1).sum(dim=0, dtype=torch.float64)  # (H,)


def _pair(value: float | tuple[float, float], name: str, integer: bool = True) -> tuple:
    pair = (value, value) if isinstance(value, int | float) else tuple(value)
    if len(pair) != 2 or any(v <= 0 for v in pair) or (integer and any(int(v) != v for v in pair)):
        kind = "int" if integer else "number"
        raise ValueError(f"{name} must be a positive {kind} or a pair of them, got {value!r}.")
    return (int(pair[0]), int(pair[1])) if integer else (float(pair[0]), float(pair[1]))

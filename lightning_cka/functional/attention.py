"""Mean attention distance and attention entropy per head (Raghu et al. 2021, Figure 3), from queries and keys."""

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


def attention_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``scale · q kᵀ`` of every head and image in float32: the logits whose softmax is the attention.

    One batched product per head: the ``q`` and ``k`` of timm's and Hugging Face's attention are strided views of one
    projection's output, and each head's ``(B, T, d)`` slice of them is already a matrix the BLAS reads as it is,
    where a 4-D matmul would copy both first. The scale is applied inside the product.

    Args:
        q: ``(B, H, T, d)`` queries.
        k: ``(B, H, S, d)`` keys.
        scale: the factor of the dot products (``d ** -0.5`` in most models).

    Returns:
        ``(B, H, T, S)`` float32, a transposed view of a head-major ``(H, B, T, S)`` tensor.

    Example:
        >>> q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4)
        >>> torch.allclose(attention_logits(q, k, 0.5), 0.5 * q @ k.mT, atol=1e-6)
        True
    """
    batch, heads, tokens, _ = q.shape
    out = torch.empty(heads, batch, tokens, k.shape[2], dtype=torch.float32, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for h in range(heads):
            torch.baddbmm(out[h], q[:, h].float(), k[:, h].float().mT, beta=0, alpha=scale, out=out[h])
    return out.transpose(0, 1)


def attention_softmax(logits: Tensor) -> Tensor:
    """``logits.softmax(dim=-1)`` in the logits' own memory layout (softmax would first transpose a head-major one).

    Example:
        >>> logits = torch.randn(4, 2, 3, 3).transpose(0, 1)
        >>> torch.equal(attention_softmax(logits), logits.softmax(dim=-1))
        True
    """
    if logits.dim() >= 3 and not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous():
        return logits.transpose(0, 1).softmax(dim=-1).transpose(0, 1)
    return logits.softmax(dim=-1)


def attention_sums(
    probs: Tensor,
    distances: Tensor,
    num_prefix_tokens: int = 1,
    renormalize: bool = False,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sums over images of each head's mean attention distance (pixels) and mean attention entropy (nats).

    The distance is :func:`mean_attention_distance`'s; the entropy is that of each query's attention over all keys,
    averaged over all queries. With ``logits`` the entropy is ``log Σ exp s - Σ p s`` per query, with the log-sum-exp
    as ``max s - log max p`` (the largest probability is at least ``1 / T``, so its log is as exact as the
    probability): one fused multiply-add over the ``T²`` values instead of a logarithm of each probability.

    Args:
        probs: ``(B, H, T, T)`` softmax attention probabilities (any layout whose last dim is contiguous).
        distances: ``(P, P)`` pixel distances between the patches (:func:`patch_distances`).
        num_prefix_tokens: leading non-patch tokens.
        renormalize: renormalize each query's attention over patch keys (see :func:`mean_attention_distance`).
        logits: the ``(B, H, T, T)`` finite logits ``probs`` is the softmax of, or ``None`` (a mask with ``-inf``
            entries: the entropy is then summed from the probabilities).

    Returns:
        ``(distance, entropy)``, each ``(H,)`` float64.

    Example:
        >>> import math
        >>> uniform = torch.full((2, 1, 5, 5), 1 / 5)  # CLS + 2x2 patches, every query attends to all tokens
        >>> distance, entropy = attention_sums(uniform, patch_distances(2, 16))
        >>> round(distance.item() / 2, 4), round(entropy.item() / 2, 4) == round(math.log(5), 4)
        (10.9255, True)
    """
    return (
        _attention_distance_update(probs, distances, num_prefix_tokens, renormalize),
        _attention_entropy_update(probs, logits),
    )


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
    tokens = attn.shape[-1]
    if tokens != num_prefix_tokens + num_patches:
        raise ValueError(
            f"attn has {tokens} tokens, but {num_prefix_tokens} prefix tokens + {num_patches} patches were "
            "expected: check grid_size and num_prefix_tokens (the probe images must have the model's input size)."
        )
    if renormalize:
        weights = attn[..., num_prefix_tokens:, num_prefix_tokens:].float()  # (B, H, P, P)
        per_query = torch.linalg.vecdot(weights, distances.to(weights.dtype))  # (B, H, P), no (B, H, P, P) product
        per_query = per_query / weights.sum(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        return per_query.mean(dim=-1).sum(dim=0, dtype=torch.float64)  # (H,)
    # Without renormalization the mean over patch queries of Σ_k p·D is one dot product of all T² values of a head
    # with the distances padded by zeros for prefix queries and keys: a single fused pass.
    padded = distances.new_zeros((tokens, tokens), dtype=torch.float32)
    padded[num_prefix_tokens:, num_prefix_tokens:] = distances
    total = torch.linalg.vecdot(attn.float().flatten(-2), padded.flatten())  # (B, H)
    return total.sum(dim=0, dtype=torch.float64) / num_patches


def _attention_entropy_update(probs: Tensor, logits: Tensor | None) -> Tensor:
    """Sum over images of each head's mean attention entropy (nats): ``(B, H, T, T)`` to ``(H,)`` float64."""
    probs = probs.float()
    if logits is None:
        entropy = torch.special.entr(probs).sum(dim=-1)  # (B, H, T): -p log p
    else:
        logits = logits.float()
        log_normalizer = logits.amax(dim=-1) - probs.amax(dim=-1).log()
        entropy = log_normalizer - torch.linalg.vecdot(probs, logits)
    return entropy.mean(dim=-1).sum(dim=0, dtype=torch.float64)


def _pair(value: float | tuple[float, float], name: str, integer: bool = True) -> tuple:
    pair = (value, value) if isinstance(value, int | float) else tuple(value)
    if len(pair) != 2 or any(v <= 0 for v in pair) or (integer and any(int(v) != v for v in pair)):
        kind = "int" if integer else "number"
        raise ValueError(f"{name} must be a positive {kind} or a pair of them, got {value!r}.")
    return (int(pair[0]), int(pair[1])) if integer else (float(pair[0]), float(pair[1]))

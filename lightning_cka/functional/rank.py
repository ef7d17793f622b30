"""Effective rank (RankMe, Garrido et al. 2022) of the features behind centered Gram matrices."""

from collections.abc import Sequence

import torch
from torch import Tensor

# Grams decomposed at once: bounds the float64 copy (a few (n, n) matrices) whatever the number of layers.
_EIGEN_CHUNK_BYTES = 64 * 2**20


def effective_rank(grams: Sequence[Tensor] | Tensor) -> Tensor:
    """RankMe effective rank of the features behind each centered Gram.

    Singular values (as RankMe uses them, not the Gram's eigenvalues) are ``σₖ = sqrt(max(λₖ, 0))`` of the Gram's
    eigenvalues ``λₖ``; eigenvalues below ``n · eps · λ_max`` (``eps`` of the Gram's dtype, the tolerance of
    ``torch.linalg.matrix_rank``) are rounding noise of the Gram and count as zero, so features of rank ``r`` give at
    most ``r``. Since the features are centered, the value is at most ``n - 1`` (and at most the number of features).
    A Gram squares the singular values, so directions weaker than ``sqrt(n · eps)`` times the strongest (about 1e-3
    for float32 Grams, 1e-7 for float64) are below its resolution and left out; they would add almost nothing.

    Args:
        grams: ``L`` centered ``(n, n)`` Gram matrices (a sequence or an ``(L, n, n)`` tensor).

    Returns:
        ``(L,)`` float64: ``exp(-Σ pₖ log pₖ)``, ``pₖ = σₖ / Σ σ``; NaN for a Gram that is zero (constant features) or
        not finite.

    Example:
        >>> import torch
        >>> x = torch.randn(16, 3, dtype=torch.float64) @ torch.randn(3, 40, dtype=torch.float64)  # rank 3
        >>> x = x - x.mean(dim=0)
        >>> bool(effective_rank([x @ x.T]) <= 3.0 + 1e-9)
        True
    """
    grams = list(grams)
    if not grams:
        return torch.zeros(0, dtype=torch.float64)
    n = grams[0].shape[0]
    eps = torch.finfo(grams[0].dtype).eps if grams[0].is_floating_point() else torch.finfo(torch.float32).eps
    step = max(1, _EIGEN_CHUNK_BYTES // (n * n * 8))
    out = []
    for start in range(0, len(grams), step):
        block = torch.stack([g.to(torch.float64) for g in grams[start : start + step]])  # (l, n, n)
        finite = torch.isfinite(block).flatten(1).all(dim=1)
        block = torch.where(finite[:, None, None], block, torch.zeros((), dtype=block.dtype, device=block.device))
        eigenvalues = torch.linalg.eigvalsh(block)  # (l, n), ascending
        top = eigenvalues[:, -1:].clamp_min(0)
        eigenvalues = torch.where(eigenvalues > n * eps * top, eigenvalues, torch.zeros_like(eigenvalues))
        singular = eigenvalues.sqrt()
        total = singular.sum(dim=1, keepdim=True)
        p = singular / total.clamp_min(torch.finfo(torch.float64).tiny)
        rank = torch.exp(-torch.special.xlogy(p, p).sum(dim=1))
        out.append(torch.where(finite & (total[:, 0] > 0), rank, torch.full_like(rank, float("nan"))))
    return torch.cat(out)

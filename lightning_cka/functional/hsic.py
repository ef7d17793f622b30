"""Linear Gram matrices and the HSIC estimators CKA is built from.

Precision: Gram products accumulate in float32 (float64 for float64 input); everything after the Gram (centering, the
HSIC inner products, their sums) runs in float64.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

# Scratch memory one step of a blocked loop may allocate. Gram chunks bound the upcast copy of a layer's activations;
# HSIC row blocks bound the float64 centered copy of the Grams. Both are one block at typical probe sizes.
_GRAM_CHUNK_BYTES = 64 * 2**20
_HSIC_BLOCK_BYTES = 256 * 2**20


def gram(x: Tensor, *, center: bool = False) -> Tensor:
    """Linear Gram matrix ``X Xᵀ`` of ``n`` examples.

    Args:
        x: ``(n, ...)``: every trailing dim is flattened into features (``(n, C, H, W)`` conv maps, ``(n, T, D)``
            tokens, ``(n, D)`` vectors).
        center: subtract the mean example first (``HKH`` instead of ``K``). Neither HSIC estimator, so neither CKA,
            changes when one vector is added to every example, but centering removes the common offset whose rounding
            would otherwise leak into float32 results (10-100x smaller CKA error on real activations). The mean is
            taken relative to the first example, so a constant layer's Gram is exactly zero and its CKA is NaN instead
            of rounding noise.

    Returns:
        ``(n, n)`` Gram matrix, float32 (float64 when ``x`` is float64). float16 and bfloat16 inputs are upcast chunk by
        chunk, so the scratch memory stays far below the size of ``x``.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import gram
        >>> gram(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]))
        tensor([[1., 1., 0.],
                [1., 2., 2.],
                [0., 2., 4.]])

    """
    if x.dim() < 2:
        raise ValueError(f"gram expects x of shape (n, ...) with at least one feature dim, got {tuple(x.shape)}.")
    x = _flatten_features(x)  # (n, F)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, num_features = x.shape
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype == dtype and not center:
            return x @ x.T
        out = x.new_zeros((n, n), dtype=dtype)
        step = max(1, _GRAM_CHUNK_BYTES // (n * out.element_size()))
        for start in range(0, num_features, step):
            chunk = x[:, start : start + step].to(dtype)  # (n, f)
            if center:
                chunk = chunk - chunk[:1]
                chunk -= chunk.mean(dim=0)
            out.addmm_(chunk, chunk.T)
    return out


def _flatten_features(x: Tensor) -> Tensor:
    """``(n, ...)`` to ``(n, F)`` without a copy when possible.

    A Gram matrix does not depend on the order of the features, so a channels-last (or otherwise permuted) activation is
    flattened in memory order instead of being copied into the logical order.
    """
    n = x.shape[0]
    if x.is_contiguous():
        return x.reshape(n, -1)
    trailing = sorted(range(1, x.dim()), key=lambda d: x.stride(d), reverse=True)
    permuted = x.permute(0, *trailing)
    return permuted.reshape(n, -1)


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Biased HSIC estimator ``tr(K H L H) / (n - 1)²`` (Gretton et al. 2005).

    Args:
        k: ``(n, n)`` Gram matrix of the first representation.
        l: ``(n, n)`` Gram matrix of the second representation.

    Returns:
        0-dim float64 tensor.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import gram, hsic_biased
        >>> x = torch.arange(12.0).reshape(4, 3)
        >>> round(hsic_biased(gram(x), gram(x)).item(), 4)
        2025.0

    """
    _check_gram_pair(k, l, min_n=2)
    return _pairwise_hsic([k, l], unbiased=False)[0, 1]


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Unbiased HSIC estimator of Song et al. 2012.

    With ``K̃``, ``L̃`` the Grams with zeroed diagonals, ``HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n-1)(n-2))
    - 2/(n-2)·1ᵀK̃L̃1] / (n(n-3))``. It is computed as the inner product of the U-centered Grams divided by
    ``n(n-3)`` (Székely & Rizzo 2014), which is the same number.

    Args:
        k: ``(n, n)`` Gram matrix of the first representation.
        l: ``(n, n)`` Gram matrix of the second representation.

    Returns:
        0-dim float64 tensor; may be slightly negative for unrelated representations.

    Raises:
        ValueError: if ``n < 4`` (the estimator divides by ``n - 3``).

    Example:
        >>> import torch
        >>> from lightning_cka.functional import gram, hsic_unbiased
        >>> x = torch.arange(12.0).reshape(4, 3) ** 2
        >>> round(hsic_unbiased(gram(x), gram(x)).item(), 4)
        21608869.5

    """
    _check_gram_pair(k, l, min_n=4)
    return _pairwise_hsic([k, l], unbiased=True)[0, 1]


def _check_gram_pair(k: Tensor, l: Tensor, min_n: int) -> None:  # noqa: E741
    for name, g in (("k", k), ("l", l)):
        if g.dim() != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"{name} must be an (n, n) Gram matrix, got shape {tuple(g.shape)}.")
    if k.shape != l.shape:
        raise ValueError(f"k and l must come from the same n examples, got {tuple(k.shape)} and {tuple(l.shape)}.")
    _check_num_examples(k.shape[0], min_n)


def _check_num_examples(n: int, min_n: int) -> None:
    if n < min_n:
        raise ValueError(
            f"this HSIC estimator needs at least {min_n} examples per minibatch, got n={n}. "
            "Use a larger batch size (or drop the last, smaller minibatch)."
        )


def _pairwise_hsic(grams: Sequence[Tensor] | Tensor, unbiased: bool = True) -> Tensor:
    """HSIC of every pair of ``L`` Gram matrices of the same ``n`` examples.

    All pairs come from one matrix product of the stacked, flattened centered Grams: U-centered for the unbiased
    estimator (their inner product is ``n(n-3)·HSIC₁``), double-centered ``HKH`` for the biased one. The product runs
    over blocks of rows only when the float64 centered copy would exceed ``_HSIC_BLOCK_BYTES``. Each block is copied
    from the Grams as they are given, so a list of Grams is never stacked into a second copy of all of them.

    Args:
        grams: ``L`` symmetric ``(n, n)`` Gram matrices (a sequence, or an ``(L, n, n)`` tensor), any float dtype.
        unbiased: Song et al. 2012 estimator if ``True``, Gretton et al. 2005 if ``False``.

    Returns:
        ``(L, L)`` float64, symmetric.

    """
    num_layers, n, device = len(grams), grams[0].shape[0], grams[0].device
    rows_per_block = max(1, _HSIC_BLOCK_BYTES // (num_layers * n * 8))
    starts = range(0, n, rows_per_block)
    # One float64 buffer serves every block: fresh block-sized temporaries cost more than the arithmetic.
    buffer = torch.empty(num_layers * min(rows_per_block, n) * n, dtype=torch.float64, device=device)

    def block(start: int) -> Tensor:
        """Rows ``start:start + rows_per_block`` of every Gram as contiguous float64, ``(L, r, n)``."""
        stop = min(start + rows_per_block, n)
        rows = buffer[: num_layers * (stop - start) * n].view(num_layers, stop - start, n)
        for i, g in enumerate(grams):
            rows[i].copy_(g[start:stop])
        return rows

    with torch.autocast(device.type, enabled=False):
        # Row sums (also the column sums: Grams are symmetric), a block at a time, since
        # grams.sum(dtype=torch.float64) would first copy every Gram to float64.
        row_sums = torch.cat([block(start).sum(dim=2) for start in starts], dim=1)  # (L, n)
        if unbiased:
            row_sums -= torch.stack([g.diagonal() for g in grams]).to(torch.float64)
            row_term = row_sums / (n - 2)
            total_term = row_sums.sum(dim=1) / ((n - 1) * (n - 2))  # (L,)
            scale = n * (n - 3)
        else:
            row_term = row_sums / n
            total_term = row_sums.sum(dim=1) / n**2
            scale = (n - 1) ** 2
        out = torch.zeros(num_layers, num_layers, dtype=torch.float64, device=device)
        for start in starts:
            centered = block(start)  # (L, r, n)
            stop = start + centered.shape[1]
            centered -= row_term[:, start:stop, None] - total_term[:, None, None]  # an (L, r, 1) term, in place
            centered -= row_term[:, None, :]
            if unbiased:
                rows = torch.arange(start, stop, device=device)
                centered[:, rows - start, rows] = 0.0
            flat = centered.view(num_layers, -1)  # (L, r·n)
            out.addmm_(flat, flat.T)
    # The product is symmetric up to rounding; mirror the upper triangle so each pair has exactly one value.
    out = out.triu() + out.triu(1).T
    return out / scale

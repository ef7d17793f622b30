"""Effective rank (RankMe, Garrido et al. 2022) of the features behind centered Gram matrices.

Three ways to the singular values, by cost (``effective_rank`` picks one per call):

- exact, ``eigvalsh`` of each Gram (in float32 for float32 Grams from ``n = 512``): ``O(n³)`` per layer, the default
  below ``n = 2048``
  (LAPACK's tridiagonal reduction runs at memory speed, and at ``n ≤ 1024`` it is as fast as an estimator of useful
  accuracy on the CPU);
- exact for low-rank Grams, when each Gram's rank is known to be at most ``r`` with ``r`` well below ``n`` (a layer
  with fewer features than examples): the Gram's range from ``r + 16`` random products, then ``eigvalsh`` of the
  ``(r + 16)``-square projection, ``O(n² r)``;
- estimated, from ``n = 2048`` up: block Lanczos quadrature with deflation, ``O(n²)`` per layer for a fixed budget of
  products (:func:`_lanczos_sums`); its error against ``eigvalsh`` is measured in ``docs/performance.md``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

# Grams decomposed at once: bounds the copy (a few (n, n) matrices) whatever the number of layers.
_EIGEN_CHUNK_BYTES = 64 * 2**20
# From this many examples on, the spectrum is estimated (O(n²)) instead of computed (O(n³)).
LANCZOS_FROM = 2048
# From this many examples on, a float32 Gram's spectrum is computed in float32 (see _working_dtype).
_FLOAT32_FROM = 512
# A known rank bound r makes the exact low-rank path worth it when r + oversampling is at most n / 4.
_OVERSAMPLING = 16
# Lanczos budget: top eigenpairs from a block Krylov space of BLOCK x DEFLATION_DEPTH, deflated; the rest from
# BLOCK Rademacher probes and a block Krylov space of BLOCK x TAIL_DEPTH (448 products of the Gram per layer).
_BLOCK, _DEFLATED, _DEFLATION_DEPTH, _TAIL_DEPTH = 32, 64, 4, 10


def effective_rank(
    grams: Sequence[Tensor] | Tensor,
    max_ranks: Sequence[int] | None = None,
    method: str = "auto",
    seed: int = 0,
) -> Tensor:
    """RankMe effective rank of the features behind each centered Gram.

    Singular values (as RankMe uses them, not the Gram's eigenvalues) are ``σₖ = sqrt(max(λₖ, 0))`` of the Gram's
    eigenvalues ``λₖ``; eigenvalues below ``n · eps · λ_max`` (``eps`` of the Gram's dtype, the tolerance of
    ``torch.linalg.matrix_rank``) are rounding noise of the Gram and count as zero, so features of rank ``r`` give at
    most ``r``. Since the features are centered, the value is at most ``n - 1`` (and at most the number of features).
    A Gram squares the singular values, so directions weaker than ``sqrt(n · eps)`` times the strongest (about 1e-3
    for float32 Grams, 1e-7 for float64) are below its resolution and left out.

    Args:
        grams: ``L`` centered ``(n, n)`` Gram matrices (a sequence or an ``(L, n, n)`` tensor).
        max_ranks: an upper bound on each Gram's rank (e.g. its layer's number of features), or ``None``; a bound
            well below ``n`` gives the exact spectrum from a low-rank projection.
        method: ``"auto"`` (exact below :data:`LANCZOS_FROM` examples, estimated from there), ``"exact"`` or
            ``"lanczos"``.
        seed: seed of the estimator's random vectors.

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
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"method must be 'auto', 'exact' or 'lanczos', got {method!r}.")
    n = grams[0].shape[0]
    lanczos = method == "lanczos" or (method == "auto" and n >= LANCZOS_FROM)
    out = []
    for index, gram in enumerate(grams):
        bound = None if max_ranks is None else int(max_ranks[index])
        low_rank = bound is not None and not lanczos and bound > 0 and bound + _OVERSAMPLING <= n // 4
        out.append((bound if low_rank else None, lanczos, gram.dtype))
    ranks = torch.empty(len(grams), dtype=torch.float64)
    # Grams that take the same path go together, a chunk of at most _EIGEN_CHUNK_BYTES at a time.
    for key in set(out):
        members = [i for i, item in enumerate(out) if item == key]
        dtype = _working_dtype(grams[members[0]])
        # The cut is at the resolution of the Gram as it was given, whatever precision its spectrum is computed in.
        eps = torch.finfo(key[2] if key[2].is_floating_point else torch.float32).eps
        step = max(1, _EIGEN_CHUNK_BYTES // (n * n * torch.finfo(dtype).bits // 8))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            block = torch.stack([grams[i].to(dtype) for i in chunk])  # (l, n, n)
            finite = torch.isfinite(block).flatten(1).all(dim=1)
            block = torch.where(finite[:, None, None], block, torch.zeros((), dtype=dtype, device=block.device))
            if key[1]:
                sums = _lanczos_sums(block, eps, seed + start)
            else:
                sums = _spectrum_sums(_eigenvalues(block, key[0]), eps)
            ranks[chunk] = _rank(*sums, finite).cpu()
    return ranks.to(grams[0].device)


def _working_dtype(gram: Tensor) -> torch.dtype:
    """The precision the spectrum is computed in: float64 below ``_FLOAT32_FROM`` examples, else the Gram's own.

    From 512 examples on, eigvalsh of a float32 Gram in float32 is twice as fast as in float64 and gives the same ranks
    (measured: equal to 6 digits on ViT and ResNet Grams at n = 512 to 2048, see ``benchmarks/bench_rank.py``):
    float32's eigenvalue errors, about ``eps · λ_max``, are ``n`` times below the cut of ``n · eps · λ_max``. With
    few examples they come close to the cut (1e-4 relative at n = 48), and float64 costs little there.
    """
    if gram.dtype == torch.float64 or gram.shape[0] < _FLOAT32_FROM:
        return torch.float64
    return torch.float32


def _eigenvalues(block: Tensor, bound: int | None) -> Tensor:
    """``(l, m)`` eigenvalues of each Gram: all of them, or, with a rank bound, those of its range's projection."""
    if bound is None:
        return torch.linalg.eigvalsh(block)
    # Range finder: the products with bound + 16 Gaussian vectors span the range of a Gram of rank <= bound, so the
    # projection onto them has its non-zero eigenvalues, exactly up to rounding.
    generator = torch.Generator(device=block.device).manual_seed(0)
    sketch = torch.randn(block.shape[-1], bound + _OVERSAMPLING, generator=generator, device=block.device)
    basis = torch.linalg.qr(block @ sketch.to(block.dtype)).Q  # (l, n, m)
    projected = basis.mT @ block @ basis
    return torch.linalg.eigvalsh((projected + projected.mT) / 2)


def _spectrum_sums(eigenvalues: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(Σ σ, Σ σ log σ)`` over the eigenvalues above the cut, in float64."""
    n = eigenvalues.shape[-1]
    eigenvalues = eigenvalues.to(torch.float64)
    top = eigenvalues.amax(dim=-1, keepdim=True).clamp_min(0)
    return _sums(eigenvalues, _cut(eigenvalues, top, n, eps), torch.ones_like(eigenvalues))


def _cut(values: Tensor, top: Tensor, n: int, eps: float) -> Tensor:
    """The eigenvalues that count: above ``n · eps · λ_max`` (see :func:`effective_rank`)."""
    return values > n * eps * top


def _sums(values: Tensor, keep: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    singular = torch.where(keep, values, torch.zeros_like(values)).sqrt()
    log = torch.where(keep, singular, torch.ones_like(singular)).log()
    return (weights * singular).sum(dim=-1), (weights * singular * log).sum(dim=-1)


def _rank(total: Tensor, weighted_log: Tensor, finite: Tensor) -> Tensor:
    """``exp(-Σ p log p)`` with ``p = σ / Σ σ``, i.e. ``exp(log Σ σ - Σ σ log σ / Σ σ)``; NaN where nothing counts."""
    positive = finite & (total > 0)
    safe = torch.where(positive, total, torch.ones_like(total))
    rank = torch.exp(safe.log() - weighted_log / safe)
    return torch.where(positive, rank, torch.full_like(rank, float("nan")))


def _block_krylov(gram: Tensor, start: Tensor, depth: int, project: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """An orthonormal basis ``V`` of the block Krylov space of ``gram`` (deflated by ``project``) and ``gram @ V``.

    Each new block is orthogonalized against all earlier ones twice (full reorthogonalization), so the basis stays
    orthonormal in float32 and ``Vᵀ (gram V)`` is the Rayleigh quotient with no further product.
    """
    basis, products = [], []
    block = torch.linalg.qr(start).Q
    for step in range(depth):
        basis.append(block)
        product = gram @ block
        if project is not None:
            product -= project @ (project.mT @ product)
        products.append(product)
        if step == depth - 1:
            break
        span = torch.cat(basis, dim=-1)
        fresh = product - span @ (span.mT @ product)
        fresh -= span @ (span.mT @ fresh)
        block = torch.linalg.qr(fresh).Q
    return torch.cat(basis, dim=-1), torch.cat(products, dim=-1)


def _lanczos_sums(block: Tensor, eps: float, seed: int) -> tuple[Tensor, Tensor]:
    """Estimates of ``(Σ σ, Σ σ log σ)`` over the eigenvalues above the cut, for each Gram of ``(l, n, n)``.

    1. Deflation: the top ``_DEFLATED`` eigenpairs from a block Krylov space of ``_BLOCK`` Gaussian vectors, depth
       ``_DEFLATION_DEPTH`` (Rayleigh-Ritz). They carry the largest singular values, whose share a random probe would
       estimate worst, and ``λ_max`` for the cut.
    2. The rest: Hutchinson's estimator ``tr f(K) ≈ (1/b) tr(Wᵀ f(K) W)`` with ``b = _BLOCK`` Rademacher probes ``W``
       projected off the deflated space, ``Wᵀ f(K) W`` by block Gauss quadrature on the block Krylov space of ``W``
       (Ritz values ``θ`` weighted by ``|Wᵀ z|²`` of their Ritz vectors ``z``), with ``f`` each sum's function.
    """
    layers, n, _ = block.shape
    dtype, device = block.dtype, block.device
    generator = torch.Generator(device=device).manual_seed(seed)
    gaussian = torch.randn(layers, n, _BLOCK, generator=generator, device=device, dtype=dtype)
    space, products = _block_krylov(block, gaussian, _DEFLATION_DEPTH)
    quotient = (space.mT @ products).to(torch.float64)
    values, vectors = torch.linalg.eigh((quotient + quotient.mT) / 2)
    top = values[:, -1:].clamp_min(0)
    deflated = min(_DEFLATED, values.shape[-1])
    ritz = space @ vectors[:, :, -deflated:].to(dtype)  # (l, n, k)
    signs = torch.randint(0, 2, (layers, n, _BLOCK), generator=generator, device=device).to(dtype) * 2 - 1
    probes = signs - ritz @ (ritz.mT @ signs)
    tail_space, tail_products = _block_krylov(block, probes, _TAIL_DEPTH, project=ritz)
    tail_quotient = (tail_space.mT @ tail_products).to(torch.float64)
    tail_values, tail_vectors = torch.linalg.eigh((tail_quotient + tail_quotient.mT) / 2)
    weights = ((probes.mT @ tail_space).to(torch.float64) @ tail_vectors).square().sum(dim=1) / _BLOCK
    head = values[:, -deflated:]
    head_sums = _sums(head, _cut(head, top, n, eps), torch.ones_like(head))
    tail_sums = _sums(tail_values, _cut(tail_values, top, n, eps), weights)
    return head_sums[0] + tail_sums[0], head_sums[1] + tail_sums[1]

"""Linear Gram matrices and the HSIC estimators CKA is built from.

Precision: Gram products accumulate in float32 (float64 for float64 input); everything after the Gram (centering, the
HSIC inner products, their sums) runs in float64, except the permutation null's shifted products, which run in the
Grams' own precision (a threshold needs a few digits, not sixteen).
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

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
            add_upper_gram_(out, chunk)
    return mirror_upper_(out)


def _strips(n: int, device: torch.device) -> list[int]:
    """Row boundaries of the strips an upper-triangular Gram is computed in (one strip: the plain product).

    On the CPU, 4 strips from 128 examples on (2 from 64) compute 10/16 (3/4) of the full product's flops and take
    0.7-0.83x its time on a Zen 3 core (X Xᵀ runs at 86 GFLOP/s there, so fewer flops is the only way to go faster);
    GPUs prefer one large product.
    """
    count = 1 if device.type != "cpu" else 4 if n >= 128 else 2 if n >= 64 else 1
    return [n * i // count for i in range(count + 1)]


def add_upper_gram_(out: Tensor, x: Tensor) -> Tensor:
    """Add the upper triangle (with the diagonal, in row strips) of ``x xᵀ`` to ``out``, ``(n, F)`` or ``(b, n, F)``.

    Below the strips' diagonal blocks ``out`` keeps its values: :func:`mirror_upper_` completes the Gram.

    Example:
        >>> x = torch.randn(130, 7)
        >>> g = mirror_upper_(add_upper_gram_(torch.zeros(130, 130), x))
        >>> torch.allclose(g, x @ x.T, atol=1e-5)
        True
    """
    bounds = _strips(x.shape[-2], x.device)
    for start, stop in itertools.pairwise(bounds):  # in place on views of out: no temporary
        target = out[..., start:stop, start:]
        rows, cols = x[..., start:stop, :], x[..., start:, :].mT
        target.addmm_(rows, cols) if x.dim() == 2 else target.baddbmm_(rows, cols)
    return out


def mirror_upper_(out: Tensor) -> Tensor:
    """Make ``out`` symmetric from its upper triangle, in place (exactly symmetric, whatever the strips were)."""
    upper = out.triu()
    return out.copy_(upper + upper.triu(1).mT)


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


@dataclass
class HsicTerms:
    """The HSIC sums one minibatch contributes to every CKA of two lists of layers.

    Attributes:
        cross: ``(La, Lb)`` HSIC of every layer of A with every layer of B (``(L, L)``, symmetric, for A with itself).
        self_a: ``(La,)`` HSIC of each layer of A with itself.
        self_b: ``(Lb,)`` the same for B.
        null: ``(K, La, Lb)`` HSIC of A with B after the examples of B were shuffled by each of ``K`` permutations.
    """

    cross: Tensor
    self_a: Tensor
    self_b: Tensor
    null: Tensor


def _pairwise_hsic(grams: Sequence[Tensor] | Tensor, unbiased: bool = True) -> Tensor:
    """HSIC of every pair of ``L`` Gram matrices of the same ``n`` examples: ``(L, L)`` float64, symmetric."""
    return _hsic_terms(grams, unbiased=unbiased).cross


def _hsic_terms(
    grams_a: Sequence[Tensor] | Tensor,
    grams_b: Sequence[Tensor] | Tensor | None = None,
    permutations: Sequence[Tensor] = (),
    unbiased: bool = True,
) -> HsicTerms:
    """HSIC of every layer of A with every layer of B (or of A with itself) on one minibatch.

    All pairs come from one matrix product of the stacked, flattened centered Grams: U-centered for the unbiased
    estimator (their inner product is ``n(n-3)·HSIC₁``), double-centered ``HKH`` for the biased one. Each permutation
    ``p`` adds one more product, of A with B's centered Grams with rows and columns reordered by ``p`` (centering
    commutes with reordering, so this is the HSIC of A with B on unrelated pairs of images: a permutation null). The
    products run over blocks of rows only when the float64 centered copies would exceed ``_HSIC_BLOCK_BYTES``; each
    block is copied from the Grams as they are given, so a list of Grams is never stacked into a second copy.

    Args:
        grams_a: ``La`` symmetric ``(n, n)`` Gram matrices (a sequence or an ``(La, n, n)`` tensor), any float dtype.
        grams_b: ``Lb`` Grams of the same examples, or ``None`` for A with itself.
        permutations: ``K`` permutations of ``range(n)`` (long tensors on the Grams' device); a
            :class:`ShiftPermutations` gets all its products from one FFT (:func:`_shifted_products`).
        unbiased: Song et al. 2012 estimator if ``True``, Gretton et al. 2005 if ``False``.

    Returns:
        The :class:`HsicTerms`, float64.
    """
    side_a = _CenteredGrams(grams_a, unbiased)
    side_b = side_a if grams_b is None else _CenteredGrams(grams_b, unbiased)
    num_a, num_b, n, device = side_a.num_layers, side_b.num_layers, side_a.n, side_a.device
    if side_b.n != n:
        raise ValueError(f"A and B must hold the same examples, got n={n} and n={side_b.n}.")
    shifted = isinstance(permutations, ShiftPermutations) and len(permutations) > 0
    gathered = bool(permutations) and not shifted  # one gathered copy of B's block per permutation, in turn
    copies = num_a + (num_b if grams_b is not None else 0) + (num_b if gathered else 0)
    rows_per_block = max(1, _HSIC_BLOCK_BYTES // (copies * n * 8))
    cross = torch.zeros(num_a, num_b, dtype=torch.float64, device=device)
    self_a = torch.zeros(num_a, dtype=torch.float64, device=device)
    self_b = torch.zeros(num_b, dtype=torch.float64, device=device)
    null = torch.zeros(len(permutations), num_a, num_b, dtype=torch.float64, device=device)
    with torch.autocast(device.type, enabled=False):
        for start in range(0, n, rows_per_block):
            rows = slice(start, min(start + rows_per_block, n))
            flat_a = side_a.rows(rows).view(num_a, -1)  # (La, r·n)
            flat_b = flat_a if grams_b is None else side_b.rows(rows).view(num_b, -1)
            cross.addmm_(flat_a, flat_b.T)
            if grams_b is not None:
                self_a += _row_dots(flat_a)
                self_b += _row_dots(flat_b)
            for k, perm in enumerate(permutations if gathered else ()):
                null[k].addmm_(flat_a, side_b.permuted_rows(perm, rows).view(num_b, -1).T)
        if shifted:
            null = _shifted_products(side_a, side_b, permutations)
    if grams_b is None:  # symmetric up to rounding: mirror the upper triangle so each pair has exactly one value
        cross = cross.triu() + cross.triu(1).T
        self_a = self_b = cross.diagonal().clone()
    scale = n * (n - 3) if unbiased else (n - 1) ** 2
    return HsicTerms(cross / scale, self_a / scale, self_b / scale, null / scale)


def _row_dots(flat: Tensor) -> Tensor:
    """``(L,)`` squared norms of the rows of ``(L, m)`` without an ``(L, m)`` temporary."""
    return (flat.unsqueeze(1) @ flat.unsqueeze(2)).flatten()


class _CenteredGrams:
    """Rows of the centered versions of a list of Grams, copied block by block into reused float64 buffers.

    U-centering (unbiased) sets ``Ũᵢⱼ = Gᵢⱼ - rᵢ/(n-2) - rⱼ/(n-2) + s/((n-1)(n-2))`` off the diagonal and ``0`` on it,
    with ``r`` the row sums of the Gram without its diagonal and ``s`` their total; double-centering (biased) uses the
    full row sums over ``n`` and keeps the diagonal.
    """

    def __init__(self, grams: Sequence[Tensor] | Tensor, unbiased: bool) -> None:
        self.grams = grams
        self.unbiased = unbiased
        self.num_layers, self.n, self.device = len(grams), grams[0].shape[0], grams[0].device
        self.dtype = torch.float64 if any(g.dtype == torch.float64 for g in grams) else torch.float32
        # One buffer per use, reused block after block: fresh block-sized temporaries cost more than the arithmetic.
        self._buffers: dict[str, Tensor] = {}
        n = self.n
        rows_per_block = max(1, _HSIC_BLOCK_BYTES // (self.num_layers * n * 8))
        # Row sums (also the column sums: Grams are symmetric), a block at a time, since
        # grams.sum(dtype=torch.float64) would first copy every Gram to float64.
        blocks = [slice(s, min(s + rows_per_block, n)) for s in range(0, n, rows_per_block)]
        row_sums = torch.cat([self._copy(rows).sum(dim=2) for rows in blocks], dim=1)  # (L, n)
        if unbiased:
            row_sums -= torch.stack([g.diagonal() for g in grams]).to(torch.float64)
            self.row_term = row_sums / (n - 2)
            self.total_term = row_sums.sum(dim=1) / ((n - 1) * (n - 2))  # (L,)
        else:
            self.row_term = row_sums / n
            self.total_term = row_sums.sum(dim=1) / n**2

    def _buffer(self, use: str, rows: int) -> Tensor:
        size = self.num_layers * rows * self.n
        buffer = self._buffers.get(use)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[use] = torch.empty(size, dtype=torch.float64, device=self.device)
        return buffer[:size].view(self.num_layers, rows, self.n)

    def _copy(self, rows: slice | Tensor, use: str = "rows") -> Tensor:
        """Rows ``rows`` of every Gram as contiguous float64 ``(L, r, n)``."""
        count = rows.numel() if isinstance(rows, Tensor) else rows.stop - rows.start
        out = self._buffer(use, count)
        for i, g in enumerate(self.grams):
            out[i].copy_(g[rows])
        return out

    def _center(self, block: Tensor, rows: slice | Tensor) -> Tensor:
        """Center ``block``, rows ``rows`` of the Grams in their original column order, in place."""
        block -= self.row_term[:, rows, None] - self.total_term[:, None, None]  # an (L, r, 1) term, in place
        block -= self.row_term[:, None, :]
        if self.unbiased:
            index = torch.arange(self.n, device=self.device)[rows]
            block[:, torch.arange(index.numel(), device=self.device), index] = 0.0
        return block

    def rows(self, rows: slice) -> Tensor:
        """Rows ``rows`` of the centered Grams, ``(L, r, n)``."""
        return self._center(self._copy(rows), rows)

    def permuted_rows(self, perm: Tensor, rows: slice) -> Tensor:
        """Rows ``rows`` of the centered Grams of the examples reordered by ``perm``: ``U[perm[rows]][:, perm]``."""
        block = self._center(self._copy(perm[rows], "gathered"), perm[rows])
        out = self._buffer("permuted", block.shape[1])
        # gather along the last dim with a broadcast index: 4x faster than index_select(block, 2, perm) on the CPU.
        return torch.gather(block, 2, perm.expand(block.shape), out=out)

    def diagonal_spectra(self, order: Tensor, index: Tensor, start: int, dtype: torch.dtype) -> Tensor:
        """Spectra along the diagonals of the centered Grams with the examples relabelled by ``order``.

        Diagonal ``d`` of a relabelled Gram is ``v_d(u) = U[order[u], order[(u + d) % n]]`` (wrapping around); this is
        its real FFT over ``u`` for the ``D`` diagonals ``d = start, ..., start + D - 1`` of ``index``, a ``(D, n)``
        flat index into an ``(n, n)`` Gram. The values are gathered from the Grams as given and centred on the way
        (the row and column terms of the centering, relabelled), so no centred copy of a whole Gram is ever made.

        Returns:
            ``(n // 2 + 1, L, 2, D)`` in ``dtype``: per frequency and layer, the real parts, then the imaginary ones.
        """
        n, layers, count = self.n, self.num_layers, index.shape[0]
        values = torch.empty(layers, count, n, dtype=dtype, device=self.device)
        flat = index.reshape(-1)
        for i, g in enumerate(self.grams):
            source = g.reshape(-1)
            if source.dtype == dtype:
                torch.index_select(source, 0, flat, out=values[i].view(-1))
            else:
                values[i].view(-1).copy_(source.index_select(0, flat))
        rows = self.row_term[:, order].to(dtype)  # (L, n): the row term of example order[u]
        doubled = torch.cat([rows, rows], dim=1)  # (L, 2n): the column term of diagonal d is a window of it
        values -= rows[:, None, :]
        values -= doubled.as_strided((layers, count, n), (2 * n, 1, 1), doubled.storage_offset() + start)
        values += self.total_term.to(dtype)[:, None, None]
        spectrum = torch.view_as_real(torch.fft.rfft(values, dim=-1))  # (L, D, F, 2)
        out = torch.empty(n // 2 + 1, layers, 2, count, dtype=dtype, device=self.device)
        return out.copy_(spectrum.permute(2, 0, 3, 1))


class ShiftPermutations(Sequence[Tensor]):
    """The cyclic shifts of the examples taken in a random order: a permutation null whose products share one FFT.

    Permutation ``k`` sends example ``order[u]`` to ``order[(u + shifts[k]) % n]``. With the examples relabelled by
    ``order``, shifting B's examples is a circular correlation along the diagonals of the Grams, so the HSIC of every
    layer pair under every shift comes from one FFT of the Grams' diagonals and one small product per frequency
    (:func:`_shifted_products`): about twice the flops of the unpermuted product for all ``n - 1`` shifts, instead of
    one product per permutation. The shifts of one order form a group (the cyclic group, relabelled at random), so the
    permutation test that compares the observed pairing with shifts drawn from it is exact, as it is with uniformly
    drawn permutations (Hemerik & Goeman 2018, "Exact testing with random permutations").

    Args:
        order: ``(n,)`` a permutation of ``range(n)``.
        shifts: ``(K,)`` distinct shifts in ``[1, n)``.

    Example:
        >>> import torch
        >>> perms = ShiftPermutations(torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2]))
        >>> [p.tolist() for p in perms]  # 2 -> 0 -> 3 -> 1 -> 2 is the cycle that shift 1 follows
        [[3, 2, 0, 1], [1, 0, 3, 2]]
    """

    def __init__(self, order: Tensor, shifts: Tensor) -> None:
        self.order, self.shifts = order, shifts
        self._position = torch.argsort(order)  # where each example sits in the order

    def __len__(self) -> int:
        return int(self.shifts.numel())

    @overload
    def __getitem__(self, k: int) -> Tensor: ...

    @overload
    def __getitem__(self, k: slice) -> list[Tensor]: ...

    def __getitem__(self, k: int | slice) -> Tensor | list[Tensor]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        n = self.order.numel()
        return self.order[(self._position + self.shifts[k]) % n]


def draw_permutations(n: int, count: int, generator: torch.Generator, device: torch.device) -> Sequence[Tensor]:
    """``count`` permutations of ``n`` examples for a permutation null, drawn from ``generator``.

    Shifts of a random order (:class:`ShiftPermutations`, distinct shifts drawn uniformly) when there are at least
    ``count`` of them, else uniformly random permutations, each its own product.

    Example:
        >>> import torch
        >>> perms = draw_permutations(64, 19, torch.Generator().manual_seed(0), torch.device("cpu"))
        >>> type(perms).__name__, len(perms), sorted(perms[0].tolist()) == list(range(64))
        ('ShiftPermutations', 19, True)
    """
    if count == 0:
        return []
    if count < n:
        order = torch.randperm(n, generator=generator)
        shifts = torch.randperm(n - 1, generator=generator)[:count] + 1
        return ShiftPermutations(order.to(device), shifts.to(device))
    return [torch.randperm(n, generator=generator).to(device) for _ in range(count)]


def _shifted_products(side_a: _CenteredGrams, side_b: _CenteredGrams, perms: ShiftPermutations) -> Tensor:
    """``(K, La, Lb)`` float64 ``⟨Ũa, P Ũb Pᵀ⟩`` of every layer pair under every permutation ``P`` of ``perms``.

    With ``a_d(u)``, ``b_d(u)`` the diagonals of the relabelled centred Grams (:meth:`_CenteredGrams.diagonal_spectra`),
    the product under shift ``s`` is ``Σ_d Σ_u a_d(u) b_d(u + s)``: a circular correlation over ``u``, summed over the
    diagonals. Its spectrum is ``C(f) = Σ_d conj(A_d(f)) B_d(f)``, one ``(La, D) x (D, Lb)`` product per frequency
    (in real arithmetic: ``Re C = Xa Xbᵀ + Ya Ybᵀ``, ``Im C = Xa Ybᵀ - Ya Xbᵀ``), and one inverse FFT gives the
    correlation at every shift. The diagonals go through in blocks of at most ``_HSIC_BLOCK_BYTES`` of scratch.
    """
    n, device = side_a.n, side_a.device
    joint = side_b is side_a
    dtype = torch.float64 if torch.float64 in (side_a.dtype, side_b.dtype) else torch.float32
    num_a, num_b = side_a.num_layers, side_b.num_layers
    layers = num_a + (0 if joint else num_b)
    # Scratch per diagonal and layer: the gathered values, their spectrum and its planar copy, about 3 x n values.
    step = max(1, _HSIC_BLOCK_BYTES // (3 * layers * n * torch.finfo(dtype).bits // 8))
    freqs = n // 2 + 1
    real = torch.zeros(freqs, num_a, num_b, dtype=torch.float64, device=device)
    imag = torch.zeros_like(real)
    order = perms.order
    doubled, positions = torch.cat([order, order]), torch.arange(n, device=device)
    # A U-centred Gram's diagonal is zero and pairs with nothing, so the unbiased products skip diagonal d = 0.
    for start in range(1 if side_a.unbiased else 0, n, step):
        diagonals = torch.arange(start, min(start + step, n), device=device)
        index = order * n + doubled[diagonals[:, None] + positions]  # (D, n): U[order[u], order[(u + d) % n]]
        spec_a = side_a.diagonal_spectra(order, index, start, dtype)  # (F, La, 2, D)
        spec_b = spec_a if joint else side_b.diagonal_spectra(order, index, start, dtype)
        count = index.shape[0]
        real += spec_a.view(freqs, num_a, 2 * count) @ spec_b.view(freqs, num_b, 2 * count).mT
        x_a, y_a, x_b, y_b = spec_a[:, :, 0], spec_a[:, :, 1], spec_b[:, :, 0], spec_b[:, :, 1]
        if joint:
            cross = x_a @ y_a.mT
            imag += cross - cross.mT
        else:
            imag += x_a @ y_b.mT - y_a @ x_b.mT
    # The inverse FFT at the K shifts only, as one small product: c(s) = Σ_f w_f (Re C(f) cos θ - Im C(f) sin θ) / n
    # with θ = 2π f s / n and w_f = 2 for the frequencies that stand for a conjugate pair too (irfft's convention).
    f = torch.arange(freqs, device=device)
    angle = (f[None, :] * perms.shifts[:, None] % n).to(torch.float64) * (2 * torch.pi / n)  # (K, F), exact phase
    weight = torch.full((freqs,), 2.0, dtype=torch.float64, device=device)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    cos, sin = (angle.cos() * weight) / n, (angle.sin() * weight) / n
    products = cos @ real.view(freqs, -1) - sin @ imag.view(freqs, -1)
    return products.view(-1, num_a, num_b)

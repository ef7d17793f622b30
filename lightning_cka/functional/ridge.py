"""Closed-form ridge probes of the class, the ridge strength chosen by generalized cross-validation.

One-hot classes are regressed on features from sufficient statistics that sum over minibatches and ranks.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# λ grid of the GCV search: s_max · 10^k for k = -6, -5.75, ..., 2 (s_max: the largest eigenvalue of XcᵀXc). The low
# end is almost least squares, the high end shrinks every coefficient to ~0 (the majority-class predictor).
RIDGE_EXPONENTS = tuple(k / 4 for k in range(-24, 9))
_SHUFFLE_KEY = 0x5EED  # spawn key of the shuffled-label generators: other streams of the probe seed never meet them


@dataclass
class RidgeFit:
    """A ridge probe fitted on centered sufficient statistics.

    Attributes:
        weights: ``(D, C)`` coefficients; predictions are ``(x - mean_x) @ weights + mean_y``.
        mean_x: ``(D,)`` fit-half feature means.
        mean_y: ``(C,)`` fit-half class frequencies.
        ridge: the chosen λ (NaN for constant features: then ``weights`` is 0, the majority-class predictor).
        lambdas: ``(K,)`` the λ grid (empty for constant features).
        gcv: ``(K,)`` the GCV criterion on it.
    """

    weights: Tensor
    mean_x: Tensor
    mean_y: Tensor
    ridge: float
    lambdas: Tensor
    gcv: Tensor


def fit_ridge(xtx: Tensor, xty: Tensor, sx: Tensor, counts: Tensor) -> RidgeFit:
    """Ridge regression of one-hot classes on features with an intercept, λ chosen by generalized cross-validation.

    With ``Xc``, ``Yc`` the fit half's features and one-hot targets centered with their means (which fits the
    intercept, unpenalized) and ``XcᵀXc = V diag(s) Vᵀ``, ``Z = Vᵀ XcᵀYc``, everything follows from ``s`` and ``Z``:

    - ``W(λ) = V diag(1 / (s + λ)) Z``;
    - ``RSS(λ) = ‖Yc‖² - Σᵢ ‖Zᵢ‖² (sᵢ + 2λ) / (sᵢ + λ)²`` (summed over the classes), ``‖Yc‖² = n - Σ_c n_c² / n``;
    - ``df(λ) = Σᵢ sᵢ / (sᵢ + λ)``, the trace of the centered hat matrix;
    - ``GCV(λ) = n · RSS(λ) / (n - 1 - df(λ))²`` (the 1 counts the intercept; infinite where the denominator is not
      positive), minimized over ``λ = s_max · 10^k``, ``k`` in :data:`RIDGE_EXPONENTS` (the first minimum).

    The same as ``solve_ridge(ridge_basis(xtx, sx, counts), xty)``: several targets with the same features and class
    counts (the shuffled-label probes) share one eigendecomposition through :func:`ridge_basis`.

    Args:
        xtx: ``(D, D)`` ``Σ x xᵀ`` over the fit half (float64).
        xty: ``(D, C)`` ``Σ x yᵀ`` with one-hot ``y``.
        sx: ``(D,)`` ``Σ x``.
        counts: ``(C,)`` examples of each class (``n = Σ counts``, at least 2).

    Returns:
        The fit. Constant features (``s_max = 0``) give zero weights and λ NaN.

    Raises:
        torch.linalg.LinAlgError: when the eigendecomposition does not converge (callers turn it into NaN).
    """
    return solve_ridge(ridge_basis(xtx, sx, counts), xty)


@dataclass
class RidgeBasis:
    """What every ridge fit on the same fit-half features and class counts shares: the eigendecomposition.

    Attributes:
        n: examples fitted (0-dim).
        mean_x: ``(D,)`` feature means.
        mean_y: ``(C,)`` class frequencies.
        yy: ``‖Yc‖² = n - Σ_c n_c² / n``.
        s: ``(D,)`` eigenvalues of ``XcᵀXc`` (clamped at 0).
        v: ``(D, D)`` its eigenvectors.
    """

    n: Tensor
    mean_x: Tensor
    mean_y: Tensor
    yy: Tensor
    s: Tensor
    v: Tensor


def ridge_basis(xtx: Tensor, sx: Tensor, counts: Tensor) -> RidgeBasis:
    """The eigendecomposition of the centered ``XcᵀXc`` (see :func:`fit_ridge`), computed once for many targets.

    Raises:
        torch.linalg.LinAlgError: when the eigendecomposition does not converge.
    """
    n = counts.sum()
    mean_x, mean_y = sx / n, counts / n
    cxx = xtx - n * torch.outer(mean_x, mean_x)
    cxx = (cxx + cxx.T) / 2  # exactly symmetric for eigh
    yy = n - (counts * counts).sum() / n
    s, v = torch.linalg.eigh(cxx)
    s = s.clamp_min(0.0)  # rounding can make zero eigenvalues slightly negative
    return RidgeBasis(n, mean_x, mean_y, yy, s, v)


def solve_ridge(basis: RidgeBasis, xty: Tensor) -> RidgeFit:
    """The GCV ridge fit of :func:`fit_ridge` for targets ``xty`` ``(D, C)`` with the class counts of ``basis``."""
    n, mean_x, mean_y, yy, s, v = basis.n, basis.mean_x, basis.mean_y, basis.yy, basis.s, basis.v
    cxy = xty - n * torch.outer(mean_x, mean_y)
    s_max = s.max()
    if not s_max > 0:
        empty = torch.zeros(0, dtype=s.dtype, device=s.device)
        return RidgeFit(torch.zeros_like(cxy), mean_x, mean_y, float("nan"), empty, empty)
    z = v.T @ cxy  # (D, C)
    z2 = (z * z).sum(dim=1)  # (D,)
    lambdas = s_max * 10.0 ** torch.tensor(RIDGE_EXPONENTS, dtype=s.dtype, device=s.device)
    denom = s[None, :] + lambdas[:, None]  # (K, D)
    rss = (yy - (z2 * (s[None, :] + 2 * lambdas[:, None]) / denom.square()).sum(dim=1)).clamp_min(0.0)
    residual_df = n - 1 - (s[None, :] / denom).sum(dim=1)
    gcv = torch.where(residual_df > 0, n * rss / residual_df.clamp_min(1e-300).square(), torch.inf)
    best = int(torch.argmin(gcv))
    weights = v @ (z / (s + lambdas[best])[:, None])
    return RidgeFit(weights, mean_x, mean_y, float(lambdas[best]), lambdas, gcv)


def label_permutation(seed: int, shuffle: int, n: int) -> Tensor:
    """The permutation of the ``n`` fitted labels in shuffled-label probe ``shuffle`` of a probe seeded ``seed``.

    The fit half's images in the order of their global probe index get the labels ``labels[perm]``. Drawn from a
    generator seeded from (``seed``, ``shuffle``) alone, so the shuffled probes are the same whatever the ranks. The
    chance level of the linear probe is the accuracy of ridge fits on labels permuted this way.

    Example:
        >>> label_permutation(0, 0, 5).sort().values.tolist()
        [0, 1, 2, 3, 4]
        >>> torch.equal(label_permutation(0, 1, 64), label_permutation(0, 1, 64))
        True
    """
    sequence = np.random.SeedSequence(seed, spawn_key=(_SHUFFLE_KEY, shuffle))
    generator = torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))
    return torch.randperm(n, generator=generator)


def score(fit: RidgeFit, features: Tensor, labels: Tensor, present: Tensor) -> Tensor:
    """How many of ``features`` the probe classifies as ``labels`` (a float64 0-dim tensor; NaN for non-finite input).

    Classes absent from the fit half (``present`` False) are never predicted; ties go to the lower class index.
    """
    if not features.shape[0]:
        return torch.zeros((), dtype=torch.float64, device=features.device)
    x = features.to(torch.float64)
    scores = (x - fit.mean_x) @ fit.weights + fit.mean_y
    scores = scores.masked_fill(~present, -torch.inf)
    correct = (scores.argmax(dim=1) == labels).sum().to(torch.float64)
    return torch.where(torch.isfinite(x).all(), correct, torch.nan)

"""From per-minibatch HSIC sums to CKA with a jackknife standard error and a permutation-null threshold.

The minibatch estimator (Nguyen, Raghu & Kornblith 2021) is a ratio of sums over minibatches ``i``::

    CKA(a, b) = Σᵢ wᵢ HSIC₁(Kᵢ, Lᵢ) / sqrt(Σᵢ wᵢ HSIC₁(Kᵢ, Kᵢ) · Σᵢ wᵢ HSIC₁(Lᵢ, Lᵢ))

with ``wᵢ = 1`` (every minibatch counts the same, this package's default) or ``wᵢ = nᵢ(nᵢ - 3)`` (the sum of the
unnormalized U-centered inner products, as google-research's ``efficient_CKA.py`` accumulates them). Leaving one
minibatch's terms out of every sum gives the block jackknife replicates, and HSIC terms of permuted pairings give the
null distribution, both without another forward pass or Gram.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn

from lightning_cka.stats import NULL_LEVEL, WEIGHTINGS  # noqa: F401  (the estimator's constants live with its readers)

Weighting = Literal["equal", "size"]


@dataclass
class CKAEstimate:
    """A CKA matrix with its uncertainty.

    Attributes:
        value: ``(La, Lb)`` CKA (symmetric ``(L, L)`` with a unit diagonal for a model against itself).
        se: ``(La, Lb)`` block-jackknife standard error over minibatches; NaN with fewer than 2 minibatches.
        null: ``(La, Lb)`` permutation-null threshold: a cell with ``|value| > null`` is significant at
            ``NULL_LEVEL`` (5%) by a permutation test; ``inf`` when too few permutations were run for that level, NaN
            when none were.
        degenerate_a: ``(La,)`` reason a row is NaN (``""`` when it is not): ``"constant"``, ``"not finite"`` or
            ``"negative self-HSIC"``.
        degenerate_b: ``(Lb,)`` the same for the columns.
        num_minibatches: minibatches that entered the sums.
        replicates: ``(M, La, Lb)`` the jackknife replicates (the CKA with each minibatch left out), from which the
            standard error of any summary of the matrix follows (:func:`lightning_cka.stats.jackknife_se`); empty with
            fewer than 2 minibatches.
    """

    value: Tensor
    se: Tensor
    null: Tensor
    degenerate_a: list[str]
    degenerate_b: list[str]
    num_minibatches: int
    replicates: Tensor


def minibatch_weights(sizes: Tensor, weighting: Weighting) -> Tensor:
    """``(M,)`` float64 weight of each minibatch with ``sizes`` examples (0 for a minibatch never seen)."""
    seen = (sizes > 0).to(torch.float64)
    if weighting == "equal":
        return seen
    n = sizes.to(torch.float64)
    return seen * n * (n - 3)


def cka_estimate(
    cross: Tensor,
    self_a: Tensor,
    self_b: Tensor,
    weights: Tensor,
    null: Tensor | None = None,
    joint: bool = False,
) -> CKAEstimate:
    """CKA, its jackknife standard error and null threshold from per-minibatch HSIC terms.

    Args:
        cross: ``(M, La, Lb)`` HSIC of every pair, per minibatch.
        self_a: ``(M, La)`` HSIC of each row layer with itself, per minibatch.
        self_b: ``(M, Lb)`` the same for the column layers.
        weights: ``(M,)`` minibatch weights; minibatches of weight 0 take no part.
        null: ``(K, La, Lb)`` weighted sums over minibatches of the HSIC under ``K`` permutations, or ``None``.
        joint: rows and columns are the same layers (unit diagonal, zero standard error on it).

    Returns:
        The :class:`CKAEstimate`.

    Example:
        >>> import torch
        >>> cross = torch.tensor([[[1.0]], [[0.5]], [[0.8]]], dtype=torch.float64)  # 3 minibatches, one pair
        >>> self_a = self_b = torch.ones(3, 1, dtype=torch.float64)
        >>> est = cka_estimate(cross, self_a, self_b, torch.ones(3, dtype=torch.float64))
        >>> round(est.value.item(), 4), round(est.se.item(), 4)  # (1.0 + 0.5 + 0.8) / 3, jackknife over 3
        (0.7667, 0.1453)
    """
    used = weights > 0
    cross, self_a, self_b, w = cross[used], self_a[used], self_b[used], weights[used]
    num = int(used.sum())
    total_c = torch.einsum("m,mab->ab", w, cross)
    total_a, total_b = w @ self_a, w @ self_b
    value = _normalize(total_c, total_a, total_b, joint)
    if num >= 2:
        loo = _normalize(
            total_c - w[:, None, None] * cross,
            total_a - w[:, None] * self_a,
            total_b - w[:, None] * self_b,
            joint,
        )  # (M, La, Lb)
        se = ((num - 1) / num * (loo - loo.mean(dim=0)).square().sum(dim=0)).sqrt()
    else:
        loo = value.new_zeros((0, *value.shape))
        se = torch.full_like(value, float("nan"))
    if null is None or null.shape[0] == 0:
        threshold = torch.full_like(value, float("nan"))
    else:
        threshold = null_threshold(_normalize(null, total_a, total_b, joint=False, unit_diagonal=False))
    if joint:
        threshold.diagonal().fill_(float("nan"))
    return CKAEstimate(value, se, threshold, _reasons(total_a), _reasons(total_b), num, loo)


def null_threshold(null_cka: Tensor, level: float = NULL_LEVEL) -> Tensor:
    """The permutation-test threshold of every cell from ``(K, La, Lb)`` CKA values under the null.

    A cell is significant at ``level`` when ``(1 + #{k: |nullₖ| >= |value|}) / (K + 1) <= level``, i.e. when ``|value|``
    exceeds the ``floor(level·(K + 1))``-th largest ``|nullₖ|``: the largest of 19 permutations at 5%. With fewer
    permutations than that level needs, no cell can be significant and the threshold is ``inf``.
    """
    rank = int(level * (null_cka.shape[0] + 1) + 1e-9)
    if rank < 1:
        return torch.full(null_cka.shape[1:], float("inf"), dtype=null_cka.dtype, device=null_cka.device)
    return null_cka.abs().topk(rank, dim=0).values[-1]


def _normalize(cross: Tensor, self_a: Tensor, self_b: Tensor, joint: bool, unit_diagonal: bool = True) -> Tensor:
    """``cross / sqrt(self_a ⊗ self_b)`` over the trailing dims; NaN where a self-HSIC is not positive and finite."""
    bad_a = ~torch.isfinite(self_a) | (self_a <= 0)
    bad_b = ~torch.isfinite(self_b) | (self_b <= 0)
    norm_a, norm_b = self_a.clamp(min=0).sqrt(), self_b.clamp(min=0).sqrt()
    out = cross / (norm_a[..., :, None] * norm_b[..., None, :])
    out = out.masked_fill(bad_a[..., :, None] | bad_b[..., None, :], float("nan"))
    if joint and unit_diagonal:
        diagonal = out.diagonal(dim1=-2, dim2=-1)
        diagonal.copy_(torch.where(bad_a, float("nan"), 1.0))
    return out


def _reasons(self_hsic: Tensor) -> list[str]:
    """Why each layer's CKA is NaN, from its summed self-HSIC (``""`` where it is fine)."""
    reasons = []
    for value in self_hsic.tolist():
        if value != value or value in (float("inf"), float("-inf")):
            reasons.append("not finite")
        elif value == 0:
            reasons.append("constant")
        elif value < 0:
            reasons.append("negative self-HSIC")
        else:
            reasons.append("")
    return reasons


def warn_degenerate(names: list[str], reasons: list[str]) -> None:
    """One warning naming every layer whose CKA is NaN, with the reason (see :func:`_reasons`)."""
    bad = [f"{name} ({why})" for name, why in zip(names, reasons, strict=True) if why]
    if bad:
        rank_zero_warn(
            f"CKA is NaN for layer(s) {', '.join(bad)}: constant features have no variance to compare, NaN/inf "
            "features or an overflowing Gram have no finite HSIC, and a negative self-HSIC means too few examples "
            "per minibatch. The other entries are unaffected.",
            UserWarning,
        )

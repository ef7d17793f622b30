"""Headline numbers of a probe's matrices, shared by the analyses' scalars and the command line's tables.

NaN entries (layers whose features were constant or non-finite) are left out, never propagated.
"""

import functools
from collections.abc import Callable

import numpy as np

NULL_LEVEL = 0.05  # the level of the permutation-null thresholds
WEIGHTINGS = ("equal", "size")  # how minibatches count in the minibatch CKA sums


def nanmean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def offdiag_mean(intra: np.ndarray) -> float:
    """Mean CKA of every pair of different layers: high for uniform (ViT-like), low for staged models."""
    return nanmean(intra[~np.eye(len(intra), dtype=bool)])


def adjacent_mean(intra: np.ndarray) -> float:
    """Mean CKA of consecutive layers ``(i, i + 1)``."""
    return nanmean(np.diagonal(intra, offset=1))


def best_matches(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each model layer (row), the reference layer (column) it resembles most, and that CKA.

    Args:
        reference: ``(La, Lb)`` CKA of model layers with reference layers, ``Lb >= 1``.

    Returns:
        ``(La,)`` column indices (-1 for a row without a finite value) and ``(La,)`` values (NaN there).
    """
    masked = np.where(np.isfinite(reference), reference, -np.inf)
    best = masked.max(axis=1)
    found = np.isfinite(best)
    return np.where(found, masked.argmax(axis=1), -1), np.where(found, best, np.nan)


def jackknife_se(summary: Callable[[np.ndarray], float], replicates: np.ndarray | None) -> float:
    """Block-jackknife standard error of ``summary(matrix)`` from the matrix's leave-one-minibatch-out replicates.

    Args:
        summary: a function of one matrix (e.g. :func:`offdiag_mean`).
        replicates: ``(M, ...)`` the matrix with each of ``M`` minibatches left out, or ``None``.

    Returns:
        ``sqrt((M - 1) / M · Σ (sᵢ - s̄)²)`` over the replicates' summaries; NaN with fewer than 2 replicates or any
        non-finite summary.

    Example:
        >>> import numpy as np
        >>> round(jackknife_se(float, np.array([0.65, 0.9, 0.75])), 4)
        0.1453
    """
    if replicates is None or len(replicates) < 2:
        return float("nan")
    values = np.array([summary(r) for r in replicates], dtype=np.float64)
    if not np.isfinite(values).all():
        return float("nan")
    m = len(values)
    return float(np.sqrt((m - 1) / m * np.square(values - values.mean()).sum()))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of the pairs where both are finite (average ranks for ties); NaN below 3 pairs."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return float("nan")
    rx, ry = rankdata(x[keep]), rankdata(y[keep])
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank.

    Example:
        >>> rankdata(np.array([3.0, 1.0, 3.0])).tolist()
        [1.5, 0.0, 1.5]
    """
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # the rank of each distinct value's first occurrence
    return (first + (counts - 1) / 2)[inverse].astype(np.float64)


def benjamini_hochberg(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """Which tests the Benjamini-Hochberg procedure rejects at false discovery rate ``alpha`` (NaN p: never).

    Example:
        >>> benjamini_hochberg(np.array([0.001, 0.02, 0.04, 0.5, np.nan]), 0.05).tolist()
        [True, True, False, False, False]
    """
    p = np.asarray(p_values, dtype=np.float64)
    flat = p.ravel()
    tested = np.flatnonzero(np.isfinite(flat))
    rejected = np.zeros(flat.shape, dtype=bool)
    if tested.size:
        order = tested[np.argsort(flat[tested], kind="mergesort")]
        passing = flat[order] <= alpha * np.arange(1, order.size + 1) / order.size
        if passing.any():
            rejected[order[: int(np.flatnonzero(passing).max()) + 1]] = True
    return rejected.reshape(p.shape)


def welch_test(
    mean_a: np.ndarray, var_a: np.ndarray, dof_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray, dof_b: np.ndarray
) -> np.ndarray:
    """Two-sided p-values of ``mean_a - mean_b`` with Welch's t and the Welch-Satterthwaite degrees of freedom.

    Args:
        mean_a: estimates of side A (any shape).
        var_a: variances of those estimates (``s² / n`` for a group of ``n`` runs, ``se²`` for one run).
        dof_a: their degrees of freedom (``n - 1``, or the jackknife's ``M - 1``).
        mean_b: the same for side B.
        var_b: the same for side B.
        dof_b: the same for side B.

    Example:
        >>> round(float(welch_test(np.array(1.0), np.array(0.1), np.array(4), np.array(0.0), np.array(0.1),
        ...                        np.array(4))), 4)  # t = 2.236 with 8 degrees of freedom
        0.0558
    """
    var = np.asarray(var_a, dtype=np.float64) + np.asarray(var_b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.asarray(mean_a) - np.asarray(mean_b)) / np.sqrt(var)
        dof = var**2 / (np.asarray(var_a) ** 2 / np.asarray(dof_a) + np.asarray(var_b) ** 2 / np.asarray(dof_b))
    return student_t_two_sided(t, dof)


def student_t_two_sided(t: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """``P(|T| >= |t|)`` for Student's t with ``dof`` degrees of freedom: ``I_{dof/(dof+t²)}(dof/2, 1/2)``."""
    t, dof = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(dof, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        x = dof / (dof + t**2)
    out = _betainc(dof / 2, np.full_like(dof, 0.5), x)
    return np.where(np.isfinite(t) & (dof > 0), out, np.nan)


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularized incomplete beta ``I_x(a, b)``, elementwise, by Lentz's continued fraction (Numerical Recipes 6.4)."""
    a, b, x = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(a, b, x))
    flip = x > (a + 1) / (a + b + 2)  # the fraction converges fast below this point; use I_x(a,b) = 1 - I_1-x(b,a)
    aa, bb, xx = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - x, x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        from math import lgamma

        log_beta = np.vectorize(lgamma)(aa + bb) - np.vectorize(lgamma)(aa) - np.vectorize(lgamma)(bb)
        front = np.exp(log_beta + aa * np.log(xx) + bb * np.log1p(-xx)) / aa
        tiny = 1e-300
        c, d = np.ones_like(xx), 1 - (aa + bb) * xx / (aa + 1)
        d = 1 / np.where(np.abs(d) < tiny, tiny, d)
        h = d.copy()
        for m in range(1, 300):
            for numerator in (
                m * (bb - m) * xx / ((aa + 2 * m - 1) * (aa + 2 * m)),
                -(aa + m) * (aa + bb + m) * xx / ((aa + 2 * m) * (aa + 2 * m + 1)),
            ):
                d = 1 + numerator * d
                d = 1 / np.where(np.abs(d) < tiny, tiny, d)
                c = 1 + numerator / c
                c = np.where(np.abs(c) < tiny, tiny, c)
                h *= d * c
            step = np.abs(d * c - 1)
            if not np.any(step[np.isfinite(step)] >= 1e-13):  # NaN cells (no test) do not hold the loop
                break
        out = front * h
    out = np.where(xx <= 0, 0.0, np.where(xx >= 1, 1.0, out))
    return np.where(flip, 1 - out, out)


def t_critical(level: float, dof: np.ndarray | float) -> np.ndarray:
    """The two-sided Student t quantile ``q`` with ``P(|T| <= q) = level`` for ``dof`` degrees of freedom.

    An interval of ``± q · se`` around an estimate with ``dof`` degrees of freedom covers the truth with probability
    ``level``: the block jackknife over ``M`` minibatches has ``M - 1``, a group of ``n`` runs ``n - 1``. NaN for
    ``dof <= 0``. Found by bisection on :func:`student_t_two_sided` (60 halvings: exact to float precision).

    Example:
        >>> [round(float(t_critical(0.95, d)), 3) for d in (1, 3, 7, 1e6)]
        [12.706, 3.182, 2.365, 1.96]
    """
    if np.ndim(dof) == 0:  # the usual case, and the same few (level, dof) pairs again and again: cached
        return np.asarray(_t_critical(float(level), float(dof)))
    return _t_bisect(level, np.asarray(dof, dtype=np.float64))


@functools.lru_cache(maxsize=1024)
def _t_critical(level: float, dof: float) -> float:
    return float(_t_bisect(level, np.asarray(dof)))


def _t_bisect(level: float, dof: np.ndarray) -> np.ndarray:
    low, high = np.zeros_like(dof), np.full_like(dof, 1e4)
    for _ in range(60):
        middle = (low + high) / 2
        inside = 1 - student_t_two_sided(middle, dof) < level
        low, high = np.where(inside, middle, low), np.where(inside, high, middle)
    return np.where(dof > 0, (low + high) / 2, np.nan)


def detectable_difference(
    sd_a: float, n_a: int, sd_b: float, n_b: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest difference of two group means a two-sided Welch test at ``alpha`` detects with ``power``.

    ``(t_{1-alpha/2} + t_{power}) · sqrt(sd_a²/n_a + sd_b²/n_b)`` with the Welch-Satterthwaite degrees of freedom: what
    the seeds could have detected at this spread. NaN with fewer than 2 runs a side.

    Example:
        >>> round(detectable_difference(0.02, 3, 0.02, 3), 3)  # 3 seeds a side, sd 0.02
        0.061
    """
    if n_a < 2 or n_b < 2 or not (np.isfinite(sd_a) and np.isfinite(sd_b)):
        return float("nan")
    var_a, var_b = sd_a**2 / n_a, sd_b**2 / n_b
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    if not np.isfinite(dof):
        dof = n_a + n_b - 2.0
    one_sided = float(t_critical(2 * power - 1, dof))  # P(T <= q) = power
    return float((t_critical(1 - alpha, dof) + one_sided) * np.sqrt(var_a + var_b))

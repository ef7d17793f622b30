"""Headline numbers of a probe's matrices, shared by the monitor's scalars and the command line's tables.

NaN entries (layers whose features were constant or non-finite) are left out, never propagated.
"""

import numpy as np


def nanmean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN when there are none."""
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

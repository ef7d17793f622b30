"""Heatmap panels of CKA matrices and their changes, shared by every analysis that yields a CKA matrix."""

from collections.abc import Sequence

import numpy as np

from lightning_cka.figures.spec import Heatmap

NULL_MARK = "dot: indistinguishable from unrelated images (permutation test, 5%)"
_NICE_LIMITS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def cka_panel(
    values: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    se: np.ndarray | None = None,
    null: np.ndarray | None = None,
    joint: bool = False,
    title: str = "",
    row_label: str = "layer",
    col_label: str = "layer",
) -> Heatmap:
    """A CKA heatmap on the fixed 0..1 scale, with its standard errors and null marks where the probe has them.

    Args:
        values: ``(R, C)`` CKA.
        rows: row names.
        cols: column names.
        se: ``(R, C)`` standard errors.
        null: ``(R, C)`` permutation-null thresholds; cells with ``|CKA| <= null`` get a dot.
        joint: rows and columns are the same layers (the diagonal is never marked).
        title: panel title.
        row_label: y axis label.
        col_label: x axis label.
    """
    marked = None
    if null is not None and np.isfinite(null).any():
        marked = np.isfinite(values) & np.isfinite(null) & (np.abs(values) <= null)
        if joint:
            np.fill_diagonal(marked, False)
    return Heatmap(
        values=np.asarray(values, dtype=np.float64),
        rows=tuple(rows),
        cols=tuple(cols),
        row_label=row_label,
        col_label=col_label,
        title=title,
        error=se,
        null=null,
        marked=marked,
        mark_label=NULL_MARK if marked is not None else "",
        joint=joint,
    )


def change_panel(change: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str = "") -> Heatmap:
    """A heatmap of CKA differences on a symmetric scale just wide enough for the largest one (never clipped)."""
    limit = symmetric_limit(change)
    return Heatmap(
        values=np.asarray(change, dtype=np.float64),
        rows=tuple(rows),
        cols=tuple(cols),
        title=title,
        vmin=-limit,
        vmax=limit,
        cmap="diverging",
        colorbar=f"change of CKA (scale ±{limit:g})",
    )


def symmetric_limit(values: np.ndarray) -> float:
    """The smallest of 0.01, 0.02, 0.05, ..., 2 at or above the largest finite ``|value|``.

    A colour scale that keeps a -0.6 change and a 0.01 change both visible, and changes rarely between probes.
    """
    finite = np.abs(np.asarray(values, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if finite.size else 0.0
    return next((limit for limit in _NICE_LIMITS if top <= limit), float(np.ceil(top)))

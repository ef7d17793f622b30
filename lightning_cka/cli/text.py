"""Number and name formatting for the command line's tables."""

from collections.abc import Sequence

import numpy as np


def num(value: float, width: int, spec: str = ".3f") -> str:
    """A right-aligned table cell; ``-`` for NaN."""
    return f"{'-' if not np.isfinite(value) else format(value, spec):>{width}}"


def few(values: Sequence[int], limit: int = 8) -> str:
    """``0, 1, 2`` or, for long lists, ``0, 100, 200, ..., 900, 1000``."""
    shown = [str(v) for v in values]
    if len(shown) > limit:
        shown = [*shown[:3], "...", *shown[-2:]]
    return ", ".join(shown)


def name_list(items: Sequence[str] | None) -> str:
    """``6 (blocks.0, blocks.1, ...)``: how many layer names, and the first and last of a long list."""
    if not items:
        return "none"
    shown = list(items) if len(items) <= 6 else [*items[:3], "...", *items[-2:]]
    return f"{len(items)} ({', '.join(shown)})"


def threshold_text(threshold: float | None) -> str:
    """How the local-head threshold reads in a summary."""
    if threshold is None or not np.isfinite(threshold):
        return "none (no attention distances, or arrays saved before lightning-cka recorded their scale)"
    return f"mean distance below {threshold:.1f} px"

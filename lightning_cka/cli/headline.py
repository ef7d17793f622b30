"""The headline numbers of a probe as the command line's tables show them, from the analyses' own scalars."""

from collections.abc import Sequence

import numpy as np

from lightning_cka.engine.analysis import View
from lightning_cka.result import CKAResult


def headline(result: CKAResult, view: View) -> dict[str, tuple[float, float]]:
    """``tag: (value, standard error)`` of the probe's run-level scalars (tags ``analysis/name``, not per layer).

    The standard error is the analysis's own ``<tag>_se`` scalar where it logs one (the block jackknife), else NaN.
    """
    scalars = result.scalars(view)
    return {
        tag: (value, scalars.get(f"{tag}_se", float("nan")))
        for tag, value in scalars.items()
        if tag.count("/") == 1 and not tag.endswith("_se") and tag != "cka/probe_seconds"
    }


def per_layer(result: CKAResult, view: View) -> dict[str, dict[str, float]]:
    """``metric: {layer: value}`` of the probe's per-layer scalars (tags ``analysis/metric/layer``)."""
    tables: dict[str, dict[str, float]] = {}
    for tag, value in result.scalars(view).items():
        parts = tag.split("/", 2)
        if len(parts) == 3 and parts[1] != "best_layer":
            tables.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = value
    return tables


def plus_minus(value: float, error: float, width: int = 15) -> str:
    """``0.812 ± 0.014`` (or ``0.812`` without an error), right-aligned."""
    if not np.isfinite(value):
        text = "-"
    elif np.isfinite(error):
        text = f"{value:.3f} ± {error:.3f}"
    else:
        text = f"{value:.3f}"
    return f"{text:>{width}}"


def group_summary(values: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """One run's ``(value, se)``, or a group's ``(mean, sd over runs)``."""
    if len(values) == 1:
        return values[0]
    array = np.array([v for v, _ in values], dtype=np.float64)
    finite = array[np.isfinite(array)]
    if not finite.size:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else float("nan")

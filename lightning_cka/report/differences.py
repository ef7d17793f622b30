"""Headline numbers of two groups of runs set against each other: what differs, what does not, what could not tell.

Each headline scalar of the analyses (``cka/offdiag_mean``, ``attention/local_fraction``, ...) that every run has is
compared with Welch's t over the runs of each side (``n - 1`` degrees of freedom a side), Benjamini-Hochberg across
the scalars keeping the false discovery rate at ``alpha``, and with the smallest difference the seeds could have
detected. A side of one run has no spread over seeds: its within-run standard error says nothing about another seed,
so no test is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_cka.findings import Estimate, GroupTest, Side, group_difference, seed_estimate
from lightning_cka.stats import benjamini_hochberg


@dataclass
class Difference:
    """One headline number of A against B.

    Attributes:
        key: the scalar's tag.
        a: side A's value (mean over its runs, with its interval over seeds).
        b: side B's.
        test: Welch's comparison of the runs.
        discovery: it survives Benjamini-Hochberg across the report's scalars.
    """

    key: str
    a: Estimate
    b: Estimate
    test: GroupTest
    discovery: bool = False

    @property
    def verdict(self) -> str:
        """``differs``, ``no difference found`` or ``one run per side``."""
        if min(self.test.runs) < 2:
            return "one run per side: seed variation unknown"
        return "differs" if self.discovery else "no difference found"


def headline_keys(scalars: list[dict[str, float]]) -> list[str]:
    """The one-level scalar tags (``cka/offdiag_mean``, not per-layer ones) finite in every run, sorted.

    Example:
        >>> headline_keys([{"cka/a": 1.0, "cka/a_se": 0.1, "cka/b/l1": 2.0}, {"cka/a": 0.5}])
        ['cka/a']
    """
    common = set.intersection(*(set(s) for s in scalars)) if scalars else set()
    keys = [k for k in common if k.count("/") == 1 and not k.endswith("_se")]
    return sorted(k for k in keys if all(math.isfinite(s[k]) for s in scalars))


def differences(a: Side, b: Side, alpha: float = 0.05) -> list[Difference]:
    """Every headline number of A against B, tested where both sides have 2 or more runs."""
    per_side = [[result.scalars() for result in side.last] for side in (a, b)]
    keys = headline_keys(per_side[0] + per_side[1])
    rows = []
    for key in keys:
        values = [[s[key] for s in scalars] for scalars in per_side]
        estimates = [seed_estimate(v) if len(v) > 1 else Estimate(v[0], float("nan"), "one run") for v in values]
        rows.append(Difference(key, estimates[0], estimates[1], group_difference(values[0], values[1], alpha)))
    p = np.array([row.test.p for row in rows], dtype=np.float64)
    for row, discovery in zip(rows, benjamini_hochberg(p, alpha), strict=True):
        row.discovery = bool(discovery)
    return rows

import math

import numpy as np
import pytest

from lightning_cka.stats import adjacent_mean, best_matches, nanmean, offdiag_mean


def reference_best(row):
    """Plain-Python argmax over the finite entries of one row."""
    finite = [(value, j) for j, value in enumerate(row) if math.isfinite(value)]
    if not finite:
        return -1, math.nan
    value, j = max(finite, key=lambda pair: (pair[0], -pair[1]))  # the first of equal maxima, as np.argmax
    return j, value


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("nan_fraction", [0.0, 0.3, 1.0])
def test_summaries_match_plain_python(seed, nan_fraction):
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(-0.1, 1, size=(5, 5))
    matrix[rng.random((5, 5)) < nan_fraction] = np.nan
    cells = [[float(v) for v in row] for row in matrix]

    def mean(values):
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    expected = {
        "off": mean([cells[i][j] for i in range(5) for j in range(5) if i != j]),
        "adjacent": mean([cells[i][i + 1] for i in range(4)]),
        "all": mean([v for row in cells for v in row]),
    }
    got = {"off": offdiag_mean(matrix), "adjacent": adjacent_mean(matrix), "all": nanmean(matrix)}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key
    columns, values = best_matches(matrix[:, :3])
    for row, column, value in zip(cells, columns, values, strict=True):
        want_column, want_value = reference_best(row[:3])
        assert column == want_column
        assert value == pytest.approx(want_value, nan_ok=True)

import math

import numpy as np
import pytest

from lightning_cka.stats import (
    adjacent_mean,
    benjamini_hochberg,
    best_matches,
    jackknife_se,
    nanmean,
    offdiag_mean,
    spearman,
    student_t_two_sided,
    welch_test,
)


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


def test_jackknife_se_of_a_summary_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    replicates = rng.random((6, 4, 4))
    summaries = [offdiag_mean(r) for r in replicates]
    m = len(summaries)
    mean = sum(summaries) / m
    expected = math.sqrt((m - 1) / m * sum((s - mean) ** 2 for s in summaries))
    assert jackknife_se(offdiag_mean, replicates) == pytest.approx(expected)
    assert math.isnan(jackknife_se(offdiag_mean, replicates[:1])) and math.isnan(jackknife_se(offdiag_mean, None))


def test_spearman_matches_scipy_with_ties_and_nan():
    st = pytest.importorskip("scipy.stats")
    x = np.array([1.0, 2.0, 2.0, 5.0, np.nan, 7.0, 3.0])
    y = np.array([0.5, 0.1, 0.3, 0.9, 1.0, np.inf, 0.3])
    keep = np.isfinite(x) & np.isfinite(y)
    assert spearman(x, y) == pytest.approx(st.spearmanr(x[keep], y[keep]).statistic)
    assert math.isnan(spearman(np.array([1.0, 2.0]), np.array([3.0, 4.0])))


def test_benjamini_hochberg_matches_the_procedure_by_hand():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(0, 0.01, 5), rng.uniform(0, 1, 30)])
    order = sorted(range(len(p)), key=lambda i: p[i])
    largest = max((k for k in range(1, len(p) + 1) if p[order[k - 1]] <= 0.05 * k / len(p)), default=0)
    expected = np.zeros(len(p), dtype=bool)
    expected[order[:largest]] = True
    np.testing.assert_array_equal(benjamini_hochberg(p, 0.05), expected)


def test_welch_and_student_t_match_scipy():
    st = pytest.importorskip("scipy.stats")
    a, b = np.array([0.61, 0.64, 0.60, 0.66]), np.array([0.70, 0.74, 0.69])
    p = welch_test(a.mean(), a.var(ddof=1) / 4, 3, b.mean(), b.var(ddof=1) / 3, 2)
    assert float(p) == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    t, dof = np.array([0.3, 2.5, 9.0]), np.array([1.5, 7.0, 40.0])
    np.testing.assert_allclose(student_t_two_sided(t, dof), 2 * st.t.sf(t, dof), rtol=1e-10)

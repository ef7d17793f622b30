"""Comparing groups of runs figure by figure: means, differences and which cells differ, against scipy."""

import numpy as np
import pytest

from lightning_cka.figures.groups import Group, compare_groups
from lightning_cka.figures.spec import Dots, Figure, Heatmap, Series

st = pytest.importorskip("scipy.stats")
NAMES = tuple(f"blocks.{i}" for i in range(4))


def heatmap_figure(values, se=None):
    return [Figure("cka/intra", "CKA", (Heatmap(values, NAMES, NAMES, error=se),))]


def test_group_difference_marks_exactly_the_cells_welch_and_bh_reject():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, (4, 4))
    shifted = base.copy()
    shifted[0, 1] -= 0.2  # one real difference
    runs_a = [base + 0.01 * rng.standard_normal((4, 4)) for _ in range(4)]
    runs_b = [shifted + 0.01 * rng.standard_normal((4, 4)) for _ in range(3)]
    a = Group("A", [heatmap_figure(v) for v in runs_a], [4] * 4)
    b = Group("B", [heatmap_figure(v) for v in runs_b], [4] * 3)
    (figure,) = compare_groups(a, b, alpha=0.05)
    mean_a, _, diff = figure.panels
    np.testing.assert_allclose(mean_a.values, np.mean(runs_a, axis=0))
    np.testing.assert_allclose(diff.values, np.mean(runs_a, axis=0) - np.mean(runs_b, axis=0))
    p = st.ttest_ind(np.array(runs_a), np.array(runs_b), axis=0, equal_var=False).pvalue
    np.fill_diagonal(p, np.nan)
    flat = p[np.isfinite(p)]
    reject = st.false_discovery_control(flat) <= 0.05
    expected = np.zeros((4, 4), dtype=bool)
    expected[np.isfinite(p)] = reject
    np.testing.assert_array_equal(diff.marked, expected)
    assert diff.marked[0, 1] and diff.marked.sum() <= 2
    assert "Benjamini-Hochberg" in figure.caption and diff.vmin == -diff.vmax


def test_single_runs_use_their_jackknife_errors():
    a = Group("A", [heatmap_figure(np.full((4, 4), 0.8), np.full((4, 4), 0.01))], [8])
    b = Group("B", [heatmap_figure(np.full((4, 4), 0.75), np.full((4, 4), 0.01))], [8])
    (figure,) = compare_groups(a, b)
    diff = figure.panels[2]
    t = 0.05 / np.sqrt(2 * 0.01**2)
    dof = (2 * 0.01**2) ** 2 / (2 * 0.01**4 / 7)
    assert 2 * st.t.sf(t, dof) < 0.05 and diff.marked[0, 1] and not diff.marked[0, 0]
    assert "jackknife" in figure.caption


def test_dots_pool_the_heads_of_every_run_and_give_per_layer_spread():
    def dots(values):
        return [Figure("attention/mean_distance", "d", (Dots(NAMES, (Series("", values),)),))]

    runs = [np.full((4, 2), 10.0), np.full((4, 2), 12.0)]
    group = Group("A", [dots(v) for v in runs], [4, 4])
    (figure,) = compare_groups(group, Group("B", [dots(np.full((4, 2), 5.0))], [4]))
    pooled, means = figure.panels
    assert pooled.series[0].values.shape == (4, 4) and means.series[0].values.tolist() == [11.0] * 4
    np.testing.assert_allclose(means.series[0].error, np.std([10.0, 12.0], ddof=1))


def test_runs_with_other_layers_are_refused():
    other = [Figure("cka/intra", "CKA", (Heatmap(np.eye(3), NAMES[:3], NAMES[:3]),))]
    with pytest.raises(ValueError, match="monitor different layers"):
        compare_groups(Group("A", [heatmap_figure(np.eye(4))], [2]), Group("B", [other], [2]))

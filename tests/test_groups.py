"""Comparing groups of runs figure by figure: means, differences and which cells differ, against scipy."""

import numpy as np
import pytest

from lightning_cka.figures.groups import Group, compare_groups
from lightning_cka.figures.spec import Curves, Dots, Figure, Heatmap, Series

st = pytest.importorskip("scipy.stats")
NAMES = tuple(f"blocks.{i}" for i in range(4))


def heatmap_figure(values, se=None, joint=True, tag="cka/intra"):
    return [Figure(tag, "CKA", (Heatmap(values, NAMES, NAMES, error=se, joint=joint),))]


def bh(p_values, alpha):
    """Benjamini-Hochberg written out: reject the k smallest p where k is the largest with p_(k) <= alpha k / m."""
    flat = p_values.ravel()
    tested = np.flatnonzero(np.isfinite(flat))
    order = tested[np.argsort(flat[tested])]
    m = len(order)
    passing = [k for k in range(1, m + 1) if flat[order[k - 1]] <= alpha * k / m]
    rejected = np.zeros(flat.shape, dtype=bool)
    if passing:
        rejected[order[: max(passing)]] = True
    return rejected.reshape(p_values.shape)


def scipy_marks(runs_a, runs_b, alpha=0.05, skip_diagonal=False):
    p = st.ttest_ind(np.array(runs_a), np.array(runs_b), axis=0, equal_var=False).pvalue
    if skip_diagonal:
        np.fill_diagonal(p, np.nan)
    return bh(p, alpha)


def test_group_difference_marks_exactly_the_cells_welch_and_bh_reject():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, (4, 4))
    shifted = base.copy()
    shifted[0, 1] -= 0.2  # one real difference
    runs_a = [base + 0.01 * rng.standard_normal((4, 4)) for _ in range(4)]
    runs_b = [shifted + 0.01 * rng.standard_normal((4, 4)) for _ in range(3)]
    a = Group("A", [heatmap_figure(v) for v in runs_a])
    b = Group("B", [heatmap_figure(v) for v in runs_b])
    (figure,), _ = compare_groups(a, b, alpha=0.05)
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
    np.testing.assert_array_equal(diff.marked, scipy_marks(runs_a, runs_b, skip_diagonal=True))
    assert diff.marked[0, 1] and diff.marked.sum() <= 2
    assert "Benjamini-Hochberg" in figure.caption and diff.vmin == -diff.vmax


def test_one_run_a_side_marks_nothing_and_says_so():
    # Two seeds of one setup: their difference (0.05) is 5 jackknife errors, which is no evidence between runs.
    a = Group("A", [heatmap_figure(np.full((4, 4), 0.8), np.full((4, 4), 0.01))])
    b = Group("B", [heatmap_figure(np.full((4, 4), 0.75), np.full((4, 4), 0.01))])
    (figure,), _ = compare_groups(a, b)
    diff = figure.panels[2]
    assert diff.marked is None and diff.mark_label == ""
    np.testing.assert_allclose(diff.values, 0.05)
    assert (
        "One run per side: seed variation unknown, no cell is marked; train 2 or more seeds a side (3 for a claim)."
        in figure.caption
    )
    assert "jackknife" not in figure.caption and "Welch" not in figure.caption
    # one run on one side only: the same
    three = Group("B", [heatmap_figure(np.full((4, 4), 0.75) + 0.001 * i) for i in range(3)])
    (figure,), _ = compare_groups(a, three)
    assert figure.panels[2].marked is None and "One run of A: seed variation unknown" in figure.caption


def test_a_planted_difference_on_the_diagonal_of_a_same_architecture_reference_is_marked():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.9, (4, 4))
    shifted = base.copy()
    shifted[2, 2] -= 0.2  # layer blocks.2 of the model against blocks.2 of the reference
    runs_a = [base + 0.01 * rng.standard_normal((4, 4)) for _ in range(3)]
    runs_b = [shifted + 0.01 * rng.standard_normal((4, 4)) for _ in range(3)]

    def side(label, runs):
        return Group(label, [heatmap_figure(v, joint=False, tag="cka/reference") for v in runs])

    (figure,), _ = compare_groups(side("A", runs_a), side("B", runs_b))
    diff = figure.panels[2]
    expected = scipy_marks(runs_a, runs_b)
    np.testing.assert_array_equal(diff.marked, expected)
    assert diff.marked[2, 2] and diff.marked.sum() == 1
    # The same matrices as a model's layers with themselves: the diagonal is not tested.
    joint = [Group(g, [heatmap_figure(v) for v in runs]) for g, runs in (("A", runs_a), ("B", runs_b))]
    (figure,), _ = compare_groups(*joint)
    np.testing.assert_array_equal(figure.panels[2].marked, scipy_marks(runs_a, runs_b, skip_diagonal=True))
    assert not figure.panels[2].marked[2, 2]


def test_groups_from_the_same_distribution_mark_few_cells():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.3, 0.9, (4, 4))
    any_marked = 0
    for _ in range(40):
        runs_a = [base + 0.02 * rng.standard_normal((4, 4)) for _ in range(3)]
        runs_b = [base + 0.02 * rng.standard_normal((4, 4)) for _ in range(3)]
        a = Group("A", [heatmap_figure(v, joint=False) for v in runs_a])
        b = Group("B", [heatmap_figure(v, joint=False) for v in runs_b])
        (figure,), _ = compare_groups(a, b, alpha=0.05)
        np.testing.assert_array_equal(figure.panels[2].marked, scipy_marks(runs_a, runs_b))
        any_marked += bool(figure.panels[2].marked.any())
    assert any_marked <= 6  # BH under the global null: P(any mark) <= 5 %, so about 2 of 40


def test_cka_panels_say_whether_they_are_joint_and_it_round_trips_through_json():
    from lightning_cka.figures.cka import cka_panel
    from lightning_cka.figures.spec import from_json, to_json

    intra = cka_panel(np.eye(4), NAMES, NAMES, joint=True)
    cross = cka_panel(np.eye(4), NAMES, NAMES)
    assert intra.joint and not cross.joint
    for panel in (intra, cross):
        data = to_json(Figure("t", "t", (panel,)))
        assert from_json(data).panels[0].joint == panel.joint
        del data["panels"][0]["joint"]  # a figure from before the field: not joint
        assert from_json(data).panels[0].joint is False


def test_dots_pool_the_heads_of_every_run_and_give_per_layer_spread():
    def dots(values):
        return [Figure("attention/mean_distance", "d", (Dots(NAMES, (Series("", values),)),))]

    runs = [np.full((4, 2), 10.0), np.full((4, 2), 12.0)]
    group = Group("A", [dots(v) for v in runs])
    (figure,), _ = compare_groups(group, Group("B", [dots(np.full((4, 2), 5.0))]))
    pooled, means = figure.panels
    assert pooled.series[0].values.shape == (4, 4) and means.series[0].values.tolist() == [11.0] * 4
    np.testing.assert_allclose(means.series[0].error, np.std([10.0, 12.0], ddof=1))


def test_runs_with_other_layers_are_refused():
    other = [Figure("cka/intra", "CKA", (Heatmap(np.eye(3), NAMES[:3], NAMES[:3]),))]
    with pytest.raises(ValueError, match="monitor different layers"):
        compare_groups(Group("A", [heatmap_figure(np.eye(4))]), Group("B", [other]))


def test_a_figure_with_other_rows_is_left_out_and_the_others_are_compared():
    # A ViT without the skip connections of one block: its skip-ratio figure has one block fewer, its CKA does not.
    def run(blocks, value):
        ratios = Figure("residual/norm_ratio", "ratio", (Curves(NAMES[:blocks], (Series("", np.ones(blocks)),)),))
        return [*heatmap_figure(np.full((4, 4), value)), ratios]

    figures, apart = compare_groups(Group("no skip", [run(3, 0.6), run(3, 0.7)]), Group("intact", [run(4, 0.9)] * 2))
    assert [f.tag for f in figures] == ["cka/intra"] and list(apart) == ["residual/norm_ratio"]
    assert "monitor different layers (3: " in apart["residual/norm_ratio"]
    np.testing.assert_allclose(figures[0].panels[0].values, 0.65)  # the no-skip side's mean, from its two runs


def test_a_side_shows_the_curves_all_its_runs_drew():
    # A CLS-token model draws a class-token curve beside the patch tokens'; a pooled model only the latter.
    def curves(*series):
        return [Figure("residual/norm_ratio", "ratio", (Curves(NAMES, tuple(series)),))]

    cls = [curves(Series("class token", np.full(4, v)), Series("patch tokens", np.full(4, 2 * v))) for v in (1, 3)]
    pooled = [curves(Series("patch tokens", np.full(4, v))) for v in (5, 7)]
    (figure,), _ = compare_groups(Group("CLS", cls), Group("GAP", pooled))
    (panel,) = figure.panels
    assert [s.label for s in panel.series] == ["CLS: class token", "CLS: patch tokens", "GAP: patch tokens"]
    assert [s.values.tolist() for s in panel.series] == [[2.0] * 4, [4.0] * 4, [6.0] * 4]
    np.testing.assert_allclose(panel.series[2].error, np.std([5.0, 7.0], ddof=1))
    mixed = [cls[0], curves(Series("patch tokens", np.full(4, 9.0)))]  # a side shows only what all its runs drew
    (figure,), _ = compare_groups(Group("A", mixed), Group("GAP", pooled))
    assert [s.label for s in figure.panels[0].series] == ["A: patch tokens", "GAP: patch tokens"]
    with pytest.raises(ValueError, match="draw different curves"):
        one = [curves(Series("class token", np.ones(4))), pooled[0]]  # no curve that both runs of a side drew
        compare_groups(Group("A", one), Group("B", one))

"""Every verdict of every analysis, on probes built with known properties, against numbers computed here.

Each test plants a property (layers alike or in stages, lower layers matching, local heads, a class token riding the
skip connections, ...) in a probe's fields and checks the verdict it must get, its reverse, and the numbers quoted
with it (recomputed independently: scipy's t quantiles, explicit loops over layer pairs, scipy's Spearman).
"""

import itertools
import json

import numpy as np
import pytest

from lightning_cka.analyses import (
    AttentionStats,
    EffectiveRank,
    HeadCKA,
    LayerCKA,
    LinearProbe,
    Localization,
    ResidualRatio,
)
from lightning_cka.findings import (
    CANNOT_TELL,
    DOES_NOT,
    NOT_MEASURED,
    PARTLY,
    SHOWS,
    Criteria,
    Estimate,
    Evidence,
    RunProbes,
    Side,
    group_difference,
    seed_estimate,
)
from lightning_cka.result import CKAResult
from lightning_cka.stats import detectable_difference

st = pytest.importorskip("scipy.stats")

VIT = [f"blocks.{i}" for i in range(6)]
CNN = [f"layer{i // 2 + 1}.{i % 2}" for i in range(8)]
M = 8  # probe minibatches


def t95(dof):
    return st.t.ppf(0.975, dof)


def replicates(matrix, spread, seed=0):
    """(M, ...) leave-one-out replicates around `matrix` whose jackknife se is about `spread`."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((M, *np.shape(matrix)))
    noise -= noise.mean(axis=0)
    return np.asarray(matrix) + spread * noise / np.sqrt(M - 1)


def jackknife_half(values):
    values = np.asarray(values, dtype=np.float64)
    m = len(values)
    return t95(m - 1) * np.sqrt((m - 1) / m * np.sum((values - values.mean()) ** 2))


def alike(n, value=0.9):
    matrix = np.full((n, n), value)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def staged(n, stages=4, within=0.9, across=0.15):
    stage = np.arange(n) * stages // n
    matrix = np.where(stage[:, None] == stage[None, :], within, across)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def far_pairs_mean(matrix):
    n = len(matrix)
    gap = -(-n // 2)
    return np.mean([matrix[i, j] for i in range(n) for j in range(n) if j - i >= gap])


def vit_probe(analyses=None, **fields):
    """A ViT's probe with a CNN reference: alike ViT layers, staged CNN layers, heads and the rest by default."""
    base = {
        "layers": VIT,
        "reference_layers": CNN,
        "reference_label": "resnet18_cifar, trained (…/resnet/version_0/last.ckpt)",
        "intra": alike(6),
        "intra_replicates": replicates(alike(6), 0.005),
        "reference_intra": staged(8),
        "reference_intra_replicates": replicates(staged(8), 0.005, 1),
        "num_minibatches": M,
        "num_examples": 256,
        "attention_layers": VIT,
        "mean_attention_distance": np.full((6, 4), 15.0),
        "attention_entropy": np.full((6, 4), 2.0),
        "uniform_attention_distance": 16.5,
    }
    base.update(fields)
    base = {k: v for k, v in base.items() if v is not None}
    return CKAResult(base, analyses=analyses) if analyses is not None else CKAResult(base)


def one(result, label="run"):
    return Evidence([Side(label, [RunProbes(label, {0: result})])])


def finding(analysis, evidence, key):
    return next(f for f in analysis.findings(evidence) if f.key == key)


# ------------------------------------------------------------------------------------------------- layers alike


def test_alike_vit_and_staged_cnn_show_the_paper_with_the_far_layer_numbers():
    result = vit_probe()
    f = finding(LayerCKA(), one(result), "cka.structure")
    assert f.verdict == SHOWS
    far = far_pairs_mean(result.intra)
    half = jackknife_half([far_pairs_mean(r) for r in result.intra_replicates])
    assert f"{far:.3f} ± {half:.3f}" in dict(f.numbers)["the ViT: CKA of layers at least half the depth apart"]
    cnn_far = far_pairs_mean(result.reference_intra)
    assert f"{cnn_far:.3f}" in dict(f.numbers)["the ResNet: CKA of layers at least half the depth apart"]
    assert [fig.tag for fig in f.figures] == ["cka/intra", "cka/reference_intra"]


def test_a_cnn_whose_layers_are_alike_makes_it_partly_and_a_staged_vit_does_not_show():
    partly = finding(
        LayerCKA(), one(vit_probe(reference_intra=alike(8), reference_intra_replicates=None)), "cka.structure"
    )
    assert partly.verdict == PARTLY and "is not below 0.5" in partly.reason
    reverse = vit_probe(
        intra=staged(6, 3),
        intra_replicates=replicates(staged(6, 3), 0.005),
        reference_intra=alike(8),
        reference_intra_replicates=None,
    )
    assert finding(LayerCKA(), one(reverse), "cka.structure").verdict == DOES_NOT


def test_an_interval_holding_the_threshold_cannot_tell_and_the_criterion_is_overridable():
    matrix = alike(6, 0.52)
    noisy = vit_probe(intra=matrix, intra_replicates=replicates(matrix, 0.08), reference_intra=None)
    f = finding(LayerCKA(), one(noisy), "cka.structure")
    assert f.verdict == CANNOT_TELL and "holds 0.5" in f.reason and "reference model" in f.needs
    lowered = Evidence(one(noisy).sides, Criteria({"cka.far_alike": 0.2}, [LayerCKA()]))
    assert finding(LayerCKA(), lowered, "cka.structure").verdict == SHOWS


def test_without_the_attention_analysis_which_model_is_the_vit_is_not_known():
    result = vit_probe(
        analyses=[LayerCKA()],
        attention_layers=None,
        mean_attention_distance=None,
        attention_entropy=None,
        uniform_attention_distance=None,
    )
    f = finding(LayerCKA(), one(result), "cka.structure")
    assert f.verdict == NOT_MEASURED and "attention analysis" in f.needs


def test_a_layer_dominated_by_a_few_images_is_a_caveat():
    share = np.array([0.05, 0.7, 0.04, 0.03, 0.05, 0.04])
    f = finding(LayerCKA(), one(vit_probe(influence_share=share)), "cka.structure")
    assert "Caveat: in blocks.1" in f.statement and "70%" in f.statement
    quiet = finding(LayerCKA(), one(vit_probe(influence_share=np.full(6, 0.05))), "cka.structure")
    assert "Caveat" not in quiet.statement


# ------------------------------------------------------------------------------------------ cross-model layers


def corresponding(low=0.8, high=0.3):
    """(6 ViT, 8 CNN): the ViT's lowest quarter best matches the CNN's lower half, its top layers match little."""
    matrix = np.full((6, 8), 0.25)
    matrix[:2, :4] = low  # blocks.0-1 x layer1-2: the lower half of the CNN
    matrix[2:4, 4:6] = 0.6
    matrix[4:, 6:] = high
    for i in range(6):
        matrix[i] += 0.001 * np.arange(8)[::-1]  # a unique best per row
    return matrix


def test_lower_layers_corresponding_and_top_layers_matching_less_show_the_paper():
    matrix = corresponding()
    result = vit_probe(reference=matrix, reference_replicates=replicates(matrix, 0.01, 2))
    f = finding(LayerCKA(), one(result), "cka.correspondence")
    assert f.verdict == SHOWS
    best = matrix.max(axis=1)
    drop = best[:2].mean() - best[-2:].mean()
    half = jackknife_half([r.max(axis=1)[:2].mean() - r.max(axis=1)[-2:].mean() for r in result.reference_replicates])
    assert dict(f.numbers)["best-match CKA of the ViT's lowest quarter minus its top quarter"].startswith(
        f"{drop:.3f} ± {half:.3f}"
    )
    assert "blocks.0 → layer1.0" in f.statement


def test_a_reversed_correspondence_does_not_show_and_roles_can_be_swapped():
    reversed_ = corresponding()[::-1].copy()  # the ViT's top layers match the CNN's lower half and match best
    f = finding(
        LayerCKA(),
        one(vit_probe(reference=reversed_, reference_replicates=replicates(reversed_, 0.01))),
        "cka.correspondence",
    )
    assert f.verdict == DOES_NOT
    # the CNN as the model and the ViT as the reference: the same matrix transposed, the same verdict
    matrix = corresponding()
    swapped = CKAResult(
        {
            "layers": CNN,
            "reference_layers": VIT,
            "label": "resnet18_cifar",
            "reference": matrix.T,
            "reference_replicates": np.swapaxes(replicates(matrix, 0.01, 2), 1, 2),
            "num_minibatches": M,
            "reference_attention_layers": VIT,
            "reference_mean_attention_distance": np.full((6, 4), 15.0),
            "reference_uniform_attention_distance": 16.5,
        }
    )
    assert finding(LayerCKA(), one(swapped), "cka.correspondence").verdict == SHOWS


def test_no_reference_is_not_measured_and_says_what_would_measure_it():
    f = finding(LayerCKA(), one(vit_probe()), "cka.correspondence")
    assert f.verdict == NOT_MEASURED and "reference" in f.needs


# --------------------------------------------------------------------------------------------- attention heads


def distances(lower_local=(), upper_local=(), local=3.0, far=15.0):
    values = np.full((6, 4), far)
    for layer, head in lower_local + upper_local:
        values[layer, head] = local
    return values


def test_local_heads_in_the_lower_half_only_show_the_paper():
    d = distances(lower_local=((0, 0), (0, 1), (1, 2)))
    f = finding(AttentionStats(), one(vit_probe(mean_attention_distance=d)), "attention.local_global")
    assert f.verdict == SHOWS
    assert dict(f.numbers)["share of local heads, lower half"] == f"{round(100 * 3 / 12)} %"
    assert "8.2 px" in f.statement  # 0.5 of 16.5 px


def test_no_local_head_does_not_show_and_local_heads_everywhere_are_partly():
    f = finding(AttentionStats(), one(vit_probe()), "attention.local_global")
    assert f.verdict == DOES_NOT and "CutMix" in f.needs
    both = distances(lower_local=((0, 0),), upper_local=((4, 0), (5, 1)))
    assert (
        finding(AttentionStats(), one(vit_probe(mean_attention_distance=both)), "attention.local_global").verdict
        == PARTLY
    )
    # the analysis's own threshold decides what is local: at 0.1 of 16.5 px no head of 3 px is local any more
    lowered = AttentionStats(local_threshold=0.1)
    shown = distances(lower_local=((0, 0),))
    assert finding(lowered, one(vit_probe(mean_attention_distance=shown)), "attention.local_global").verdict == DOES_NOT


def scale_side(label, shares, train_examples, seed=0):
    runs = []
    for i, share in enumerate(shares):
        local = [(0, h) for h in range(round(share * 12))]  # heads of the lower half (3 layers x 4)
        d = distances(lower_local=tuple((h // 4, h % 4) for _, h in local))
        settings = json.dumps({"train_examples": train_examples})
        runs.append(RunProbes(f"{label}-{i}", {0: vit_probe(mean_attention_distance=d, settings=settings)}))
    return Side(label, runs)


def test_less_data_fewer_local_heads_shows_across_seeds_and_the_reverse_does_not():
    small = scale_side("5 %", [0.0, 0.0, 1 / 12], 2500)
    large = scale_side("100 %", [4 / 12, 5 / 12, 4 / 12], 50000)
    f = finding(AttentionStats(), Evidence([small, large]), "attention.data_scale")
    test = st.ttest_ind([0, 0, 1 / 12], [4 / 12, 5 / 12, 4 / 12], equal_var=False)
    assert f.verdict == SHOWS and f"p = {test.pvalue:.2g}" in f.reason
    swapped = Evidence(
        [scale_side("5 %", [0.0, 0.0, 1 / 12], 50000), scale_side("100 %", [4 / 12, 5 / 12, 4 / 12], 2500)]
    )
    assert finding(AttentionStats(), swapped, "attention.data_scale").verdict == DOES_NOT


def test_data_scale_needs_seeds_recorded_sizes_and_local_heads():
    one_each = Evidence([scale_side("A", [0.0], 2500), scale_side("B", [0.4], 50000)])
    f = finding(AttentionStats(), one_each, "attention.data_scale")
    assert f.verdict == CANNOT_TELL and f.reason == "one run per side: seed variation unknown"
    unknown = Evidence([scale_side("A", [0.0, 0.1, 0.0], 0), scale_side("B", [0.4, 0.5, 0.4], 0)])
    assert "not recorded" in finding(AttentionStats(), unknown, "attention.data_scale").reason
    none = Evidence([scale_side("A", [0.0, 0.0], 2500), scale_side("B", [0.0, 0.0], 50000)])
    f = finding(AttentionStats(), none, "attention.data_scale")
    assert f.verdict == DOES_NOT and "neither side" in f.reason


# ------------------------------------------------------------------------------------------ heads vs the CNN


def heads_probe(slope, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.uniform(4, 16, (6, 4))
    lower = 0.8 + slope * (d - 10) / 10 + noise * rng.standard_normal((6, 4))
    head_reference = np.repeat(lower[..., None], 8, axis=2)  # (La, H, Lr): the same for every reference layer
    return vit_probe(mean_attention_distance=d, head_layers=VIT, head_reference=head_reference), d, lower


def test_local_heads_more_like_the_cnn_show_and_the_reverse_does_not():
    result, d, lower = heads_probe(-0.3, 0.02)
    f = finding(HeadCKA(), one(result), "heads.local_like_cnn")
    rho = st.spearmanr(d.ravel(), lower.ravel()).statistic
    assert f.verdict == SHOWS and f"{rho:.3f}" in f.reason
    assert finding(HeadCKA(), one(heads_probe(+0.3, 0.02)[0]), "heads.local_like_cnn").verdict == DOES_NOT


def test_the_permutation_p_matches_exact_enumeration():
    from lightning_cka.analyses.heads import permutation_p

    rng = np.random.default_rng(3)
    d = rng.uniform(4, 16, (1, 7))
    lower = 0.8 - 0.02 * d + 0.05 * rng.standard_normal((1, 7))
    result = vit_probe(
        attention_layers=["blocks.0"],
        mean_attention_distance=d,
        head_layers=["blocks.0"],
        head_reference=np.repeat(lower[..., None], 8, axis=2),
    )
    observed = st.spearmanr(d.ravel(), lower.ravel()).statistic
    exact = np.mean(
        [st.spearmanr(p, lower.ravel()).statistic <= observed + 1e-12 for p in itertools.permutations(d.ravel())]
    )
    assert permutation_p(result) == pytest.approx(exact, abs=0.02)


def test_a_correlation_a_shuffle_gives_as_often_cannot_tell():
    result, *_ = heads_probe(-0.02, 0.2, seed=5)
    f = finding(HeadCKA(), one(result), "heads.local_like_cnn")
    assert f.verdict in (CANNOT_TELL, DOES_NOT) and f.verdict != SHOWS


# ---------------------------------------------------------------------------------------- skip connections


def residual_probe(cls_lower, cls_upper, vit_ratio=10.0, cnn_ratio=None):
    blocks = VIT
    patch = np.full((6, 2), vit_ratio)
    cls = np.where(np.arange(6)[:, None] < 3, vit_ratio * cls_lower, vit_ratio * cls_upper) * np.ones((6, 2))
    fields = {
        "residual_blocks": blocks,
        "residual_branches": ["attention", "mlp"],
        "residual_ratio": np.concatenate([cls[..., None], np.repeat(patch[..., None], 64, axis=2)], axis=2),
        "residual_ratio_cls": cls,
        "residual_ratio_patch": patch,
        "residual_prefix_tokens": np.ones(6, dtype=np.int64),
    }
    if cnn_ratio is not None:
        fields |= {
            "reference_residual_blocks": CNN,
            "reference_residual_branches": ["branch"],
            "reference_residual_ratio": np.full((8, 1, 1), cnn_ratio),
            "reference_residual_ratio_cls": np.full((8, 1), np.nan),
            "reference_residual_ratio_patch": np.full((8, 1), cnn_ratio),
            "reference_residual_prefix_tokens": np.zeros(8, dtype=np.int64),
        }
    return vit_probe(**fields)


def test_a_class_token_riding_the_skip_in_the_lower_half_shows_and_the_reverse_does_not():
    f = finding(ResidualRatio(), one(residual_probe(5.0, 0.5)), "residual.cls_rides_skip")
    assert f.verdict == SHOWS and f"{np.log10(5.0):.3f}" in f.reason
    assert finding(ResidualRatio(), one(residual_probe(0.5, 2.0)), "residual.cls_rides_skip").verdict == DOES_NOT
    assert finding(ResidualRatio(), one(residual_probe(5.0, 8.0)), "residual.cls_rides_skip").verdict == PARTLY


def test_no_class_token_is_not_measured_and_the_caption_does_not_talk_of_one():
    result = residual_probe(1.0, 1.0)
    result.residual_ratio_cls = np.full((6, 2), np.nan)
    f = finding(ResidualRatio(), one(result), "residual.cls_rides_skip")
    assert f.verdict == NOT_MEASURED and "global_pool='token'" in f.needs
    caption = next(fig for fig in result.figures() if fig.tag == "residual/norm_ratio").caption
    assert "no class token" in caption and "rides" not in caption


def test_vit_ratios_far_above_the_cnn_show():
    assert finding(ResidualRatio(), one(residual_probe(1, 1, 10.0, 1.0)), "residual.vit_vs_cnn").verdict == SHOWS
    assert finding(ResidualRatio(), one(residual_probe(1, 1, 10.0, 8.0)), "residual.vit_vs_cnn").verdict == DOES_NOT
    assert finding(ResidualRatio(), one(residual_probe(1, 1)), "residual.vit_vs_cnn").verdict == NOT_MEASURED


# ------------------------------------------------------------------------------------- localization, probes, rank


def localization_probe(matrix):
    return vit_probe(
        localization=matrix,
        localization_grid=np.array([4, 4]),
        localization_stride=4.0,
        localization_layer="blocks.5",
        localization_input="patch_embed",
    )


def test_tokens_most_similar_to_their_own_patch_show_and_shuffled_ones_do_not():
    own = np.full((16, 16), 0.1) + 0.5 * np.eye(16)
    f = finding(Localization(), one(localization_probe(own)), "localization.tokens_localized")
    assert f.verdict == SHOWS and dict(f.numbers)["mean distance to the most similar input patch"].startswith("0.0 px")
    shifted = np.roll(own, 5, axis=1)
    assert (
        finding(Localization(), one(localization_probe(shifted)), "localization.tokens_localized").verdict == DOES_NOT
    )


def probe_probe(accuracy, pool):
    return vit_probe(
        linear_probe_accuracy=np.asarray(accuracy),
        linear_probe_chance=0.1,
        linear_probe_examples=np.array([128, 128]),
        settings=json.dumps({"pool": pool}),
    )


def test_decodability_rising_with_depth_and_where_the_class_is():
    accuracy = [[0.2, 0.25], [0.3, 0.3], [0.4, 0.35], [0.5, 0.4], [0.6, 0.4], [0.7, 0.45]]
    depth = finding(LinearProbe(), one(probe_probe(accuracy, "token")), "linear_probe.depth")
    gain = 0.7 - 0.25
    half = t95(127) * np.sqrt((0.7 * 0.3 + 0.25 * 0.75) / 128)
    assert depth.verdict == SHOWS and f"{gain:.3f} ± {half:.3f}" in depth.reason
    assert finding(LinearProbe(), one(probe_probe(accuracy, "token")), "linear_probe.cls_vs_pooled").verdict == SHOWS
    assert finding(LinearProbe(), one(probe_probe(accuracy, "avg")), "linear_probe.cls_vs_pooled").verdict == DOES_NOT
    unknown = finding(LinearProbe(), one(probe_probe(accuracy, "")), "linear_probe.cls_vs_pooled")
    assert unknown.verdict == CANNOT_TELL and "global_pool" in unknown.needs
    flat = [[0.5, 0.5]] * 6  # no gain: the interval holds 0
    assert finding(LinearProbe(), one(probe_probe(flat, "avg")), "linear_probe.depth").verdict == CANNOT_TELL
    falling = accuracy[::-1]
    assert finding(LinearProbe(), one(probe_probe(falling, "avg")), "linear_probe.depth").verdict == DOES_NOT


def test_the_class_token_statement_of_several_seeds_gives_their_means():
    tops = [(0.40, 0.40), (0.50, 0.30), (0.45, 0.35)]  # the first seed alone would read "0.400 and 0.400"
    runs = [RunProbes(str(i), {0: probe_probe([[0.2, 0.2]] * 5 + [top], "token")}) for i, top in enumerate(tops)]
    f = finding(LinearProbe(), Evidence([Side("A", runs)]), "linear_probe.cls_vs_pooled")
    assert "class-token probe reaches 0.450 and the pooled-token probe 0.350 (mean of 3 runs)" in f.statement


def test_a_collapsed_layer_is_found():
    ranks = np.array([20.0, 18.0, 1.4, 15.0, 14.0, 12.0])
    f = finding(EffectiveRank(), one(vit_probe(effective_rank=ranks)), "rank.no_collapse")
    assert f.verdict == DOES_NOT and "blocks.2" in f.statement
    assert finding(EffectiveRank(), one(vit_probe(effective_rank=ranks + 5)), "rank.no_collapse").verdict == SHOWS


# --------------------------------------------------------------------------------------------- the statistics


def test_several_seeds_give_the_mean_with_the_t_interval_over_seeds():
    values = [0.80, 0.84, 0.79]
    estimate = seed_estimate(values)
    assert estimate.value == pytest.approx(np.mean(values))
    assert estimate.half == pytest.approx(t95(2) * np.std(values, ddof=1) / np.sqrt(3))
    side = Side(
        "A", [RunProbes(str(i), {0: vit_probe(intra=alike(6, v), intra_replicates=None)}) for i, v in enumerate(values)]
    )
    f = finding(LayerCKA(), Evidence([side]), "cka.structure")
    assert "3 seeds" in dict(f.numbers)["the ViT: CKA of layers at least half the depth apart"]


def test_group_difference_is_welchs_test_and_its_detectable_difference_has_the_power_it_claims():
    a, b = [0.30, 0.34, 0.29, 0.33], [0.25, 0.22, 0.27]
    test = group_difference(a, b)
    assert test.p == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-6)
    assert group_difference([0.3], [0.2]).p != group_difference([0.3], [0.2]).p  # NaN: one run a side, no test
    rng = np.random.default_rng(0)
    delta = detectable_difference(1.0, 5, 1.0, 5)
    sims = 4000
    x, y = rng.standard_normal((sims, 5)) + delta, rng.standard_normal((sims, 5))
    power = np.mean(st.ttest_ind(x, y, axis=1, equal_var=False).pvalue < 0.05)
    assert 0.7 < power < 0.9


def test_criteria_are_checked_by_name_and_value():
    with pytest.raises(ValueError, match=r"no criterion 'cka\.far'.*cka\.far_alike"):
        Criteria({"cka.far": 0.5}, [LayerCKA()])
    with pytest.raises(ValueError, match="finite number"):
        Criteria({"cka.far_alike": "high"}, [LayerCKA()])
    table = Criteria({"cka.far_alike": 0.7}, [LayerCKA()]).table([LayerCKA()])
    assert table[0][:3] == ("cka.far_alike", 0.7, 0.5)


def test_an_estimate_decides_only_when_its_whole_interval_is_on_one_side():
    from lightning_cka.findings import threshold_verdict

    assert threshold_verdict(Estimate(0.6, 0.05), 0.5, True, "x")[0] == SHOWS
    assert threshold_verdict(Estimate(0.52, 0.05), 0.5, True, "x")[0] == CANNOT_TELL
    assert threshold_verdict(Estimate(0.4, 0.05), 0.5, True, "x")[0] == DOES_NOT
    assert threshold_verdict(Estimate(0.4, 0.05), 0.5, False, "x")[0] == SHOWS
    assert threshold_verdict(Estimate(float("nan")), 0.5, True, "x")[0] == NOT_MEASURED

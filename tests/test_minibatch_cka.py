import numpy as np
import pytest
import reference as ref
import torch

from lightning_cka import MinibatchCKA
from lightning_cka.functional import gram
from lightning_cka.functional.hsic import ShiftPermutations


def batches(rng, num_batches, n, shapes):
    out = []
    for _ in range(num_batches):
        base = torch.randn(n, 6, generator=rng, dtype=torch.float64)
        layers = [base]
        for shape in shapes:
            mix = torch.randn(6, int(np.prod(shape)), generator=rng, dtype=torch.float64)
            noise = torch.randn(n, int(np.prod(shape)), generator=rng, dtype=torch.float64)
            layers.append((torch.tanh(base @ mix) + 0.5 * noise).reshape(n, *shape))
        out.append(layers)
    return out


def as_numpy(all_batches):
    return [[t.numpy() for t in layers] for layers in all_batches]


@pytest.mark.parametrize("n", [4, 7, 64, 512])
def test_intra_model_matches_reference_over_several_updates(rng, n):
    data = batches(rng, 3, n, [(5, 6), (3, 4, 4)])
    metric = MinibatchCKA()
    for layers in data:
        metric.update(layers)
    out = metric.compute()
    np.testing.assert_allclose(out.numpy(), ref.minibatch_cka(as_numpy(data), as_numpy(data)), rtol=1e-6)
    assert torch.equal(out, out.T)
    assert torch.equal(out.diagonal(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("n", [4, 33, 256])
def test_cross_model_matches_reference(rng, n):
    data_a = batches(rng, 4, n, [(5, 6)])
    data_b = batches(rng, 4, n, [(12,), (2, 3, 3)])
    metric = MinibatchCKA()
    for xs, ys in zip(data_a, data_b, strict=False):
        metric.update(xs, ys)
    out = metric.compute()
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.numpy(), ref.minibatch_cka(as_numpy(data_a), as_numpy(data_b)), rtol=1e-6)


def test_minibatch_estimate_is_not_the_mean_of_per_batch_ckas(rng):
    data = batches(rng, 2, 16, [(4,)])
    data[1] = [5.0 * t for t in data[1]]  # the second minibatch has 25x the HSIC: the ratio of sums weighs it more
    metric = MinibatchCKA()
    per_batch = []
    for layers in data:
        metric.update(layers)
        per_batch.append(MinibatchCKA()(layers)[0, 1].item())
    assert metric.compute()[0, 1].item() != pytest.approx(np.mean(per_batch), rel=1e-3)
    assert metric.compute()[0, 1].item() == pytest.approx(ref.minibatch_cka(as_numpy(data), as_numpy(data))[0, 1])


def test_gram_input_equals_feature_input(rng):
    data_a = batches(rng, 2, 20, [(5, 6)])
    data_b = batches(rng, 2, 20, [(3, 2, 2)])
    from_features, from_grams, from_stacked = MinibatchCKA(), MinibatchCKA(), MinibatchCKA()
    for xs, ys in zip(data_a, data_b, strict=False):
        from_features.update(xs, ys)
        from_grams.update([gram(t) for t in xs], [gram(t) for t in ys], grams=True)
        from_stacked.update(torch.stack([gram(t) for t in xs]), torch.stack([gram(t) for t in ys]), grams=True)
    torch.testing.assert_close(from_grams.compute(), from_features.compute(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(from_stacked.compute(), from_features.compute(), rtol=1e-9, atol=1e-12)


def test_forward_returns_batch_value_and_accumulates(rng):
    data = batches(rng, 2, 16, [(4,)])
    metric = MinibatchCKA()
    first = metric(data[0])
    torch.testing.assert_close(first, MinibatchCKA()(data[0]))
    metric(data[1])
    np.testing.assert_allclose(metric.compute().numpy(), ref.minibatch_cka(as_numpy(data), as_numpy(data)), rtol=1e-6)


def test_reset_allows_other_layers(rng):
    metric = MinibatchCKA()
    metric.update(batches(rng, 1, 8, [(3,)])[0])
    metric.reset()
    metric.update(batches(rng, 1, 8, [(3,), (4,)])[0])
    assert metric.compute().shape == (3, 3)


def test_errors_name_the_problem(rng):
    metric = MinibatchCKA()
    metric.update(batches(rng, 1, 8, [(3,)])[0])
    with pytest.raises(ValueError, match="same layers"):
        metric.update(batches(rng, 1, 8, [(3,), (4,)])[0])
    with pytest.raises(ValueError, match="same minibatch"):
        MinibatchCKA().update([torch.randn(8, 3)], [torch.randn(9, 3)])
    with pytest.raises(ValueError, match="at least 4 examples"):
        MinibatchCKA().update([torch.randn(3, 3)])
    with pytest.raises(ValueError, match="before any update"):
        MinibatchCKA().compute()
    with pytest.raises(ValueError, match="same layers"):
        MinibatchCKA(num_layers_a=2).update([torch.randn(8, 3)])
    with pytest.raises(ValueError, match="same layers"):
        MinibatchCKA(num_layers_a=1).update([torch.randn(8, 3)], [torch.randn(8, 3)])
    with pytest.raises(ValueError, match="without num_layers_a"):
        MinibatchCKA(num_layers_b=2)
    with pytest.raises(ValueError, match="has 2 names"):
        MinibatchCKA(num_layers_a=3, layer_names_a=["a", "b"])
    with pytest.raises(ValueError, match=r"\(n, n\) Gram"):
        MinibatchCKA().update([torch.randn(8, 3)], grams=True)


def test_declared_sizes_allocate_states_up_front():
    metric = MinibatchCKA(layer_names_a=["a", "b"], layer_names_b=["c"], num_minibatches=3, permutations=2)
    assert metric.cross.shape == (3, 2, 1) and metric.null.shape == (2, 2, 1) and metric.sizes.shape == (3,)
    metric.update([torch.randn(8, 3), torch.randn(8, 2)], [torch.randn(8, 4)], index=2)
    assert metric.compute().shape == (2, 1) and metric.estimate.num_minibatches == 1
    with pytest.raises(IndexError, match="outside"):
        metric.update([torch.randn(8, 3), torch.randn(8, 2)], [torch.randn(8, 4)], index=3)
    with pytest.raises(ValueError, match="already added"):
        metric.update([torch.randn(8, 3), torch.randn(8, 2)], [torch.randn(8, 4)], index=2)


def leave_one_out_reference(data_a, data_b, weights=None):
    """Jackknife by a plain loop: the reference minibatch CKA with each minibatch dropped in turn."""
    m = len(data_a)
    replicates = np.stack(
        [
            ref.minibatch_cka([d for j, d in enumerate(data_a) if j != i], [d for j, d in enumerate(data_b) if j != i])
            for i in range(m)
        ]
    )
    se = np.sqrt((m - 1) / m * ((replicates - replicates.mean(axis=0)) ** 2).sum(axis=0))
    return replicates, se


@pytest.mark.parametrize("num_batches", [2, 5])
def test_jackknife_standard_error_matches_a_leave_one_out_loop(rng, num_batches):
    data_a = batches(rng, num_batches, 12, [(5, 6)])
    data_b = batches(rng, num_batches, 12, [(7,), (2, 3, 3)])
    metric = MinibatchCKA(num_layers_a=2, num_layers_b=3, num_minibatches=num_batches)
    for i in reversed(range(num_batches)):  # order does not matter, indices do
        metric.update(data_a[i], data_b[i], index=i)
    metric.compute()
    replicates, se = leave_one_out_reference(as_numpy(data_a), as_numpy(data_b))
    np.testing.assert_allclose(metric.estimate.replicates.numpy(), replicates, rtol=1e-6)
    np.testing.assert_allclose(metric.estimate.se.numpy(), se, rtol=1e-6, atol=1e-12)


def test_one_minibatch_has_no_standard_error(rng):
    metric = MinibatchCKA()
    metric.update(batches(rng, 1, 12, [(5,)])[0])
    metric.compute()
    assert torch.isnan(metric.estimate.se[0, 1]) and metric.estimate.replicates.shape[0] == 0


def test_size_weighting_sums_unnormalized_inner_products_as_efficient_cka_does(rng):
    sizes = (40, 6)  # a small last minibatch is where the two weightings differ
    data = [batches(rng, 1, n, [(5,)])[0] for n in sizes]
    equal, size = MinibatchCKA(), MinibatchCKA(minibatch_weights="size")
    for layers in data:
        equal.update(layers)
        size.update(layers)
    cross, self_a, self_b = 0.0, 0.0, 0.0
    for layers in data:  # google's efficient_CKA: sums of <U(K), U(L)> = n(n-3) HSIC, normalized once
        n = layers[0].shape[0]
        k, l = (ref.gram(t.numpy()) for t in layers)  # noqa: E741
        cross += n * (n - 3) * ref.hsic_unbiased(k, l)
        self_a += n * (n - 3) * ref.hsic_unbiased(k, k)
        self_b += n * (n - 3) * ref.hsic_unbiased(l, l)
    assert size.compute()[0, 1].item() == pytest.approx(cross / np.sqrt(self_a * self_b), rel=1e-9)
    assert equal.compute()[0, 1].item() == pytest.approx(ref.minibatch_cka(as_numpy(data), as_numpy(data))[0, 1])
    assert abs(size.compute()[0, 1].item() - equal.compute()[0, 1].item()) > 1e-4


def test_null_products_are_the_hsic_of_shuffled_pairings(rng):
    data_a = batches(rng, 2, 10, [(4,)])
    data_b = batches(rng, 2, 10, [(6,)])
    metric = MinibatchCKA(num_layers_a=2, num_layers_b=2, num_minibatches=2, permutations=3, seed=7)
    for i in range(2):
        metric.update(data_a[i], data_b[i], index=i)
    null = np.zeros((3, 2, 2))
    for i in range(2):
        for k, perm in enumerate(metric._permutations(i, 10, torch.device("cpu"))):
            for a, xa in enumerate(data_a[i]):
                for b, xb in enumerate(data_b[i]):
                    null[k, a, b] += ref.hsic_unbiased(ref.gram(xa.numpy()), ref.gram(xb.numpy()[perm.numpy()]))
    np.testing.assert_allclose(metric.null.numpy(), null, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    ("n", "seed", "kind"),
    [(16, 3, list), (24, 4, ShiftPermutations)],  # below 20 examples uniform permutations, from 20 on shifts
)
def test_null_threshold_is_calibrated_for_independent_layers(n, seed, kind):
    """Independent random layers: the fraction of cells above the 19-permutation threshold is near 5%."""
    g = torch.Generator().manual_seed(seed)
    exceed, cells = 0, 0
    for _ in range(40):
        metric = MinibatchCKA(
            num_layers_a=4,
            num_layers_b=4,
            num_minibatches=3,
            permutations=19,
            seed=int(torch.randint(0, 10**6, (1,), generator=g)),
        )
        for i in range(3):
            xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(4)]
            ys = [torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(4)]
            metric.update(xs, ys, index=i)
        assert isinstance(metric._permutations(0, n, torch.device("cpu")), kind)
        value = metric.compute()
        exceed += int((value.abs() > metric.estimate.null).sum())
        cells += value.numel()
    rate = exceed / cells  # 640 cells: the binomial sd of a 5% rate is 0.9 points
    assert 0.025 < rate < 0.08, rate


def test_related_layers_exceed_the_null():
    g = torch.Generator().manual_seed(4)
    metric = MinibatchCKA(num_layers_a=1, num_layers_b=1, num_minibatches=2, permutations=19)
    for i in range(2):
        x = torch.randn(32, 6, generator=g, dtype=torch.float64)
        metric.update([x], [x @ torch.randn(6, 6, generator=g, dtype=torch.float64)], index=i)
    assert float(metric.compute()) > float(metric.estimate.null)  # torchmetrics squeezes a 1 x 1 result


def test_too_few_permutations_can_never_be_significant(rng):
    metric = MinibatchCKA(num_layers_a=1, num_layers_b=1, permutations=5)
    metric.update(batches(rng, 1, 16, [])[0], batches(rng, 1, 16, [])[0])
    metric.compute()
    assert torch.isinf(metric.estimate.null).all()


def test_nan_layer_gives_nan_row_and_column_and_one_warning_naming_it(rng):
    data = batches(rng, 3, 16, [(5,), (4,)])
    data[1][1] = data[1][1].clone()
    data[1][1][0, 0] = float("inf")
    metric = MinibatchCKA(layer_names_a=["stem", "block1", "block2"])
    for layers in data:
        metric.update(layers)
    with pytest.warns(UserWarning, match="block1") as record:
        out = metric.compute()
    assert len([w for w in record if "CKA is NaN" in str(w.message)]) == 1
    assert torch.isnan(out[1]).all() and torch.isnan(out[:, 1]).all()
    good = [0, 2]
    expected = ref.minibatch_cka(*[[[layers[i].numpy() for i in good] for layers in data]] * 2)
    np.testing.assert_allclose(out[good][:, good].numpy(), expected, rtol=1e-6)


def test_plot_returns_labeled_heatmap(rng):
    metric = MinibatchCKA(layer_names_a=["a", "b"], layer_names_b=["c", "d", "e"])
    data_a = batches(rng, 1, 8, [(3,)])
    data_b = batches(rng, 1, 8, [(3,), (2,)])
    metric.update(data_a[0], data_b[0])
    fig, ax = metric.plot()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c", "d", "e"]
    assert fig is ax.figure

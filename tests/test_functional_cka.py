import numpy as np
import pytest
import reference as ref
import torch

import lightning_cka.functional.cka as cka_module
import lightning_cka.functional.hsic as hsic_module
from lightning_cka.functional import cka_matrix, gram, hsic_biased, hsic_unbiased, linear_cka

SHAPES = [(12,), (5, 6), (3, 4, 4)]  # trailing dims: vectors, (T, D) tokens, (C, H, W) conv maps
BATCH_SIZES = [4, 5, 17, 128, 512]


def randn(rng, *shape):
    return torch.randn(*shape, generator=rng, dtype=torch.float64)


def related(rng, x, shape):
    """A representation that shares structure with x: a random linear map of it plus a nonlinearity and noise."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    features = int(np.prod(shape))
    mixed = torch.tanh(flat @ randn(rng, flat.shape[1], features)) + 0.3 * randn(rng, n, features)
    return mixed.reshape(n, *shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [4, 33])
def test_gram_matches_reference(rng, shape, n):
    x = randn(rng, n, *shape)
    np.testing.assert_allclose(gram(x).numpy(), ref.gram(x.numpy()), rtol=1e-10, atol=1e-10)


def test_gram_of_channels_last_equals_contiguous(rng):
    x = randn(rng, 6, 3, 5, 7)
    torch.testing.assert_close(gram(x.to(memory_format=torch.channels_last)), gram(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gram_of_low_precision_input_is_float32_and_close(rng, dtype):
    x = randn(rng, 16, 40).to(dtype)
    out = gram(x)
    assert out.dtype == torch.float32
    expected = ref.gram(x.to(torch.float64).numpy())  # exact Gram of the rounded input
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-4)


def test_gram_centering_changes_nothing_estimators_see(rng):
    x = randn(rng, 20, 7) + 100.0
    np.testing.assert_allclose(gram(x, center=True).numpy(), ref.gram(x.numpy() - x.numpy().mean(0)), atol=1e-9)
    for hsic in (hsic_biased, hsic_unbiased):
        assert torch.isclose(hsic(gram(x), gram(x)), hsic(gram(x, center=True), gram(x, center=True)), rtol=1e-9)


def test_centered_gram_of_a_constant_layer_is_exactly_zero():
    for value in (0.1, 3.7e4, -2.2e-3):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.full((7, 3, 5), value, dtype=dtype)
            assert torch.count_nonzero(gram(x, center=True)) == 0


def test_gram_chunks_give_the_same_result(rng, monkeypatch):
    x = randn(rng, 9, 3, 10, 10).to(torch.float32)
    whole = gram(x, center=True)
    monkeypatch.setattr(hsic_module, "_GRAM_CHUNK_BYTES", 9 * 4 * 7)  # 7 features per chunk
    torch.testing.assert_close(gram(x, center=True), whole, rtol=1e-6, atol=1e-4)


def test_gram_rejects_vectors():
    with pytest.raises(ValueError, match=r"\(n, \.\.\.\)"):
        gram(torch.ones(5))


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_hsic_estimators_match_reference(rng, n):
    x = randn(rng, n, 6)
    y = related(rng, x, (4, 3))
    k, l = gram(x), gram(y)  # noqa: E741
    for ours, theirs in ((hsic_biased, ref.hsic_biased), (hsic_unbiased, ref.hsic_unbiased)):
        expected = theirs(k.numpy(), l.numpy())
        np.testing.assert_allclose(ours(k, l).item(), expected, rtol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_hsic_unbiased_needs_four_examples(n):
    with pytest.raises(ValueError, match="at least 4 examples"):
        hsic_unbiased(torch.eye(n), torch.eye(n))


def test_hsic_rejects_mismatched_grams():
    with pytest.raises(ValueError, match="same n examples"):
        hsic_unbiased(torch.eye(5), torch.eye(6))
    with pytest.raises(ValueError, match=r"\(n, n\) Gram"):
        hsic_biased(torch.ones(5, 4), torch.ones(5, 4))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize(("shape_x", "shape_y"), [((3,), (2, 2)), ((8, 40), (3, 30, 30))])
def test_linear_cka_matches_reference(rng, unbiased, n, shape_x, shape_y):
    # (3,) and (2, 2) have fewer features than examples for n >= 5: the feature-space path.
    x = randn(rng, n, *shape_x)
    y = related(rng, x, shape_y)
    expected = ref.linear_cka(x.numpy(), y.numpy(), unbiased=unbiased)
    np.testing.assert_allclose(linear_cka(x, y, unbiased=unbiased).item(), expected, rtol=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_with_few_features_builds_no_gram(rng, monkeypatch, unbiased):
    def no_gram(*args, **kwargs):
        raise AssertionError("an (n, n) Gram was built")

    monkeypatch.setattr(cka_module, "gram", no_gram)
    x = randn(rng, 300, 10)
    y = related(rng, x, (20,))
    expected = ref.linear_cka(x.numpy(), y.numpy(), unbiased=unbiased)
    np.testing.assert_allclose(linear_cka(x, y, unbiased=unbiased).item(), expected, rtol=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_cka_matrix_matches_reference(rng, unbiased, n):
    x = randn(rng, n, 6)
    xs = [x, related(rng, x, (5, 6)), related(rng, x, (3, 4, 4))]
    ys = [related(rng, x, (12,)), randn(rng, n, 2, 3, 3)]
    np.testing.assert_allclose(
        cka_matrix(xs, ys, unbiased=unbiased).numpy(),
        ref.cka_matrix([t.numpy() for t in xs], [t.numpy() for t in ys], unbiased=unbiased),
        rtol=1e-6,
        atol=1e-12,
    )
    intra = cka_matrix(xs, unbiased=unbiased)
    np.testing.assert_allclose(
        intra.numpy(), ref.cka_matrix(*[[t.numpy() for t in xs]] * 2, unbiased=unbiased), rtol=1e-6
    )
    assert torch.equal(intra, intra.T)
    assert torch.equal(intra.diagonal(), torch.ones(3, dtype=torch.float64))


def test_cka_matrix_uses_one_product_per_block(rng, monkeypatch):
    calls = []
    real_addmm = torch.Tensor.addmm_

    def counting_addmm(self, a, b):
        calls.append(a.shape)
        return real_addmm(self, a, b)

    xs = [randn(rng, 32, 5) for _ in range(6)]
    grams = torch.stack([gram(t) for t in xs])
    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm)
    hsic_module._pairwise_hsic(grams)
    assert calls == [(6, 32 * 32)]  # one (L, n²) x (n², L) product for all 36 pairs


def test_blocked_hsic_equals_single_product(rng, monkeypatch):
    x = randn(rng, 40, 6)
    xs = [x, related(rng, x, (7,)), randn(rng, 40, 3)]
    whole = cka_matrix(xs)
    monkeypatch.setattr(hsic_module, "_HSIC_BLOCK_BYTES", 3 * 40 * 8 * 7)  # 7 rows per block
    torch.testing.assert_close(cka_matrix(xs), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cka_of_low_precision_features_is_float64_and_close(rng, dtype):
    x = randn(rng, 64, 10)
    xs = [x, related(rng, x, (4, 5)), related(rng, x, (2, 3, 3))]
    low = [t.to(dtype) for t in xs]
    expected = ref.cka_matrix(*[[t.to(torch.float64).numpy() for t in low]] * 2, unbiased=True)
    out = cka_matrix(low)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_cka_matrix_input_errors(rng):
    with pytest.raises(ValueError, match="same minibatch"):
        cka_matrix([randn(rng, 8, 3)], [randn(rng, 9, 3)])
    with pytest.raises(ValueError, match="at least 4 examples"):
        cka_matrix([randn(rng, 3, 3)])
    with pytest.raises(ValueError, match="at least one layer"):
        cka_matrix([])
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        cka_matrix([np.ones((5, 2))])


def test_constant_and_nan_layers_give_nan_rows_and_one_warning(rng):
    x = randn(rng, 16, 5)
    bad_nan = randn(rng, 16, 5)
    bad_nan[3, 1] = float("nan")
    constant = torch.full((16, 4), 2.5, dtype=torch.float64)
    xs = [x, bad_nan, related(rng, x, (6,)), constant]
    with pytest.warns(UserWarning, match=r"xs\[1\] \(not finite\), xs\[3\] \(constant\)") as record:
        out = cka_matrix(xs)
    assert len([w for w in record if "CKA is NaN" in str(w.message)]) == 1
    for bad in (1, 3):
        assert torch.isnan(out[bad]).all() and torch.isnan(out[:, bad]).all()
    good = [0, 2]
    expected = ref.cka_matrix(*[[xs[i].numpy() for i in good]] * 2, unbiased=True)
    np.testing.assert_allclose(out[good][:, good].numpy(), expected, rtol=1e-6)

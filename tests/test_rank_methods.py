"""The effective rank's three paths (exact, exact low-rank, Lanczos estimate) against numpy's SVD of the features."""

import numpy as np
import pytest
import torch

from lightning_cka.functional import rank as rank_module
from lightning_cka.functional.hsic import gram
from lightning_cka.functional.rank import effective_rank


def rankme(features):
    """Garrido et al. 2022 by the book, from numpy's SVD of the centered features.

    Singular values below sqrt(n · eps) of the largest are left out, as a float32 Gram cannot resolve them.
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    s = s[s > s[0] * np.sqrt(len(x) * np.finfo(np.float32).eps)]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def power_law_features(n, d, decay, seed):
    """Features whose singular values fall as k^-decay: a spectrum with a head and a long tail, like a layer's."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, min(n, d), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d, min(n, d), generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, min(n, d) + 1, dtype=torch.float64) ** -decay
    return (u * s) @ v.T


@pytest.mark.parametrize("n", [48, 200, 640])
def test_exact_path_in_the_gram_s_precision_matches_numpy_svd(n):
    feats = [power_law_features(n, 300, decay, seed) for seed, decay in enumerate((0.3, 0.8, 1.5))]
    grams = [gram(f.float(), center=True) for f in feats]
    expected = np.array([rankme(f) for f in feats])
    np.testing.assert_allclose(effective_rank(grams, method="exact").numpy(), expected, rtol=2e-3)
    # the same float32 Grams, decomposed in float64 with float32's cut: what effective_rank did before this round
    values = torch.linalg.eigvalsh(torch.stack(grams).double())
    old = rank_module._rank(*rank_module._spectrum_sums(values, torch.finfo(torch.float32).eps), torch.tensor(True))
    tolerance = 1e-12 if n < rank_module._FLOAT32_FROM else 1e-4  # float64 below 512 examples, float32 from there
    np.testing.assert_allclose(effective_rank(grams).numpy(), old.numpy(), rtol=tolerance)


def test_a_rank_bound_gives_the_exact_spectrum_from_a_projection():
    n = 400
    feats = [power_law_features(n, d, 0.5, d) for d in (12, 40, 90)]  # rank <= d, far below n
    grams = [gram(f, center=True) for f in feats]
    exact = effective_rank(grams, method="exact")
    bounded = effective_rank(grams, max_ranks=[12, 40, 90])
    np.testing.assert_allclose(bounded.numpy(), exact.numpy(), rtol=1e-9)
    np.testing.assert_allclose(bounded.numpy(), [rankme(f) for f in feats], rtol=1e-6)
    assert bool((bounded <= torch.tensor([12.0, 40.0, 90.0]) + 1e-9).all())


def test_the_lanczos_estimate_is_within_a_few_percent_of_the_exact_rank():
    n = 700
    feats = [power_law_features(n, 2000, decay, seed) for seed, decay in enumerate((0.2, 0.5, 0.9, 1.3))]
    grams = torch.stack([gram(f.float(), center=True) for f in feats])
    exact = effective_rank(grams, method="exact")
    errors = torch.stack([(effective_rank(grams, method="lanczos", seed=s) - exact).abs() / exact for s in range(3)])
    assert float(errors.median()) < 0.01 and float(errors.max()) < 0.05, errors


def test_auto_estimates_from_lanczos_from_on(monkeypatch):
    called = []
    original = rank_module._lanczos_sums
    monkeypatch.setattr(rank_module, "_lanczos_sums", lambda *a: called.append(a[0].shape) or original(*a))
    grams = [gram(power_law_features(300, 400, 0.5, 0).float(), center=True)]
    effective_rank(grams)
    assert called == []
    monkeypatch.setattr(rank_module, "LANCZOS_FROM", 256)
    effective_rank(grams)
    assert called == [(1, 300, 300)]


def test_constant_and_non_finite_grams_give_nan_on_every_path():
    n = 600
    good = gram(power_law_features(n, 50, 0.5, 1).float(), center=True)
    bad = good.clone()
    bad[3, 4] = float("nan")
    for method in ("exact", "lanczos"):
        ranks = effective_rank([torch.zeros(n, n), bad, good], method=method)
        assert torch.isnan(ranks[:2]).all() and torch.isfinite(ranks[2]), method
    with pytest.raises(ValueError, match="method must be"):
        effective_rank([good], method="svd")

import pytest
import torch

from lightning_cka.functional import cka_matrix, linear_cka


def randn(rng, *shape):
    return torch.randn(*shape, generator=rng, dtype=torch.float64)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shape", [(40, 7), (40, 300), (10, 3, 4, 4)])
def test_cka_of_a_representation_with_itself_is_one(rng, unbiased, shape):
    x = randn(rng, *shape)
    assert linear_cka(x, x, unbiased=unbiased).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("features", [8, 200])  # feature-space path and Gram path
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(rng, unbiased, features):
    x = randn(rng, 60, features)
    y = torch.tanh(x @ randn(rng, features, 5))
    q, _ = torch.linalg.qr(randn(rng, features, features))
    base = linear_cka(x, y, unbiased=unbiased)
    assert linear_cka(x @ q, y, unbiased=unbiased).item() == pytest.approx(base.item(), rel=1e-9)
    assert linear_cka(7.5 * x, 0.01 * y, unbiased=unbiased).item() == pytest.approx(base.item(), rel=1e-9)


@pytest.mark.parametrize("unbiased", [False, True])
def test_not_invariant_to_an_arbitrary_invertible_linear_map(rng, unbiased):
    x = randn(rng, 200, 10)
    stretch = torch.diag(torch.logspace(0, 3, 10, dtype=torch.float64)) @ randn(rng, 10, 10)
    assert torch.linalg.matrix_rank(stretch) == 10
    assert linear_cka(x, x @ stretch, unbiased=unbiased).item() < 0.9


@pytest.mark.parametrize("unbiased", [False, True])
def test_symmetric_in_its_arguments(rng, unbiased):
    x, y = randn(rng, 50, 9), randn(rng, 50, 3, 4)
    assert linear_cka(x, y, unbiased=unbiased).item() == pytest.approx(linear_cka(y, x, unbiased=unbiased).item())
    xs, ys = [x, y], [x.square(), y.relu(), randn(rng, 50, 6)]
    assert torch.allclose(cka_matrix(xs, ys, unbiased=unbiased), cka_matrix(ys, xs, unbiased=unbiased).T)


def test_unbiased_cka_of_independent_features_is_near_zero_but_biased_is_not(rng):
    x, y = randn(rng, 1024, 256), randn(rng, 1024, 256)
    assert abs(linear_cka(x, y, unbiased=True).item()) < 0.01
    assert linear_cka(x, y, unbiased=False).item() > 0.1
    many_features = randn(rng, 512, 1024), randn(rng, 512, 1024)
    assert abs(linear_cka(*many_features, unbiased=True).item()) < 0.02
    assert linear_cka(*many_features, unbiased=False).item() > 0.5


def test_unbiased_cka_can_be_negative_and_is_not_clamped(rng):
    values = [linear_cka(randn(rng, 32, 40), randn(rng, 32, 40), unbiased=True).item() for _ in range(20)]
    assert min(values) < 0

"""The permutation null from cyclic shifts of a random order (one FFT for all shifts) against textbook HSIC loops."""

import numpy as np
import pytest
import reference as ref
import torch

from lightning_cka.functional.hsic import ShiftPermutations, _hsic_terms, draw_permutations


def features(generator, n, widths, dtype=torch.float64):
    base = torch.randn(n, 5, generator=generator, dtype=dtype)
    out = []
    for width in widths:  # related layers (a shared part) with noise, so the null products are far from 0
        mix = torch.randn(5, width, generator=generator, dtype=dtype)
        out.append(torch.tanh(base @ mix) + 0.5 * torch.randn(n, width, generator=generator, dtype=dtype))
    return out


def textbook_null(xs, ys, perms, unbiased):
    """Every permutation's HSIC of every pair, B's examples reordered before its Gram, by numpy loops."""
    hsic = ref.hsic_unbiased if unbiased else ref.hsic_biased
    out = np.zeros((len(perms), len(xs), len(ys)))
    for k, perm in enumerate(perms):
        p = perm.numpy()
        for a, xa in enumerate(xs):
            for b, yb in enumerate(ys):
                out[k, a, b] = hsic(ref.gram(xa.numpy()), ref.gram(yb.numpy()[p]))
    return out


def uncentered_grams(xs):
    return [x @ x.T for x in xs]  # the null must not rely on the Grams being centred


@pytest.mark.parametrize("n", [5, 8, 13, 64])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("joint", [True, False])
def test_shift_null_equals_the_hsic_of_each_permutation(n, unbiased, joint):
    g = torch.Generator().manual_seed(n)
    xs = features(g, n, [3, 7, 4])
    ys = xs if joint else features(g, n, [6, 2])
    perms = draw_permutations(n, min(3, n - 1), g, torch.device("cpu"))
    assert isinstance(perms, ShiftPermutations)
    terms = _hsic_terms(uncentered_grams(xs), None if joint else uncentered_grams(ys), perms, unbiased=unbiased)
    expected = textbook_null(xs, ys, list(perms), unbiased)
    assert np.abs(expected).max() > 1e-3  # not a vacuous comparison
    np.testing.assert_allclose(terms.null.numpy(), expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_float32_grams_give_the_float64_null_to_float32_precision():
    g = torch.Generator().manual_seed(1)
    xs = features(g, 96, [40, 30, 50])
    perms = draw_permutations(96, 19, g, torch.device("cpu"))
    exact = _hsic_terms(uncentered_grams(xs), permutations=perms).null
    single = _hsic_terms([k.float() for k in uncentered_grams(xs)], permutations=perms).null
    scale = _hsic_terms(uncentered_grams(xs)).self_a.max()  # the size of the terms the null is compared with
    assert (single - exact).abs().max() < 1e-5 * scale


def test_shift_permutations_are_a_relabelled_cyclic_group():
    order = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    every = ShiftPermutations(order, torch.arange(1, 9))
    perms = [p.tolist() for p in every]
    assert all(sorted(p) == list(range(9)) for p in perms)  # permutations
    assert len({tuple(p) for p in perms}) == 8 and list(range(9)) not in perms  # distinct, none the identity
    group = {tuple(range(9)), *map(tuple, perms)}
    for p in perms:  # closed under composition: the shifts of one order form a group
        for q in perms:
            assert tuple(np.array(p)[q]) in group
    assert [p.tolist() for p in every[2:4]] == perms[2:4]


def test_draw_permutations_falls_back_to_uniform_permutations_when_shifts_run_out():
    g = torch.Generator().manual_seed(3)
    assert isinstance(draw_permutations(20, 19, g, torch.device("cpu")), ShiftPermutations)  # all 19 shifts
    fallback = draw_permutations(19, 19, g, torch.device("cpu"))
    assert isinstance(fallback, list) and len(fallback) == 19
    assert all(sorted(p.tolist()) == list(range(19)) for p in fallback)
    assert draw_permutations(64, 0, g, torch.device("cpu")) == []
    shifts = draw_permutations(64, 19, g, torch.device("cpu")).shifts
    assert shifts.unique().numel() == 19 and int(shifts.min()) >= 1 and int(shifts.max()) <= 63

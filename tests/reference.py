"""Deliberately simple float64 reference implementations (textbook formulas, loops over pairs), in NumPy.

Nothing here shares code with the package: the tests compare the package against these.
"""

import numpy as np


def as_matrix(x):
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def gram(x):
    x = as_matrix(x)
    return x @ x.T


def hsic_biased(k, l):  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k, l):  # noqa: E741
    """Song et al. 2012, equation (5), written out term by term."""
    n = k.shape[0]
    kt = k.copy()
    lt = l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def linear_cka(x, y, unbiased=False):
    hsic = hsic_unbiased if unbiased else hsic_biased
    k, l = gram(x), gram(y)  # noqa: E741
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def minibatch_cka(batches_a, batches_b):
    """Nguyen et al. 2021: batches_a[i][layer] are the features of minibatch i; a loop over every pair."""
    num_a, num_b = len(batches_a[0]), len(batches_b[0])
    cross = np.zeros((num_a, num_b))
    self_a = np.zeros(num_a)
    self_b = np.zeros(num_b)
    for feats_a, feats_b in zip(batches_a, batches_b, strict=False):
        grams_a = [gram(f) for f in feats_a]
        grams_b = [gram(f) for f in feats_b]
        for i, ka in enumerate(grams_a):
            self_a[i] += hsic_unbiased(ka, ka)
            for j, kb in enumerate(grams_b):
                cross[i, j] += hsic_unbiased(ka, kb)
        for j, kb in enumerate(grams_b):
            self_b[j] += hsic_unbiased(kb, kb)
    return cross / np.sqrt(np.outer(self_a, self_b))


def cka_matrix(xs, ys, unbiased=True):
    out = np.zeros((len(xs), len(ys)))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            out[i, j] = linear_cka(x, y, unbiased=unbiased)
    return out


def mean_attention_distance(attn, grid, patch, num_prefix):
    """Loop over images, heads, query patches and key patches."""
    attn = np.asarray(attn, dtype=np.float64)
    b, h = attn.shape[:2]
    gh, gw = grid
    out = np.zeros(h)
    for head in range(h):
        per_image = []
        for img in range(b):
            per_query = []
            for q in range(gh * gw):
                total = 0.0
                for k in range(gh * gw):
                    dist = patch * np.hypot(q // gw - k // gw, q % gw - k % gw)
                    total += attn[img, head, num_prefix + q, num_prefix + k] * dist
                per_query.append(total)
            per_image.append(np.mean(per_query))
        out[head] = np.mean(per_image)
    return out

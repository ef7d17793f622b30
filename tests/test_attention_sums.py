"""Attention distance and entropy from logits (functional/attention.py) against textbook loops."""

import numpy as np
import pytest
import reference as ref
import torch

from lightning_cka.functional.attention import (
    attention_logits,
    attention_softmax,
    attention_sums,
    patch_distances,
)
from lightning_cka.functional.norms import channel_norms
from lightning_cka.taps.attention import AttentionSite, AttentionStatsTap, AttentionTap


def qk(batch=5, heads=3, tokens=10, dim=8, seed=0):
    """q and k as timm makes them: strided views of one (B, T, 3, H, d) projection."""
    qkv = torch.randn(batch, tokens, 3, heads, dim, generator=torch.Generator().manual_seed(seed)).permute(
        2, 0, 3, 1, 4
    )
    return qkv[0], qkv[1]


def textbook_entropy(probs):
    p = probs.double().numpy()
    per_query = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)  # (B, H, T)
    return per_query.mean(axis=-1).sum(axis=0)


def test_logits_of_strided_q_and_k_are_the_scaled_products():
    q, k = qk()
    assert not q.is_contiguous()
    logits = attention_logits(q, k, 0.3)
    assert logits.shape == (5, 3, 10, 10) and logits.dtype == torch.float32
    np.testing.assert_allclose(logits.numpy(), (0.3 * q.double() @ k.double().mT).numpy(), rtol=1e-5, atol=1e-5)
    probs = attention_softmax(logits)
    assert probs.stride() == logits.stride()  # the head-major layout is kept
    torch.testing.assert_close(probs, logits.softmax(dim=-1))


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_sums_from_logits_equal_textbook_distance_and_entropy(renormalize, prefix):
    grid = (3, 3)
    q, k = qk(tokens=prefix + 9, seed=prefix)
    logits = attention_logits(q, k, 1.7)  # large logits: peaked attention, where -Σ p log p loses the most digits
    probs = attention_softmax(logits)
    distances = patch_distances(grid, 16)
    distance, entropy = attention_sums(probs, distances, prefix, renormalize, logits)
    expected = ref.mean_attention_distance(probs.numpy(), grid, 16, prefix)
    if renormalize:  # textbook: each query's weights over patch keys divided by their sum
        w = probs.double().numpy()[..., prefix:, prefix:]
        d = distances.double().numpy()
        expected = ((w * d).sum(-1) / w.sum(-1)).mean(-1).mean(0)
    np.testing.assert_allclose(distance.numpy() / 5, expected, rtol=1e-5)
    np.testing.assert_allclose(entropy.numpy(), textbook_entropy(probs), rtol=1e-5)
    _, from_probs = attention_sums(probs, distances, prefix, renormalize)  # the entr path, for captures without logits
    np.testing.assert_allclose(from_probs.numpy(), textbook_entropy(probs), rtol=1e-5)


def test_the_stats_tap_sums_the_same_from_logits_and_from_probabilities():
    site = AttentionSite("blocks.0.attn", 3, 1, (3, 3), (16.0, 16.0), "patch_embed")
    taps = [AttentionStatsTap([site], renormalize=False) for _ in range(2)]
    q, k = qk(tokens=10)
    logits = attention_logits(q, k, 0.35)
    probs, distances = attention_softmax(logits), patch_distances(3, 16)
    for tap in taps:
        tap.begin(None)
    taps[0].consume(0, probs, distances)
    taps[1].consume_logits(0, probs, distances, logits)
    for key in ("distance", "entropy", "count"):
        torch.testing.assert_close(taps[0].collect()[key], taps[1].collect()[key], rtol=1e-5, atol=1e-6)


def test_a_tap_without_logits_support_gets_the_probabilities():
    seen = []

    class Plain(AttentionTap):
        def consume(self, layer, probs, distances):  # the documented three-argument form
            seen.append((layer, probs.shape))

    Plain([]).consume_logits(2, torch.ones(1, 1, 5, 5), torch.zeros(4, 4), torch.zeros(1, 1, 5, 5))
    assert seen == [(2, (1, 1, 5, 5))]


@pytest.mark.parametrize("layout", ["tokens", "maps", "channels_last"])
def test_channel_norms_are_the_euclidean_norms_over_the_channels(layout):
    g = torch.Generator().manual_seed(1)
    if layout == "tokens":
        x, dim, expected = torch.randn(3, 7, 5, generator=g), -1, None
        expected = x.double().square().sum(-1).sqrt()
    else:
        x, dim = torch.randn(3, 5, 4, 6, generator=g), 1
        expected = x.double().square().sum(1).sqrt()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)  # channels contiguous: the fused path
            assert x.stride(1) == 1
    np.testing.assert_allclose(channel_norms(x, dim).numpy(), expected.numpy(), rtol=1e-6)

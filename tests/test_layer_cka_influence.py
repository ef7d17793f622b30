"""Influence of single probe images on a layer's CKA (Davari et al. 2022): each image's share of the unbiased
self-HSIC, against an independent NumPy computation (U-centering written out as Székely & Rizzo 2014 define it)."""

import threading

import numpy as np
import pytest
import torch
import torchmetrics.metric
from test_analysis_linear_probe import FakeWorld
from torch import nn

from lightning_cka.analyses.layer_cka import LayerCKA
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.result import CKAResult


class Two(nn.Module):
    """Layer ``a``: the input vectors; layer ``b``: a fixed nonlinear map of them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.Sequential(nn.Linear(48, 32), nn.Tanh())

    def forward(self, x):
        return self.b(self.a(x)).sum()


def u_centered(gram):
    """Székely & Rizzo's U-centering: zero diagonal, row and column means over the n - 2 off-diagonal terms."""
    n = len(gram)
    k = gram.copy()
    np.fill_diagonal(k, 0.0)
    rows = k.sum(axis=1)
    u = k - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + rows.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def numpy_influence(features, sizes, weighting):
    """(N,) c_i per image, each minibatch's weighted by 1/(n(n-3)) under 'equal' (every HSIC counts the same)."""
    out, start = [], 0
    for n in sizes:
        x = features[start : start + n]
        u = u_centered(x @ x.T)
        assert np.isclose((u * u).sum(axis=1).sum(), (u * u).sum())  # Σ_i c_i = <Ku, Ku>
        out.append((u * u).sum(axis=1) / (n * (n - 3) if weighting == "equal" else 1.0))
        start += n
    return np.concatenate(out)


def batches(x, sizes):
    parts, start = [], 0
    for index, n in enumerate(sizes):
        parts.append(ProbeBatch(index, start, x[start : start + n], None))
        start += n
    return parts


def run(model, x, sizes, weighting="equal"):
    engine = ProbeEngine([ProbedModel("model", model, ["a", "b"])], [LayerCKA(0, weighting)])
    parts = batches(x, sizes)
    engine.run(parts, len(parts), torch.device("cpu"))
    fields = engine.compute()
    assert engine.failures == {} and engine.finalize_failures == {}
    return engine, fields


def layer_outputs(model, x):
    with torch.no_grad():
        return [x.double().numpy(), model.b(x).double().numpy()]


def expected_top(contributions):
    k = max(1, int(np.ceil(0.01 * len(contributions))))
    order = np.argsort(-contributions, kind="stable")[:k]
    return contributions[order].sum() / contributions.sum(), order


@pytest.mark.parametrize("weighting", ["equal", "size"])
def test_influence_matches_an_independent_numpy_computation(weighting):
    torch.manual_seed(0)
    model = Two()
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_t(3, size=(230, 48)), dtype=torch.float32)  # heavy tails: some images stand out
    sizes = [64, 64, 64, 38]  # unequal: the weighting matters
    _, fields = run(model, x, sizes, weighting)
    share, images = fields["influence_share"], fields["influence_images"]
    assert share.shape == (2,) and images.shape == (2, 3) and images.dtype == np.int64  # k = ceil(2.3) = 3
    for layer, features in enumerate(layer_outputs(model, x)):
        want_share, want_images = expected_top(numpy_influence(features, sizes, weighting))
        assert share[layer] == pytest.approx(want_share, rel=1e-5)
        assert images[layer].tolist() == want_images.tolist()


def test_one_outlier_image_carries_most_of_the_self_similarity_and_comes_first():
    torch.manual_seed(0)
    model = Two()
    x = torch.randn(256, 48, generator=torch.Generator().manual_seed(2))
    x[137] *= 300.0  # one image of huge norm
    _, fields = run(model, x, [64] * 4)
    share, images = fields["influence_share"], fields["influence_images"]
    assert share[0] > 0.5 and images[0, 0] == 137
    independent, order = expected_top(numpy_influence(x.double().numpy(), [64] * 4, "equal"))
    assert share[0] == pytest.approx(independent, rel=1e-5) and order[0] == 137
    scalars = LayerCKA().scalars(CKAResult({**fields, "layers": ["a", "b"]}), View())
    assert scalars["cka/influence_share_max"] == pytest.approx(np.nanmax(share))


def test_iid_gaussian_images_share_it_evenly():
    torch.manual_seed(0)
    model = Two()
    x = torch.randn(512, 48, generator=torch.Generator().manual_seed(3))
    _, fields = run(model, x, [64] * 8)
    k = 6  # ceil(5.12)
    assert fields["influence_images"].shape == (2, k)
    assert (fields["influence_share"] < 3 * k / 512).all() and (fields["influence_share"] > k / 512).all()


def test_nan_features_give_nan_and_no_images():
    class Poisoned(nn.Module):
        def forward(self, x):
            out = x.clone()
            out[3, 0] = torch.nan
            return out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Identity(), Poisoned()

        def forward(self, x):
            return self.a(x).sum() + self.b(x).sum()

    _, fields = run(Model(), torch.randn(32, 8), [16, 16])
    assert np.isfinite(fields["influence_share"][0]) and np.isnan(fields["influence_share"][1])
    assert fields["influence_images"][1].tolist() == [-1]


@pytest.mark.parametrize("split", ["interleaved", "one_rank_empty"])
def test_ranks_with_part_of_the_minibatches_give_what_one_process_gives(monkeypatch, split):
    torch.manual_seed(0)
    model = Two()
    x = torch.randn(120, 48, generator=torch.Generator().manual_seed(4))
    x[50] *= 20
    sizes = [16] * 6 + [24]
    _, expected = run(model, x, sizes)
    parts = batches(x, sizes)
    shares = [parts[0::2], parts[1::2]] if split == "interleaved" else [parts, []]
    # A metric reads torchmetrics' distributed_available when it is made: patch before the engines start.
    world = FakeWorld(2)
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", world.gather)
    monkeypatch.setattr(torchmetrics.metric, "jit_distributed_available", lambda: True)
    engines = []
    for share in shares:
        engine = ProbeEngine([ProbedModel("model", model, ["a", "b"])], [LayerCKA(0)])
        engine.run(share, len(parts), torch.device("cpu"))
        engines.append(engine)
    results, errors = [None, None], []

    def rank(r):
        world.local.rank = r
        try:
            results[r] = engines[r].compute()
        except Exception as err:  # surfaced below
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results:
        assert got["minibatch_sizes"].tolist() == sizes  # summed over the ranks
        np.testing.assert_allclose(got["influence_share"], expected["influence_share"], rtol=1e-12)
        np.testing.assert_array_equal(got["influence_images"], expected["influence_images"])
    assert expected["influence_images"][0, 0] == 50


def test_influence_fields_round_trip_through_a_file(tmp_path):
    torch.manual_seed(0)
    _, fields = run(Two(), torch.randn(40, 48), [20, 20])
    result = CKAResult({**fields, "layers": ["a", "b"]}, analyses=[LayerCKA()])
    loaded = CKAResult.load(result.save(tmp_path / "p.npz"))
    np.testing.assert_array_equal(loaded.influence_share, fields["influence_share"])
    np.testing.assert_array_equal(loaded.influence_images, fields["influence_images"])

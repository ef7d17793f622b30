"""The linear probe's chance level: ridge probes on shuffled fit-half labels, scored with the true labels, against an
independent fit (scikit-learn's Ridge at the λ a naive hat-matrix GCV picks) on the same permutations."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_cka.analyses.linear_probe import LinearProbe
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.figures.render import draw_figure
from lightning_cka.functional.ridge import fit_ridge, label_permutation, ridge_basis, solve_ridge
from lightning_cka.result import CKAResult

linear_model = pytest.importorskip("sklearn.linear_model")

GRID = 10.0 ** np.arange(-6.0, 2.0 + 1e-9, 0.25)  # the documented λ grid, relative to s_max
CLASSES, N, BATCH = 10, 256, 32


class Vectors(nn.Module):
    """Two layers on (n, 16) vectors: the input as it is (the class is partly decodable) and a random projection."""

    def __init__(self):
        super().__init__()
        self.keep = nn.Identity()
        self.mix = nn.Linear(16, 12)

    def forward(self, x):
        return self.mix(self.keep(x)).sum()


def probe_data(seed, signal=0.6):
    """Exactly balanced labels in a random order, and features that carry the class weakly (``signal`` 0: none)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(N) % CLASSES)
    centers = rng.normal(size=(CLASSES, 16))
    x = rng.normal(size=(N, 16)) + signal * centers[y]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def run(model, x, y, analysis, seed=0):
    torch.manual_seed(0)
    engine = ProbeEngine([ProbedModel("model", model, ["keep", "mix"])], [analysis], seed=seed)
    parts = [ProbeBatch(i, s, x[s : s + BATCH], y[s : s + BATCH]) for i, s in enumerate(range(0, N, BATCH))]
    engine.run(parts, len(parts), torch.device("cpu"))
    fields = engine.compute()
    assert engine.failures == {} and engine.finalize_failures == {}
    return fields


def naive_gcv_lambda(x, y):
    """The λ of the grid whose GCV, from the explicit n x n hat matrix of the intercept model, is smallest."""
    n, d = x.shape
    centered = x - x.mean(axis=0)
    s_max = np.linalg.eigvalsh(centered.T @ centered).max()
    a, onehot = np.hstack([np.ones((n, 1)), x]), np.eye(CLASSES)[y]
    penalty = np.eye(d + 1)
    penalty[0, 0] = 0.0
    best, best_value = None, np.inf
    for lam in s_max * GRID:
        hat = a @ np.linalg.solve(a.T @ a + lam * penalty, a.T)
        dof = n - np.trace(hat)
        value = n * np.square(onehot - hat @ onehot).sum() / dof**2 if dof > 0 else np.inf
        if value < best_value:
            best, best_value = lam, value
    return best


def sklearn_accuracy(x_fit, y_fit, x_score, y_score, lam):
    """scikit-learn's ridge (intercept unpenalized) on one-hot targets; accuracy of its argmax on the scored half."""
    ridge = linear_model.Ridge(alpha=lam, fit_intercept=True, solver="svd").fit(x_fit, np.eye(CLASSES)[y_fit])
    return float((ridge.predict(x_score).argmax(axis=1) == y_score).mean())


def layer_features(model, x):
    with torch.no_grad():
        keep = x.double().numpy()
        return [keep, model.mix(x).double().numpy()]


def test_chance_is_the_shuffled_label_probe_as_an_independent_fit_computes_it():
    torch.manual_seed(0)
    model = Vectors()
    x, y = probe_data(seed=1)
    fields = run(model, x, y, LinearProbe(shuffles=4), seed=7)
    y_np = y.numpy()
    fit, held = np.arange(N) % 2 == 0, np.arange(N) % 2 == 1
    shuffled, chance = fields["linear_probe_shuffled"], fields["linear_probe_chance"]
    assert shuffled.shape == (4, 2, 2) and np.isnan(shuffled[:, :, 0]).all()  # vectors: no CLS token
    assert chance == pytest.approx(np.nanmean(shuffled), abs=1e-15)
    assert abs(chance - 1 / CLASSES) < 0.03, chance
    assert fields["linear_probe_accuracy"][0, 1] > chance + 0.3  # the true labels are decodable
    # Independently: the fit half's labels (even probe indices, in order) permuted by the package's seeding, the λ by
    # a naive GCV, the fit by scikit-learn, scored with the true labels.
    features = layer_features(model, x)
    for p in range(4):
        y_perm = y_np[fit][label_permutation(7, p, int(fit.sum())).numpy()]
        assert not np.array_equal(y_perm, y_np[fit])
        for layer, feats in enumerate(features):
            lam = naive_gcv_lambda(feats[fit], y_perm)
            expected = sklearn_accuracy(feats[fit], y_perm, feats[held], y_np[held], lam)
            assert abs(shuffled[p, layer, 1] - expected) <= 1 / held.sum() + 1e-12, (p, layer, expected)


def test_a_layer_without_the_class_scores_the_chance_level_and_rarely_above_its_spread():
    """Features that carry nothing: the true-label probe is one more shuffle, so it should score what they score.

    Note that this is below 1/C: the two halves' class frequencies are anti-correlated (exactly balanced labels), and
    GCV shrinks a fit of noise towards the fit half's most frequent class.
    """
    torch.manual_seed(0)
    model = Vectors()
    accuracy, chance, high = [], [], []
    for seed in range(30):
        x, y = probe_data(seed=100 + seed, signal=0.0)
        fields = run(model, x, y, LinearProbe(shuffles=20), seed=seed)
        accuracy.append(fields["linear_probe_accuracy"][0, 1])
        chance.append(fields["linear_probe_chance"])
        high.append(np.percentile(fields["linear_probe_shuffled"][:, 0, 1], 95))
    accuracy, chance, high = map(np.array, (accuracy, chance, high))
    assert abs(accuracy.mean() - chance.mean()) < 0.012, (accuracy.mean(), chance.mean())  # se of the mean ~0.004
    assert (accuracy > high).mean() <= 0.25  # nominally ~10% (the 2nd largest of 20), 3 of 30 expected


def test_shuffles_are_the_same_for_any_minibatch_split_seeded_by_the_probe_seed():
    model = Vectors()
    x, y = probe_data(seed=4)
    a = run(model, x, y, LinearProbe(shuffles=3), seed=1)["linear_probe_shuffled"]
    b = run(model, x, y, LinearProbe(shuffles=3), seed=1)["linear_probe_shuffled"]
    c = run(model, x, y, LinearProbe(shuffles=3), seed=2)["linear_probe_shuffled"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, :, 1], c[:, :, 1])
    # different shuffles are different permutations
    assert not torch.equal(label_permutation(1, 0, 16), label_permutation(1, 1, 16))


def test_no_shuffles_give_no_chance_level_and_the_option_is_checked(tmp_path):
    model = Vectors()
    x, y = probe_data(seed=5)
    fields = run(model, x, y, LinearProbe(shuffles=0))
    assert np.isnan(fields["linear_probe_chance"]) and fields["linear_probe_shuffled"].shape == (0, 2, 2)
    result = CKAResult({**fields, "layers": ["keep", "mix"]}, analyses=[LinearProbe(shuffles=0)])
    result = CKAResult.load(result.save(tmp_path / "p.npz"))
    (figure,) = LinearProbe().figures(result, None, View())
    assert figure.panels[0].lines == () and "no chance level" in figure.caption
    assert LinearProbe(shuffles=3).config() == {"shuffles": 3}
    for bad in (-1, 1.5, True, 1001):
        with pytest.raises(ValueError, match="LinearProbe: shuffles must be an int in \\[0, 1000\\]"):
            LinearProbe(shuffles=bad)


def test_figure_draws_the_shuffled_chance_and_its_95th_percentile(tmp_path):
    layers = ["a", "b"]
    shuffled = np.stack([np.full((2, 2), v) for v in np.linspace(0.05, 0.15, 20)])
    result = CKAResult(
        layers=layers,
        linear_probe_accuracy=np.array([[0.5, 0.6], [0.7, 0.8]]),
        linear_probe_chance=float(shuffled.mean()),
        linear_probe_shuffled=shuffled,
        linear_probe_ridge=np.ones((2, 2)),
        linear_probe_examples=np.array([100, 100]),
        analyses=[LinearProbe()],
    )
    (figure,) = LinearProbe().figures(result, None, View())
    mean, high = figure.panels[0].lines
    assert mean.value == pytest.approx(0.1) and "shuffled labels" in mean.label and mean.style == "dashed"
    assert high.value == pytest.approx(np.percentile(shuffled, 95)) and high.style == "dotted"
    assert "20 shuffles per layer" in figure.caption and "95th percentile" in figure.caption
    scalars = LinearProbe().scalars(result, View())
    assert scalars["linear_probe/chance"] == pytest.approx(0.1)
    assert scalars["linear_probe/chance_p95"] == pytest.approx(np.percentile(shuffled, 95))
    draw_figure(figure).fig.savefig(tmp_path / "figure.png")
    # A file from before the shuffled probes: its chance is the majority baseline, and the figure says so.
    old = CKAResult(**{k: result.get(k) for k in result if k != "linear_probe_shuffled"}, analyses=[LinearProbe()])
    (figure,) = LinearProbe().figures(old, None, View())
    assert [line.label for line in figure.panels[0].lines] == ["chance (majority class) 0.10"]


def test_one_eigendecomposition_serves_every_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    counts = np.bincount(rng.integers(0, 3, 40), minlength=3).astype(float)
    y = np.repeat(np.arange(3), counts.astype(int))
    stats = [torch.from_numpy(a) for a in (x.T @ x, x.sum(0), counts)]
    basis = ridge_basis(*stats)
    for perm in (np.arange(40), rng.permutation(40)):
        xty = torch.from_numpy(x.T @ np.eye(3)[y[perm]])
        one, shared = fit_ridge(stats[0], xty, stats[1], stats[2]), solve_ridge(basis, xty)
        torch.testing.assert_close(one.weights, shared.weights, rtol=0, atol=0)
        assert one.ridge == shared.ridge

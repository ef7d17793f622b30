"""An analysis written outside the package (here, in this test file) flows through everything with no edit to the
package: a real Trainer fit, the .npz, TensorBoard's scalars, images and CKA-tab data, `lightning-cka summary`,
`plot`, `compare`, and `analyze`, which rebuilds its options from the checkpoint.

The analysis is the example of docs/writing-an-analysis.md: CKA of every layer with the same layer at the first probe.
"""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import reference as ref
import torch
from lit_helpers import lightning_module_class, loaders
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typing_extensions import override

from lightning_cka import Analysis, CKAMonitor, CKAResult, Field
from lightning_cka.cli import main
from lightning_cka.figures.spec import Curves, Figure, Series
from lightning_cka.metrics import MinibatchCKA
from lightning_cka.probe_data.sample import load_probe
from lightning_cka.taps.grams import LayerGrams

HERE = Path(__file__).parent


class InitCKA(Analysis):
    """CKA of every monitored layer with the same layer at the first probe of the fit (the untrained model).

    Args:
        permutations: permutations of the null per minibatch (0: none).
    """

    name = "init_cka"
    fields = (
        Field("init_cka", "array", "(L,) CKA of each layer with itself at the first probe", shape=("layers",)),
        Field("init_cka_null", "array", "(L,) its permutation-null threshold", shape=("layers",)),
    )

    def __init__(self, permutations: int = 0) -> None:
        if not isinstance(permutations, int) or permutations < 0:
            raise ValueError(f"InitCKA: permutations must be an int >= 0, got {permutations!r}.")
        self.permutations = permutations

    @override
    def bind(self, setup):
        self._model = setup.models["model"]
        m = self._model
        self._tap = LayerGrams(m.layers, m.reduction, m.layouts)  # the same key as the cka analysis's: shared
        self._initial = None
        return True

    @override
    def taps(self, model):
        return [self._tap] if model.role == "model" else []

    @override
    def start(self, num_minibatches, device):
        layers = len(self._model.layers)
        self._metric = MinibatchCKA(
            num_layers_a=layers, num_layers_b=layers, num_minibatches=num_minibatches, permutations=self.permutations
        ).to(device)
        self._current = {}

    @override
    def update(self, batch):
        grams = batch.values["model"][self._tap.key].grams
        self._current[batch.index] = grams
        initial = (self._initial or {}).get(batch.index, grams)
        self._metric.update(grams, initial, grams=True, index=batch.index)

    @override
    def reduce(self):
        self._metric.compute()
        self._initial = self._initial or self._current
        return self._metric.estimate

    @override
    def finalize(self, reduced):
        return {
            "init_cka": np.diagonal(reduced.value.cpu().numpy()).copy(),
            "init_cka_null": np.diagonal(reduced.null.cpu().numpy()).copy(),
        }

    @override
    def figures(self, result, previous, view):
        if result.init_cka is None:
            return []
        panel = Curves(x=tuple(result.layers), series=(Series("", result.init_cka),), y_label="CKA", ylim=(0, 1.05))
        caption = "Each layer against itself in the untrained model: 1 = unchanged since the start."
        title = "CKA of each layer with itself at initialization"
        return [Figure("init_cka/by_layer", title, (panel,), caption, view.subtitle(result))]

    @override
    def scalars(self, result, view):
        return {} if result.init_cka is None else {"init_cka/mean": float(np.nanmean(result.init_cka))}


Lit = lightning_module_class(pl.LightningModule)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    pl.seed_everything(0)
    lit = Lit(lr=1e-2)
    initial = copy.deepcopy(lit.model)
    monitor = CKAMonitor(
        every_n_train_steps=3, probe_size=16, batch_size=8, analyses=["default", InitCKA(permutations=3)]
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=TensorBoardLogger(root, "run", version=0),
        callbacks=[monitor, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, *loaders())
    return root, Path(trainer.log_dir), lit, initial


def test_it_runs_in_a_real_fit_and_measures_what_hooks_measure(run):
    _, log_dir, lit, initial = run
    first = CKAResult.load(log_dir / "cka" / "step_0000000.npz")
    np.testing.assert_allclose(first.init_cka, 1.0, atol=1e-6)  # the first probe is its own initialization
    last = CKAResult.load(log_dir / "cka" / "step_0000006.npz")
    assert [a.name for a in last.analyses][-1] == "init_cka" and last.analysis("init_cka").permutations == 3
    probe = load_probe(log_dir / "cka" / "probe.npz")
    names = [f"blocks.{i}" for i in range(6)]

    def outputs(model):
        modules, per_batch, current = dict(model.named_modules()), [], {}
        hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: current.__setitem__(n, o)) for n in names]
        model.eval()
        with torch.no_grad():
            for batch in probe.images.split(8):
                model(batch)
                features = [current[n].reshape(batch.shape[0], -1).double().numpy() for n in names]
                per_batch.append([f - f.mean(axis=0) for f in features])
        for hook in hooks:
            hook.remove()
        return per_batch

    expected = np.diagonal(ref.minibatch_cka(outputs(lit.model), outputs(initial)))
    np.testing.assert_allclose(last.init_cka, expected, rtol=1e-4, atol=1e-5)
    assert (last.init_cka < 0.999).any()


def test_its_scalars_images_and_dashboard_data_reach_tensorboard(run):
    _, log_dir, _, _ = run
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("init_cka/mean")] == [0, 3, 6]
    assert [e.step for e in events.Images("init_cka/by_layer")] == [0, 3, 6]
    assert any(tag.startswith("init_cka/by_layer") for tag in tags["tensors"])  # what the CKA tab reads


def test_summary_plot_compare_and_analyze_show_it(run, tmp_path, capsys):
    root, log_dir, _, _ = run
    assert main(["summary", str(log_dir)]) == 0
    assert "init_cka/mean" in capsys.readouterr().out
    assert main(["plot", str(log_dir), "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "init_cka_by_layer.png").is_file()
    assert main(["compare", f"{log_dir}/cka/step_0000003.npz", str(log_dir), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "init_cka_by_layer.png").is_file() and "init_cka/mean" in capsys.readouterr().out
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", str(root / "ckpt" / "last.ckpt"), "--out", str(out)]) == 2  # no timm_name
    assert "timm_name" in capsys.readouterr().err


def test_analyze_rebuilds_its_options_from_a_checkpoint(run, tmp_path):
    """`analyze` reads the monitor's state from a checkpoint that names its timm model, as examples/train.py saves."""
    root, _, _, _ = run
    state = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    state["hyper_parameters"] = {
        "timm_name": "test_vit",
        "timm_kwargs": {"num_classes": 4, "img_size": 32, "patch_size": 8},
    }
    torch.save(state, tmp_path / "timm.ckpt")
    assert main(["analyze", "--model", str(tmp_path / "timm.ckpt"), "--out", str(tmp_path / "out")]) == 0
    result = CKAResult.load(tmp_path / "out" / "cka" / "analysis.npz")
    assert result.analysis("init_cka").permutations == 3  # rebuilt from the checkpoint's record, options included
    np.testing.assert_allclose(result.init_cka, 1.0, atol=1e-6)  # one probe: it is its own initialization
    assert result.num_examples == 16  # the run's own probe images, found through the checkpoint


def test_without_its_module_the_fields_are_read_and_the_cli_says_what_is_missing(run):
    _, log_dir, _, _ = run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "from lightning_cka import CKAResult\n"
        f"r = CKAResult.load({str(log_dir / 'cka' / 'step_0000006.npz')!r})\n"
        "print(r.init_cka.shape, [f.tag for f in r.figures()][-1], r.unresolved()[0].split(':')[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", check=True)
    assert out.stdout.split() == ["(6,)", "rank/effective_rank", "init_cka", "(test_user_analysis"], out
    summary = subprocess.run(
        [sys.executable, "-m", "lightning_cka.cli", "summary", str(log_dir)], capture_output=True, text=True, env=env
    )
    assert summary.returncode == 0 and "note: the analysis init_cka (test_user_analysis:InitCKA)" in summary.stderr

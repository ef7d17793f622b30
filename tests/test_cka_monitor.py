import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from lit_helpers import array_steps, lightning_module_class, loaders, make_model
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_cka import CKAMonitor, CKAResult, Reference, compare_models
from lightning_cka.analyses import LayerCKA
from lightning_cka.probe_data.sample import load_probe

LitClassifier = lightning_module_class(pl.LightningModule)
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


def fit(tmp_path, monitor=None, max_steps=6, lit=None, logger=True, train_val=None, **trainer_kwargs):
    pl.seed_everything(0)
    lit = lit() if callable(lit) and not isinstance(lit, torch.nn.Module) else lit or LitClassifier(drop_rate=0.1)
    if logger is True:
        logger = TensorBoardLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        callbacks=[monitor] if isinstance(monitor, CKAMonitor) else list(monitor or []),
        **{**QUIET, **trainer_kwargs},
    )
    trainer.fit(lit, *(train_val or loaders()))
    return trainer, lit


def small_monitor(**kwargs):
    # Figures cost most of a tiny probe: only the tests that look at them draw them.
    return CKAMonitor(**{"every_n_train_steps": 3, "probe_size": 24, "batch_size": 8, "log_images": False, **kwargs})


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """One fit shared by the tests that read the same run: a ViT with a ResNet reference, probed every 3 steps."""
    reference = make_model("test_resnet")
    monitor = small_monitor(reference=reference, log_images=True)
    trainer, lit = fit(tmp_path_factory.mktemp("vit"), monitor)
    return trainer, lit, reference, monitor


def test_every_documented_tag_reaches_tensorboard(vit_run):
    trainer, *_ = vit_run
    acc = events(trainer.log_dir)
    images = {"cka/intra", "cka/reference", "cka/reference_intra", "cka/intra_change", "attention/mean_distance"}
    assert images <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("cka/intra")] == [0, 3, 6]
    assert [e.step for e in acc.Images("cka/intra_change")] == [3, 6]
    assert [e.step for e in acc.Images("cka/reference_intra")] == [0]  # the frozen reference does not change
    scalars = set(acc.Tags()["scalars"])
    blocks = [f"blocks.{i}" for i in range(6)]
    expected = {"cka/probe_seconds", "cka/adjacent_mean", "cka/offdiag_mean", "cka/offdiag_mean_se"}
    expected |= {f"cka_vs_previous/{b}" for b in blocks}
    expected |= {f"cka_reference/best_value/{b}" for b in blocks} | {f"cka_reference/best_layer/{b}" for b in blocks}
    for kind in ("mean_distance", "min_distance", "local_fraction", "entropy"):
        expected |= {f"attention/{kind}/{b}.attn" for b in blocks}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in acc.Scalars("cka/probe_seconds")] == [0, 3, 6]
    assert all(v in (0, 1, 2, 3) for v in (e.value for e in acc.Scalars("cka_reference/best_layer/blocks.0")))


def test_the_dashboard_data_holds_the_same_figures_as_the_images(vit_run):
    import json

    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.context import RequestContext

    from lightning_cka.dashboard.store import FigureStore

    trainer, *_ = vit_run
    acc = events(trainer.log_dir)
    images = set(acc.Tags()["images"])
    assert set(acc.Tags()["tensors"]) == {f"{tag}/figure" for tag in images}
    # The CKA tab reads through TensorBoard's data provider, which keys a tag's metadata by its first summary: with
    # the images under the same tags as the tensors it listed nothing for a run that logs images (the default).
    multiplexer = EventMultiplexer(tensor_size_guidance={"lightning_cka": 0})
    multiplexer.AddRunsFromDirectory(trainer.log_dir)
    multiplexer.Reload()
    runs, skipped = FigureStore(MultiplexerDataProvider(multiplexer, trainer.log_dir)).list(RequestContext(), "")
    assert not skipped and set(runs["."]) == images
    assert set(multiplexer.PluginRunToTagToContent("images")["."]) == images  # the Images tab keeps its tags
    final = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000006.npz")
    (event,) = [e for e in acc.Tensors("cka/intra/figure") if e.step == 6]
    figure = json.loads(event.tensor_proto.string_val[0])
    np.testing.assert_allclose(np.array(figure["panels"][0]["values"], dtype=float), final.intra)
    assert figure["meta"]["probe"] == final.probe_hash and figure["meta"]["step"] == 6
    assert figure["subtitle"].startswith("run/version_0")


def test_arrays_hold_the_matrices_with_their_uncertainty_and_the_probe(vit_run):
    trainer, *_ = vit_run
    assert array_steps(trainer.log_dir) == [0, 3, 6]
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000006.npz")
    assert result.layers == [f"blocks.{i}" for i in range(6)]
    assert result.reference_layers == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    for key, shape in (("intra", (6, 6)), ("reference", (6, 4)), ("previous", (6, 6)), ("reference_intra", (4, 4))):
        for suffix in ("", "_se", "_null"):
            assert getattr(result, key + suffix).shape == shape, key + suffix
    assert result.intra_replicates.shape == (3, 6, 6) and result.num_minibatches == 3
    assert result.minibatch_sizes.tolist() == [8, 8, 8] and result.permutations == 19
    assert result.mean_attention_distance.shape == (6, 2) and result.reference_mean_attention_distance is None
    assert result.uniform_attention_distance > 0 and result.reference_uniform_attention_distance is None
    assert (
        result.step == 6 and result.epoch == 1 and result.num_examples == 24
    )  # 4 batches per epoch: step 6 is epoch 1
    assert result.run == "run/version_0" and "trained" not in result.reference_label
    np.testing.assert_allclose(np.diagonal(result.intra), 1.0)
    probe = load_probe(Path(trainer.log_dir) / "cka" / "probe.npz")
    assert probe.images.shape == (24, 3, 32, 32) and probe.labels.shape == (24,) and probe.hash == result.probe_hash


def test_compare_models_on_the_saved_probe_reproduces_the_monitor(vit_run):
    trainer, lit, reference, _ = vit_run
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000006.npz")
    probe = load_probe(Path(trainer.log_dir) / "cka" / "probe.npz")
    again = compare_models(lit, reference, data=probe.images, batch_size=8)
    assert again.layers == result.layers and again.probe_hash == result.probe_hash
    for key in (
        "intra",
        "intra_se",
        "intra_null",
        "reference",
        "reference_se",
        "reference_intra",
        "mean_attention_distance",
    ):
        np.testing.assert_allclose(getattr(again, key), getattr(result, key), rtol=1e-9, atol=1e-12, err_msg=key)


def test_the_reference_leaves_the_training_device_once_cached(vit_run):
    *_, monitor = vit_run
    assert monitor._engine is None  # teardown frees the engine and its caches
    assert all(p.device.type == "cpu" for p in vit_run[2].parameters())  # nothing to free on a CPU run


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    runs = []
    for with_monitor in (False, True):
        for name in ("test_vit", "test_resnet"):  # dropout and BatchNorm
            monitor = (
                small_monitor(every_n_train_steps=2, reference=make_model("test_resnet")) if with_monitor else None
            )
            lit = lambda name=name: LitClassifier(name, drop_rate=0.2)  # noqa: E731 (built after seeding)
            _, lit = fit(tmp_path / str(len(runs)), monitor, max_steps=4, lit=lit)
            runs.append((name, torch.stack(lit.losses), {k: v.clone() for k, v in lit.state_dict().items()}))
    for (name, losses, weights), (_, losses_m, weights_m) in zip(runs[:2], runs[2:], strict=True):
        assert torch.equal(losses, losses_m), name
        assert weights.keys() == weights_m.keys()
        for key in weights:
            assert torch.equal(weights[key], weights_m[key]), (name, key)


def test_bf16_mixed_precision(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(reference=make_model("test_resnet")), precision="bf16-mixed", max_steps=3)
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000003.npz")
    assert np.isfinite(result.intra).all() and np.isfinite(result.reference).all()


def test_gradient_accumulation_probes_each_optimizer_step_once(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(every_n_train_steps=1), max_steps=3, accumulate_grad_batches=2)
    assert array_steps(trainer.log_dir) == [0, 1, 2, 3]
    assert [e.step for e in events(trainer.log_dir).Scalars("cka/probe_seconds")] == [0, 1, 2, 3]


def test_every_n_epochs_and_the_epoch_of_the_final_probe(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(every_n_train_steps=None, every_n_epochs=1), max_steps=-1, max_epochs=2)
    assert array_steps(trainer.log_dir) == [0, 4, 8]  # 64 training examples, batches of 16
    epochs = [CKAResult.load(Path(trainer.log_dir) / "cka" / f"step_{s:07d}.npz").epoch for s in (0, 4, 8)]
    assert epochs == [0, 0, 1]  # the weights of step 8 come from epoch 1, not the epoch counter after it


def test_compiled_model(tmp_path):
    lit = LitClassifier()
    lit.model = torch.compile(lit.model, backend="eager")
    trainer, _ = fit(tmp_path, small_monitor(), lit=lit, max_steps=3)
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000003.npz")
    assert result.layers == [f"blocks.{i}" for i in range(6)] and result.mean_attention_distance.shape == (6, 2)


def test_no_validation_falls_back_to_the_training_data(tmp_path):
    train, _ = loaders()
    trainer, _ = fit(tmp_path, small_monitor(), train_val=(train,), limit_val_batches=0, max_steps=3)
    assert array_steps(trainer.log_dir) == [0, 3]


def test_dict_batches_with_input_key_and_a_custom_extraction(tmp_path):
    train_val = loaders(dict_batches=True)

    class PixelsMonitor(CKAMonitor):
        def extract_inputs(self, batch):
            return batch["pixels"]

    for sub, monitor in (
        ("a", small_monitor(input_key="pixels")),
        ("b", PixelsMonitor(every_n_train_steps=3, probe_size=24, batch_size=8)),
    ):
        trainer, _ = fit(
            tmp_path / sub, monitor, lit=LitClassifier(dict_batches=True), train_val=train_val, max_steps=3
        )
        assert array_steps(trainer.log_dir) == [0, 3]
    with pytest.raises(KeyError, match=r"keys: \['label', 'pixels'\]\); pass input_key"):
        fit(tmp_path / "c", small_monitor(), lit=LitClassifier(dict_batches=True), train_val=train_val)


def test_constant_layer_is_nan_with_a_warning_and_training_continues(tmp_path):
    class WithDeadBranch(LitClassifier):
        def __init__(self):
            super().__init__()
            self.dead = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.model(x) + 0 * self.dead(torch.zeros_like(x[:, :, 0, :3]).mean(1))

    with pytest.warns(UserWarning, match=r"CKA is NaN for layer\(s\) dead \(constant on the probe images\)"):
        trainer, _ = fit(
            tmp_path, small_monitor(layers=["blocks.0", "dead", "blocks.5"]), lit=WithDeadBranch(), max_steps=3
        )
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000003.npz")
    assert result.layers == ["model.blocks.0", "dead", "model.blocks.5"]
    assert result.layer_notes == ["", "constant on the probe images", ""]
    assert np.isnan(result.intra[1]).all() and np.isfinite(result.intra[[0, 2]][:, [0, 2]]).all()


def test_nan_reaching_the_attention_layers_warns_and_training_continues(tmp_path):
    class PoisonedProbe(CKAMonitor):
        def forward_probe(self, pl_module, inputs):  # NaN images reach every attention layer, at step 0 too
            return pl_module(inputs * float("nan"))

    monitor = PoisonedProbe(every_n_train_steps=3, probe_size=24, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = fit(tmp_path, monitor)
    assert trainer.global_step == 6 and array_steps(trainer.log_dir) == [0, 3, 6]
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000006.npz")
    assert np.isnan(result.mean_attention_distance).all() and result.layer_notes[0] == "NaN/inf in its output"


def test_a_failing_later_probe_warns_and_training_continues(tmp_path):
    class FlakyMonitor(CKAMonitor):
        def forward_probe(self, pl_module, inputs):
            if pl_module.global_step == 3:
                raise MemoryError("simulated out of memory")
            return pl_module(inputs)

    monitor = FlakyMonitor(every_n_train_steps=3, probe_size=24, batch_size=8)
    with pytest.warns(UserWarning, match="probe at step 3 failed.*simulated out of memory"):
        trainer, _ = fit(tmp_path, monitor)
    assert trainer.global_step == 6 and array_steps(trainer.log_dir) == [0, 6]


def test_a_failed_array_write_keeps_the_images_and_names_the_path(tmp_path):
    log_dir = tmp_path / "run" / "version_0"
    (log_dir / "cka" / "step_0000003.npz").mkdir(parents=True)  # in the way of step 3's file
    with pytest.warns(UserWarning, match=r"could not write the arrays of step 3 to .*step_0000003\.npz"):
        logger = TensorBoardLogger(tmp_path, "run", version=0)
        trainer, _ = fit(tmp_path, small_monitor(log_images=True), max_steps=6, logger=logger)
    assert array_steps(trainer.log_dir) == [0, 6]
    assert [e.step for e in events(trainer.log_dir).Images("cka/intra")] == [0, 3, 6]  # the images are all there


def test_reference_by_timm_name_with_a_lightning_checkpoint_of_another_run(tmp_path):
    donor = LitClassifier("test_resnet")
    trainer, _ = fit(tmp_path / "donor", None, lit=donor, max_steps=2)
    ckpt = tmp_path / "donor.ckpt"
    trainer.save_checkpoint(ckpt)
    reference = Reference("test_resnet", weights=str(ckpt), kwargs={"num_classes": 4})
    monitor = small_monitor(reference=reference, batch_size=6)  # 4 minibatches: no warning about too few
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a trained reference draws no "untrained" warning
        warnings.filterwarnings("ignore", ".*(does not have many workers|smaller than the logging|LeafSpec).*")
        trainer, _ = fit(tmp_path / "run", monitor, max_steps=3)
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000003.npz")
    assert result.reference_label == f"test_resnet, trained (…/{tmp_path.parent.name}/{tmp_path.name}/donor.ckpt)"
    with pytest.raises(ValueError, match=r"do not fit ResNet.*num_classes"):
        fit(tmp_path / "bad", small_monitor(reference=Reference("test_resnet", weights=str(ckpt))))


def test_an_untrained_named_reference_warns_once(tmp_path):
    monitor = small_monitor(reference=Reference("test_resnet", kwargs={"num_classes": 4}))
    with pytest.warns(UserWarning, match="untrained timm model") as record:
        fit(tmp_path, monitor, max_steps=3)
    assert len([w for w in record if "untrained timm model" in str(w.message)]) == 1


def test_resume_keeps_probe_identity_and_cadence(tmp_path):
    straight, _ = fit(tmp_path / "straight", small_monitor(every_n_train_steps=2), max_steps=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = small_monitor(every_n_train_steps=2)
    logger = TensorBoardLogger(tmp_path, name="resumed", version=0)
    fit(tmp_path, [first, checkpoint], max_steps=4, logger=logger, enable_checkpointing=True)
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert state["settings"]["batch_size"] == 8 and state["probe_hash"] == first._probe_hash
    second = small_monitor(every_n_train_steps=2)
    logger = TensorBoardLogger(tmp_path, name="resumed", version=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=logger,
        callbacks=[second],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(LitClassifier(drop_rate=0.1), *loaders(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert not [w for w in record if "probe images differ" in str(w.message)]
    assert array_steps(trainer.log_dir) == array_steps(straight.log_dir) == [0, 2, 4, 6, 8]
    assert second._probe_indices == first._probe_indices and second._probe_indices is not None
    assert [e.step for e in events(trainer.log_dir).Scalars("cka/probe_seconds")] == [0, 2, 4, 6, 8]


def test_old_checkpoints_without_the_newer_keys_load():
    monitor = small_monitor()
    monitor.load_state_dict({"last_probe_step": 4, "probe_indices": [1, 2], "probe_fingerprint": [24.0, 1.0, 2.0]})
    assert monitor._last_probe_step == 4 and monitor._probe_hash is None


def test_one_monitor_used_by_a_second_trainer_starts_afresh(tmp_path):
    monitor = small_monitor()
    fit(tmp_path / "first", monitor, max_steps=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path / "second", monitor, max_steps=3, train_val=loaders(n_val=40))
    assert not [w for w in record if "probe images differ" in str(w.message)]  # no resume happened
    assert array_steps(trainer.log_dir) == [0, 3]


def test_several_monitors_coexist_and_unnamed_twins_are_refused(tmp_path):
    coarse = small_monitor(every_n_train_steps=3, name="coarse", log_images=True)
    fine = small_monitor(every_n_train_steps=2, name="fine", layers="blocks.*.attn", analyses=["cka"], log_images=True)
    trainer, _ = fit(tmp_path, [coarse, fine])
    assert coarse.state_key != fine.state_key
    assert array_steps(trainer.log_dir, "coarse") == [0, 3, 6] and array_steps(trainer.log_dir, "fine") == [0, 2, 4, 6]
    tags = events(trainer.log_dir).Tags()
    assert "coarse/cka/intra" in tags["images"] and "fine/cka/intra" in tags["images"]
    assert "fine/attention/mean_distance/blocks.0.attn" not in tags["scalars"]
    with pytest.raises(MisconfigurationException, match=r"share the name None.*give each a different name"):
        fit(tmp_path / "twins", [small_monitor(), small_monitor(every_n_train_steps=2)])


def test_csv_logger_gets_scalars_and_one_warning_about_images(tmp_path):
    with pytest.warns(UserWarning, match="CSVLogger cannot take images") as record:
        trainer, _ = fit(tmp_path, small_monitor(log_images=True), logger=CSVLogger(tmp_path), max_steps=3)
    assert len([w for w in record if "cannot take images" in str(w.message)]) == 1
    header = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "cka/offdiag_mean" in header and "attention/local_fraction/blocks.0.attn" in header
    assert array_steps(trainer.log_dir) == [0, 3]


def test_fast_dev_run_writes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(tmp_path, small_monitor(), logger=True, fast_dev_run=True, max_steps=-1)
    assert not (tmp_path / "cka").exists() and not list(tmp_path.glob("**/*.npz"))


def test_no_logger_is_a_clear_error(tmp_path):
    with pytest.raises(MisconfigurationException, match="needs a logger"):
        fit(tmp_path, small_monitor(), logger=False)


def test_lightning_pytorch_namespace(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    lit = lightning_module_class(lightning.LightningModule)()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=lightning.loggers.TensorBoardLogger(tmp_path),
        callbacks=[small_monitor()],
        **QUIET,
    )
    trainer.fit(lit, *loaders())
    assert array_steps(trainer.log_dir) == [0, 3]
    assert isinstance(small_monitor(), lightning.Callback) and isinstance(small_monitor(), pl.Callback)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_train_steps": 5, "every_n_epochs": 1}, "every_n_train_steps and every_n_epochs are mutually"),
        ({"every_n_train_steps": 5, "every_n_train_batches": 2}, "mutually exclusive"),
        ({"every_n_train_steps": 0}, r"every_n_train_steps must be an int >= 1, got 0"),
        ({"every_n_train_batches": True}, r"every_n_train_batches must be an int >= 1, got True"),
        ({"every_n_epochs": 1.5}, r"every_n_epochs must be an int >= 1"),
        ({"batch_size": 3}, r"batch_size must be an int >= 4"),
        ({"probe_size": 2}, r"probe_size must be an int >= 4"),
        ({"probe_size": "16"}, r"probe_size must be an int >= 4"),
        ({"seed": "abc"}, r"seed must be an int, got 'abc'"),
        ({"seed": 1.0}, r"seed must be an int"),
        ({"layers": 5}, r"layers must be 'auto', a module name or glob pattern, or a list of them, got 5"),
        ({"layers": []}, r"layers must be 'auto'"),
        ({"layers": ["blocks.0", 3]}, r"layers must be 'auto'"),
        ({"reduction": "max"}, r"reduction must be one of 'flatten', 'cls', 'mean', got 'max'"),
        ({"probe_data": [1, 2, 3]}, r"probe_data must be a tensor of images, a Dataset or a DataLoader"),
        ({"probe_data": torch.zeros(2, 3, 8, 8)}, r"N >= 4"),
        ({"probe_data": torch.zeros(5, 3, 8, 8, dtype=torch.long)}, r"floating images"),
        ({"probe_data": torch.zeros(5, 3, 8, 8), "probe_labels": torch.zeros(4)}, r"one per probe image"),
        ({"probe_data": torch.zeros(5, 3, 8, 8), "probe_labels": torch.zeros(5)}, r"1-D integer tensor"),
        ({"probe_labels": torch.zeros(4)}, r"probe_labels go with a tensor probe_data"),
        ({"reference": 3}, r"model must be an nn.Module, a timm model name or a checkpoint path"),
        ({"name": "a/b"}, r"without '/'"),
        ({"name": ".."}, r"not only dots"),
        ({"analyses": ["nope"]}, r"no analysis is called 'nope'; the built-in ones are"),
        ({"analyses": ["cka", LayerCKA()]}, r"cka given more than once"),
        ({"analyses": [3]}, r"analyses takes Analysis objects and names"),
        ({"log_images": "yes"}, r"log_images must be True or False"),
        ({"save_arrays": 1}, r"save_arrays must be True or False"),
        ({"input_key": ""}, r"input_key must be a dict key"),
    ],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        CKAMonitor(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LayerCKA(permutations=True), r"LayerCKA: permutations must be an int in \[0, 1000\]"),
        (lambda: LayerCKA(permutations=-1), r"permutations must be an int in \[0, 1000\]"),
        (lambda: LayerCKA(minibatch_weights="rows"), r"minibatch_weights must be one of 'equal', 'size'"),
        (lambda: Reference("resnet18", reduction="max"), r"Reference: reduction must be one of"),
        (lambda: Reference(torch.nn.Linear(2, 2), weights="w.pt"), r"weights, pretrained and kwargs apply to a model"),
        (lambda: Reference("resnet18", kwargs={"x": object()}), r"kwargs must be made of plain types"),
        (lambda: Reference("resnet18", layers=5), r"Reference: layers must be 'auto'"),
    ],
)
def test_analysis_and_reference_options_are_checked_where_they_are_written(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_scalars_are_accepted_where_ints_are():
    monitor = CKAMonitor(
        seed=np.int64(3), batch_size=np.int32(8), probe_size=np.int64(16), every_n_train_steps=np.int8(2)
    )
    assert monitor.seed == 3 and LayerCKA(permutations=np.int64(0)).permutations == 0
    assert isinstance(monitor.seed, int)


def test_linear_probe_without_labels_fails_before_training(tmp_path):
    monitor = small_monitor(probe_data=torch.randn(24, 3, 32, 32), analyses=["default", "linear_probe"])
    with pytest.raises(MisconfigurationException, match="linear_probe analysis needs class labels"):
        fit(tmp_path, monitor)


def test_bad_layer_names_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"no module matches 'blocks\.9'"):
        fit(tmp_path, small_monitor(layers=["blocks.9"]))


def test_lightning_cli_builds_the_callback_from_yaml(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_cka.CKAMonitor\n"
        "      init_args:\n"
        "        every_n_train_steps: 500\n"
        "        layers: ['blocks.*.attn', 'blocks.*.mlp']\n"
        "        reference:\n"
        "          class_path: lightning_cka.Reference\n"
        "          init_args: {model: resnet18, kwargs: {num_classes: 10}}\n"
        "        reduction: cls\n"
        "        batch_size: 128\n"
        "        analyses:\n"
        "          - default\n"
        "          - class_path: lightning_cka.analyses.LayerCKA\n"
        "            init_args: {permutations: 39}\n"
        "          - linear_probe\n"
    )
    cli = LightningCLI(pl.LightningModule, run=False, args=["--config", str(config)])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, CKAMonitor)]
    assert monitor.every_n_train_steps == 500 and monitor.batch_size == 128
    assert monitor.reference.model == "resnet18" and monitor.reference.kwargs == {"num_classes": 10}
    assert monitor.layers == ["blocks.*.attn", "blocks.*.mlp"]
    assert [a.name for a in monitor.analyses] == ["attention", "heads", "residual", "rank", "cka", "linear_probe"]
    assert monitor.analyses[4].permutations == 39


def test_lightning_cli_takes_a_reference_by_name(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_cka.CKAMonitor\n      init_args: {reference: resnet18}\n"
    )
    cli = LightningCLI(pl.LightningModule, run=False, args=["--config", str(config)])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, CKAMonitor)]
    assert monitor.reference.model == "resnet18" and monitor.analyses[0].name == "cka"


def test_a_probe_of_fewer_than_four_minibatches_warns_once_with_the_fix(tmp_path):
    with pytest.warns(
        UserWarning, match=r"24 images make 3 minibatch\(es\) of batch_size=8.*batch_size <= 4"
    ) as record:
        fit(tmp_path, small_monitor(), max_steps=6)  # three probes, one warning
    assert len([w for w in record if "minibatch(es)" in str(w.message)]) == 1

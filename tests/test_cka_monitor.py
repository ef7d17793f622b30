import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from lit_helpers import lightning_module_class, loaders, make_model
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_cka import CKAMonitor, CKAResult

LitClassifier = lightning_module_class(pl.LightningModule)
HERE = Path(__file__).parent


def fit(tmp_path, monitor=None, max_steps=6, lit=None, logger=True, train_val=None, **trainer_kwargs):
    pl.seed_everything(0)
    lit = lit() if callable(lit) and not isinstance(lit, torch.nn.Module) else lit or LitClassifier(drop_rate=0.1)
    if logger is True:
        logger = TensorBoardLogger(tmp_path, name="run")
    settings = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        callbacks=[monitor] if isinstance(monitor, CKAMonitor) else list(monitor or []),
        **{**settings, **trainer_kwargs},
    )
    trainer.fit(lit, *(train_val or loaders()))
    return trainer, lit


def small_monitor(**kwargs):
    return CKAMonitor(**{"every_n_train_steps": 3, "probe_size": 24, "batch_size": 8, **kwargs})


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def array_steps(log_dir, name=None):
    folder = Path(log_dir) / "cka" / (name or "")
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.npz"))


def test_every_documented_tag_reaches_tensorboard(tmp_path):
    monitor = small_monitor(reference=make_model("test_resnet"))
    trainer, _ = fit(tmp_path, monitor)
    acc = events(trainer.log_dir)
    images = {"cka/intra", "cka/reference", "cka/intra_change", "attention/mean_distance"}
    assert images <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("cka/intra")] == [0, 3, 6]
    assert [e.step for e in acc.Images("cka/intra_change")] == [3, 6]
    scalars = set(acc.Tags()["scalars"])
    blocks = [f"blocks.{i}" for i in range(6)]
    expected = {"cka/probe_seconds", "cka/adjacent_mean", "cka/offdiag_mean"}
    expected |= {f"cka_vs_previous/{b}" for b in blocks}
    expected |= {f"cka_reference/best_value/{b}" for b in blocks} | {f"cka_reference/best_layer/{b}" for b in blocks}
    for kind in ("mean_distance", "min_distance", "local_fraction"):
        expected |= {f"attention/{kind}/{b}.attn" for b in blocks}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in acc.Scalars("cka/probe_seconds")] == [0, 3, 6]
    assert all(e.value > 0 for e in acc.Scalars("cka/probe_seconds"))
    best = [e.value for e in acc.Scalars("cka_reference/best_layer/blocks.0")]
    assert all(v in (0, 1, 2, 3) for v in best)


def test_arrays_hold_every_documented_field(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(reference=make_model("test_resnet")))
    assert array_steps(trainer.log_dir) == [0, 3, 6]
    path = Path(trainer.log_dir) / "cka" / "step_0000006.npz"
    with np.load(path, allow_pickle=False) as raw:
        for key in ("intra", "layers", "reference", "reference_layers", "mean_attention_distance", "step", "epoch"):
            assert key in raw.files
    result = CKAResult.load(path)
    assert result.layers == [f"blocks.{i}" for i in range(6)]
    assert result.reference_layers == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert result.intra.shape == (6, 6) and result.reference.shape == (6, 4) and result.previous.shape == (6, 6)
    assert result.mean_attention_distance.shape == (6, 2)
    assert result.reference_mean_attention_distance.size == 0
    assert result.uniform_attention_distance > 0 and np.isnan(result.reference_uniform_attention_distance)
    assert result.step == 6 and result.num_examples == 24
    np.testing.assert_allclose(np.diagonal(result.intra), 1.0)
    assert np.all(result.intra <= 1 + 1e-9)


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    runs = []
    for with_monitor in (False, True):
        for name in ("test_vit", "test_resnet"):  # dropout and BatchNorm
            monitor = (
                small_monitor(every_n_train_steps=2, reference=make_model("test_resnet")) if with_monitor else None
            )
            lit = lambda name=name: LitClassifier(name, drop_rate=0.2)  # noqa: E731 (built after seeding)
            _, lit = fit(tmp_path / str(len(runs)), monitor, max_steps=5, lit=lit)
            runs.append((name, torch.stack(lit.losses), {k: v.clone() for k, v in lit.state_dict().items()}))
    for (name, losses, weights), (_, losses_m, weights_m) in zip(runs[:2], runs[2:], strict=True):
        assert torch.equal(losses, losses_m), name
        assert weights.keys() == weights_m.keys()
        for key in weights:
            assert torch.equal(weights[key], weights_m[key]), (name, key)


def test_bf16_mixed_precision(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(reference=make_model("test_resnet")), precision="bf16-mixed")
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000006.npz")
    assert np.isfinite(result.intra).all() and np.isfinite(result.reference).all()


def test_gradient_accumulation_probes_each_optimizer_step_once(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(every_n_train_steps=1), max_steps=3, accumulate_grad_batches=2)
    assert array_steps(trainer.log_dir) == [0, 1, 2, 3]
    assert [e.step for e in events(trainer.log_dir).Scalars("cka/probe_seconds")] == [0, 1, 2, 3]


def test_every_n_epochs(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(every_n_train_steps=None, every_n_epochs=1), max_steps=-1, max_epochs=2)
    assert array_steps(trainer.log_dir) == [0, 4, 8]  # 64 training examples, batches of 16


def test_compiled_model(tmp_path):
    lit = LitClassifier()
    lit.model = torch.compile(lit.model, backend="eager")
    trainer, _ = fit(tmp_path, small_monitor(), lit=lit)
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000006.npz")
    assert result.layers == [f"blocks.{i}" for i in range(6)]
    assert result.mean_attention_distance.shape == (6, 2)


def test_no_validation_falls_back_to_the_training_data(tmp_path):
    train, _ = loaders()
    trainer, _ = fit(tmp_path, small_monitor(), train_val=(train,), limit_val_batches=0)
    assert array_steps(trainer.log_dir) == [0, 3, 6]


def test_dict_batches_with_input_key_and_a_custom_extraction(tmp_path):
    train_val = loaders(dict_batches=True)
    trainer, _ = fit(
        tmp_path / "a", small_monitor(input_key="pixels"), lit=LitClassifier(dict_batches=True), train_val=train_val
    )
    assert array_steps(trainer.log_dir) == [0, 3, 6]

    class PixelsMonitor(CKAMonitor):
        def extract_inputs(self, batch):
            return batch["pixels"]

    monitor = PixelsMonitor(every_n_train_steps=3, probe_size=24, batch_size=8)
    trainer, _ = fit(tmp_path / "b", monitor, lit=LitClassifier(dict_batches=True), train_val=train_val)
    assert array_steps(trainer.log_dir) == [0, 3, 6]
    with pytest.raises(KeyError, match=r"keys: \['label', 'pixels'\]\); pass input_key"):
        fit(tmp_path / "c", small_monitor(), lit=LitClassifier(dict_batches=True), train_val=train_val)


def test_constant_layer_is_nan_with_a_warning_and_training_continues(tmp_path):
    class WithDeadBranch(LitClassifier):
        def __init__(self):
            super().__init__()
            self.dead = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.model(x) + 0 * self.dead(torch.zeros_like(x[:, :, 0, :3]).mean(1))

    with pytest.warns(UserWarning, match=r"CKA is NaN for layer\(s\) dead"):
        trainer, _ = fit(tmp_path, small_monitor(layers=["blocks.0", "dead", "blocks.5"]), lit=WithDeadBranch())
    assert trainer.global_step == 6
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000006.npz")
    assert result.layers == ["model.blocks.0", "dead", "model.blocks.5"]
    assert np.isnan(result.intra[1]).all() and np.isfinite(result.intra[[0, 2]][:, [0, 2]]).all()


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


def test_reference_by_timm_name_with_a_lightning_checkpoint_of_another_run(tmp_path):
    donor = LitClassifier("test_resnet")
    trainer, _ = fit(tmp_path / "donor", None, lit=donor, max_steps=2)
    ckpt = tmp_path / "donor.ckpt"
    trainer.save_checkpoint(ckpt)
    monitor = small_monitor(reference="test_resnet", reference_weights=str(ckpt), reference_kwargs={"num_classes": 4})
    trainer, _ = fit(tmp_path / "run", monitor)
    assert torch.equal(monitor._reference_model.fc.weight, donor.model.fc.weight)
    assert not monitor._reference_model.training and not any(
        p.requires_grad for p in monitor._reference_model.parameters()
    )
    with pytest.raises(ValueError, match=r"do not fit ResNet.*num_classes"):
        fit(tmp_path / "bad", small_monitor(reference="test_resnet", reference_weights=str(ckpt)))


def test_resume_keeps_probe_identity_and_cadence(tmp_path):
    straight, _ = fit(tmp_path / "straight", small_monitor(every_n_train_steps=2), max_steps=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = small_monitor(every_n_train_steps=2)
    logger = TensorBoardLogger(tmp_path, name="resumed", version=0)
    fit(tmp_path, [first, checkpoint], max_steps=4, logger=logger, enable_checkpointing=True)
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
    steps = [e.step for e in events(trainer.log_dir).Scalars("cka/probe_seconds")]
    assert steps == [0, 2, 4, 6, 8]  # no step probed twice, none missing


def test_several_monitors_coexist(tmp_path):
    coarse = small_monitor(every_n_train_steps=3, name="coarse")
    fine = small_monitor(every_n_train_steps=2, name="fine", layers="blocks.*.attn", attention=False)
    trainer, _ = fit(tmp_path, [coarse, fine])
    assert coarse.state_key != fine.state_key
    assert array_steps(trainer.log_dir, "coarse") == [0, 3, 6]
    assert array_steps(trainer.log_dir, "fine") == [0, 2, 4, 6]
    tags = events(trainer.log_dir).Tags()
    assert "coarse/cka/intra" in tags["images"] and "fine/cka/intra" in tags["images"]
    assert "fine/attention/mean_distance/blocks.0.attn" not in tags["scalars"]


def test_csv_logger_gets_scalars_and_one_warning_about_images(tmp_path):
    with pytest.warns(UserWarning, match="CSVLogger cannot take images") as record:
        trainer, _ = fit(tmp_path, small_monitor(), logger=CSVLogger(tmp_path))
    assert len([w for w in record if "cannot take images" in str(w.message)]) == 1
    header = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "cka/offdiag_mean" in header and "attention/local_fraction/blocks.0.attn" in header
    assert array_steps(trainer.log_dir) == [0, 3, 6]


def test_no_logger_is_a_clear_error(tmp_path):
    with pytest.raises(MisconfigurationException, match="needs a logger"):
        fit(tmp_path, small_monitor(), logger=False)


def test_simple_profiler_shows_the_callback_hooks(tmp_path):
    trainer, _ = fit(tmp_path, small_monitor(), profiler="simple")
    actions = trainer.profiler.recorded_durations
    assert any("CKAMonitor" in action and "on_train_batch_end" in action for action in actions)


def test_lightning_pytorch_namespace(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    lit = lightning_module_class(lightning.LightningModule)()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=lightning.loggers.TensorBoardLogger(tmp_path),
        callbacks=[small_monitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(lit, *loaders())
    assert array_steps(trainer.log_dir) == [0, 3]
    assert isinstance(small_monitor(), lightning.Callback) and isinstance(small_monitor(), pl.Callback)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_train_steps": 5, "every_n_epochs": 1}, "mutually exclusive"),
        ({"every_n_train_steps": 0}, "positive int"),
        ({"batch_size": 3}, "batch_size must be an int >= 4"),
        ({"probe_size": 2}, "probe_size must be an int >= 4"),
        ({"reduction": "max"}, "reduction must be one of"),
        ({"reference_reduction": "max"}, "reference_reduction must be one of"),
        ({"attention": "yes"}, "attention must be"),
        ({"local_threshold": 2.0}, "local_threshold"),
        ({"probe": [1, 2, 3]}, "probe must be a tensor"),
        ({"probe": torch.zeros(2, 3, 8, 8)}, "N >= 4"),
        ({"reference": 3}, "reference must be an nn.Module"),
        ({"reference_weights": "x.ckpt"}, "without reference"),
        ({"name": "a/b"}, "without '/'"),
    ],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        CKAMonitor(**kwargs)


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
        "        reference: resnet18\n"
        "        reference_kwargs: {num_classes: 10}\n"
        "        reduction: cls\n"
        "        batch_size: 128\n"
    )
    cli = LightningCLI(pl.LightningModule, run=False, args=["--config", str(config)])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, CKAMonitor)]
    assert monitor.every_n_train_steps == 500 and monitor.reference == "resnet18" and monitor.batch_size == 128
    assert monitor.layers == ["blocks.*.attn", "blocks.*.mlp"] and monitor.reference_kwargs == {"num_classes": 10}


def test_ddp_two_processes_write_the_same_arrays_as_one(tmp_path):
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        proc = subprocess.run(
            [sys.executable, str(HERE / "ddp_fit.py"), "--devices", str(devices), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = tmp_path / "devices1" / "run", tmp_path / "devices2" / "run"
    assert [p.name for p in double.iterdir()] == ["version_0"]  # one set of files
    assert array_steps(double / "version_0") == array_steps(single / "version_0") == [0, 2, 4]
    for step in (0, 2, 4):
        a = CKAResult.load(single / "version_0" / "cka" / f"step_{step:07d}.npz")
        b = CKAResult.load(double / "version_0" / "cka" / f"step_{step:07d}.npz")
        assert a.layers == b.layers and a.reference_layers == b.reference_layers and b.num_examples == 32
        for field in ("intra", "reference", "reference_intra", "previous", "mean_attention_distance"):
            np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-7, atol=1e-8, err_msg=field)

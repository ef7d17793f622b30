"""The README's promise that training with the monitor is training without it: every way of giving a reference, every
probe source, every RNG, and the user's own data streams and hooks.

Each test fits the same seeded run twice, with and without the monitor, and compares what training did exactly: the
losses, every weight, and draws from the NumPy and Python RNGs made inside ``training_step``.
"""

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import array_steps, images_and_labels, lightning_module_class, loaders, make_model
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_cka import CKAMonitor, CKAResult, Reference
from lightning_cka.probe_data.sample import load_probe

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
Base = lightning_module_class(pl.LightningModule)


class Recording(Base):
    """Records, per training step, the loss and one draw of each of NumPy's and Python's global RNGs."""

    def training_step(self, batch, batch_idx):
        self.draws = getattr(self, "draws", [])
        self.draws.append((np.random.rand(), random.random()))
        return super().training_step(batch, batch_idx)


def every_analysis(**kwargs):
    """A monitor with every analysis on, probing every 2 steps."""
    options = {"every_n_train_steps": 2, "probe_size": 16, "batch_size": 8, "log_images": False}
    options["analyses"] = ["default", "localization", "linear_probe"]
    return CKAMonitor(**{**options, **kwargs})


def fit(tmp_path, model_name, monitor=None, train_val=None, max_steps=4, **trainer_kwargs):
    pl.seed_everything(0)
    lit = Recording(model_name, drop_rate=0.2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[monitor] if monitor else [],
        **{**QUIET, **trainer_kwargs},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, *(train_val or loaders()))
    return trainer, lit


def assert_same_training(plain, monitored):
    (_, a), (_, b) = plain, monitored
    assert torch.equal(torch.stack(a.losses), torch.stack(b.losses))
    assert a.draws == b.draws
    weights_a, weights_b = a.state_dict(), b.state_dict()
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def lightning_checkpoint(path, name):
    """A checkpoint as ``examples/train.py`` saves it: weights under ``model.`` and the timm name."""
    torch.manual_seed(123)
    model = make_model(name)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"timm_name": name, "timm_kwargs": {"num_classes": 4}}}, path)
    return path


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return {name: fit(root / name, name) for name in ("test_vit", "test_resnet")}


REFERENCE_WAYS = ("module", "timm name", "checkpoint path", "weights path")


@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet"])
@pytest.mark.parametrize("way", REFERENCE_WAYS)
def test_bit_identical_for_every_way_of_giving_a_reference(tmp_path, baselines, model_name, way):
    checkpoint = lightning_checkpoint(tmp_path / "ref.ckpt", "test_resnet")
    weights = tmp_path / "ref.pt"
    torch.save(make_model("test_resnet").state_dict(), weights)
    reference = {
        "module": {"reference": make_model("test_resnet")},
        "timm name": {"reference": Reference("test_resnet", kwargs={"num_classes": 4})},
        "checkpoint path": {"reference": checkpoint},
        "weights path": {"reference": Reference("test_resnet", weights=weights, kwargs={"num_classes": 4})},
    }[way]
    monitored = fit(tmp_path / "run", model_name, every_analysis(**reference))
    assert array_steps(monitored[0].log_dir) == [0, 2, 4]
    result = CKAResult.load(Path(monitored[0].log_dir) / "cka" / "step_0000004.npz")
    assert result.reference is not None and result.linear_probe_accuracy is not None
    assert_same_training(baselines[model_name], monitored)


@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet"])
@pytest.mark.parametrize("source", ["validation", "given", "training"])
def test_bit_identical_for_every_probe_source(tmp_path, baselines, model_name, source):
    train, val = loaders()
    train_val = (train, val) if source != "training" else (train,)
    probe = {}
    if source == "given":
        images, labels = images_and_labels(16, seed=7)
        probe = {"probe_data": images, "probe_labels": labels}
    extra = {"limit_val_batches": 0} if source == "training" else {}
    monitored = fit(tmp_path, model_name, every_analysis(**probe), train_val=train_val, **extra)
    assert array_steps(monitored[0].log_dir) == [0, 2, 4]
    plain = (
        baselines[model_name] if source != "training" else fit(tmp_path / "plain", model_name, None, train_val, **extra)
    )
    assert_same_training(plain, monitored)


class Stream(IterableDataset):
    """A stateful stream: every example is handed out once, whoever iterates it (a queue, a socket, a generator)."""

    def __init__(self, n=256):
        self.images, self.labels = images_and_labels(n)
        self.position = 0
        self.handed_out = []

    def __iter__(self):
        while self.position < len(self.images):
            i, self.position = self.position, self.position + 1
            self.handed_out.append(i)
            yield self.images[i], self.labels[i]


def test_a_stateful_training_stream_is_never_consumed(tmp_path):
    plain_stream, monitored_stream = Stream(), Stream()
    plain = fit(tmp_path / "plain", "test_vit", train_val=(DataLoader(plain_stream, batch_size=16),), max_steps=3)
    monitor = CKAMonitor(every_n_train_steps=2, probe_size=16, batch_size=8, log_images=False)
    with pytest.warns(UserWarning, match=r"no validation DataLoader.*stream.*probe_data=") as record:
        pl.seed_everything(0)
        lit = Recording("test_vit", drop_rate=0.2)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=3, logger=TensorBoardLogger(tmp_path, "run"), callbacks=[monitor], **QUIET
        )
        trainer.fit(lit, DataLoader(monitored_stream, batch_size=16))
    assert len([w for w in record if "never reads" in str(w.message)]) == 1
    # 3 training batches of 16, and the one Lightning's fetcher reads ahead: nothing for the monitor.
    assert monitored_stream.handed_out == plain_stream.handed_out == list(range(64))
    assert_same_training(plain, (trainer, lit))
    assert array_steps(trainer.log_dir) == []  # nothing to probe: said once, training untouched


def test_the_probe_comes_from_validation_before_lightning_has_loaded_it(tmp_path):
    train, val = loaders()
    monitor = CKAMonitor(every_n_train_steps=2, probe_size=16, batch_size=8, log_images=False)
    trainer, _ = fit(tmp_path, "test_vit", monitor, check_val_every_n_epoch=2, num_sanity_val_steps=0)
    probe = load_probe(Path(trainer.log_dir) / "cka" / "probe.npz")
    val_images = val.dataset.tensors[0]
    assert torch.equal(probe.images, val_images[probe.indices])
    assert not torch.equal(probe.images, train.dataset.tensors[0][probe.indices])
    result = CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000002.npz")
    assert result.settings_dict()["probe_source"] == "the validation DataLoader's dataset (16 of its 32 examples)"


class UnsizedImages(IterableDataset):
    def __iter__(self):
        images, labels = images_and_labels(32, seed=1)
        yield from zip(images, labels, strict=True)


def test_an_unsized_iterable_validation_set(tmp_path):
    train, _ = loaders()
    monitor = CKAMonitor(every_n_train_steps=2, probe_size=16, batch_size=8, log_images=False)
    trainer, _ = fit(tmp_path, "test_vit", monitor, train_val=(train, DataLoader(UnsizedImages(), batch_size=8)))
    assert array_steps(trainer.log_dir) == [0, 2, 4]
    probe = load_probe(Path(trainer.log_dir) / "cka" / "probe.npz")
    assert torch.equal(probe.images, images_and_labels(32, seed=1)[0][:16])


def test_overriding_forward_probe_as_the_docs_suggest(tmp_path):
    class Inner(CKAMonitor):
        def forward_probe(self, pl_module, inputs):
            return pl_module.model(inputs)

    reference = make_model("test_resnet")
    plain_monitor = every_analysis(reference=reference)
    overridden = Inner(
        every_n_train_steps=2,
        probe_size=16,
        batch_size=8,
        log_images=False,
        reference=reference,
        analyses=["default", "localization", "linear_probe"],
    )
    a, _ = fit(tmp_path / "a", "test_vit", plain_monitor)
    b, _ = fit(tmp_path / "b", "test_vit", overridden)
    assert array_steps(b.log_dir) == [0, 2, 4]
    ra = CKAResult.load(Path(a.log_dir) / "cka" / "step_0000004.npz")
    rb = CKAResult.load(Path(b.log_dir) / "cka" / "step_0000004.npz")
    for key in ("intra", "reference", "mean_attention_distance", "localization", "head_reference"):
        np.testing.assert_allclose(rb.get(key), ra.get(key), rtol=1e-6, atol=1e-7, err_msg=key)
    assert rb.layers == ra.layers


class TwoOptimizers(Base):
    """Manual optimization with two optimizers: Lightning's global_step advances twice per batch."""

    def __init__(self):
        super().__init__("test_vit")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        for optimizer in (first, second):
            loss = self.loss(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        head = list(self.model.head.parameters())
        body = [p for n, p in self.model.named_parameters() if not n.startswith("head.")]
        return torch.optim.SGD(body, lr=1e-3), torch.optim.SGD(head, lr=1e-3)


def test_two_optimizers_probe_by_batches_or_crossings_of_the_step_cadence(tmp_path):
    by_batches = CKAMonitor(every_n_train_batches=3, probe_size=16, batch_size=8, log_images=False)
    by_steps = CKAMonitor(every_n_train_steps=3, probe_size=16, batch_size=8, log_images=False, name="steps")
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=14,
        logger=TensorBoardLogger(tmp_path, "run"),
        callbacks=[by_batches, by_steps],
        **QUIET,
    )
    trainer.fit(TwoOptimizers(), *loaders(n_train=128))
    assert trainer.global_step == 14  # 7 batches, two optimizer steps each
    # Every 3 batches: after batches 3 and 6 (global steps 6 and 12), and the final model.
    assert array_steps(trainer.log_dir) == [0, 6, 12, 14]
    # Every 3 optimizer steps, each multiple of 3 crossed: 3 -> at step 4, 6, 9 -> at 10, 12, and the final model.
    assert array_steps(trainer.log_dir, "steps") == [0, 4, 6, 10, 12, 14]

"""The README's promise that no probe already measured is lost or half-written: real SIGKILLs, a read-only and a full
file system (real mounts in a private mount namespace), and checkpoints that hold only plain types.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lit_helpers import array_steps, lightning_module_class, loaders, make_model
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_cka import CKAMonitor, CKAResult, Reference

HERE = Path(__file__).parent
SCRIPT = HERE / "durability_fit.py"


def run_script(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def monitor_state(checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    (monitor,) = [s for key, s in state["callbacks"].items() if key.startswith("CKAMonitor")]
    return state["global_step"], monitor


def readable_steps(log_dir):
    steps = array_steps(log_dir)
    for step in steps:
        CKAResult.load(Path(log_dir) / "cka" / f"step_{step:07d}.npz")  # complete files, not cut short
    return steps


def test_a_sigkill_loses_no_probe_that_a_checkpoint_counts_and_the_resumed_run_goes_on(tmp_path):
    killed = run_script("kill", "--out", str(tmp_path))
    assert killed.returncode == -9, killed.stderr[-2000:]
    log_dir = tmp_path / "run" / "version_0"
    step, state = monitor_state(tmp_path / "ckpt" / "last.ckpt")
    assert step == 6 and state["last_probe_step"] == 6
    # Every probe the checkpoint counts is on disk, whole (and the probe of the step being checkpointed when killed).
    assert readable_steps(log_dir) == list(range(8))
    resumed = run_script("resume", "--out", str(tmp_path), "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert readable_steps(log_dir) == list(range(11))


def test_a_sigkill_while_a_probe_is_written_costs_that_probe_only(tmp_path):
    killed = run_script("kill-mid", "--out", str(tmp_path))
    assert killed.returncode == -9, killed.stderr[-2000:]
    log_dir = tmp_path / "run" / "version_0"
    assert readable_steps(log_dir) == list(range(7))
    assert [p.name.split(".")[1] for p in (log_dir / "cka").glob(".step_*.tmp")] == ["step_0000007"]
    step, state = monitor_state(tmp_path / "ckpt" / "last.ckpt")
    assert step == 6 and state["last_probe_step"] == 6
    from lightning_cka.cli import main

    assert main(["summary", str(log_dir)]) == 0  # the leftover temporary file is not read as a probe


def run_on_its_own_file_system(tmp_path, mode):
    """Run the script on a 64 MiB tmpfs mounted in a private mount namespace, and copy its logs out."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs util-linux's unshare and mount to give the run a file system of its own")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine allows no private mount namespace (unshare -rm: {probe.stderr.decode().strip()})")
    mount, copy = tmp_path / "mnt", tmp_path / "copy"
    mount.mkdir()
    command = (
        f"mount -t tmpfs -o size=64m tmpfs {mount} && {sys.executable} {SCRIPT} {mode} --out {mount}; "
        f"status=$?; cp -a {mount}/run {copy}; exit $status"
    )
    return subprocess.run(
        ["unshare", "-rm", "--propagation", "private", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
    ), copy / "version_0"


@pytest.mark.parametrize("mode", ["ro", "full"])
def test_a_broken_file_system_costs_pictures_and_scalars_never_arrays_nor_the_fit(tmp_path, mode):
    proc, log_dir = run_on_its_own_file_system(tmp_path, mode)
    assert proc.returncode == 0 and "fit finished" in proc.stdout, proc.stderr[-3000:]
    assert "could not write" in proc.stderr  # said, not silent
    # The probes of steps 2 to 5 could not be written while it was broken: they are written once it is mended.
    assert readable_steps(log_dir) == list(range(9))
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("cka/offdiag_mean")]
    assert {6, 7, 8} <= set(steps)  # what the writer thread had not written before the break may be lost
    assert {6, 7, 8} <= {e.step for e in events.Images("cka/intra")}


def test_path_like_arguments_and_a_checkpoint_of_plain_types(tmp_path):
    weights = tmp_path / "reference.pt"
    torch.save(make_model("test_resnet").state_dict(), weights)
    monitor = CKAMonitor(
        every_n_train_steps=2,
        probe_size=16,
        batch_size=8,
        log_images=False,
        reference=Reference("test_resnet", weights=weights, kwargs={"num_classes": 4}),  # weights: a pathlib.Path
    )
    Lit = lightning_module_class(pl.LightningModule)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_steps=4, logger=TensorBoardLogger(tmp_path, "run", version=0), callbacks=[monitor, checkpoint], **quiet
        )
        trainer.fit(Lit(), *loaders())
    assert array_steps(trainer.log_dir) == [0, 2, 4]
    assert CKAResult.load(Path(trainer.log_dir) / "cka" / "step_0000004.npz").reference is not None
    _, state = monitor_state(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")  # weights_only: plain types only
    assert state["settings"]["reference"]["weights"] == str(weights)
    resumed = CKAMonitor(every_n_train_steps=2, probe_size=16, batch_size=8, log_images=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_steps=6, logger=TensorBoardLogger(tmp_path, "run", version=0), callbacks=[resumed], **quiet
        )
        trainer.fit(Lit(), *loaders(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert array_steps(trainer.log_dir) == [0, 2, 4, 6]

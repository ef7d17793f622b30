"""A small monitored fit that breaks its own process or file system on purpose (run as a script by the tests).

Modes:
    kill      SIGKILL the process at step 7, right after its probe (checkpoint and probe every step).
    kill-mid  SIGKILL the process while the arrays of step 7 are being renamed into place.
    resume    resume from ``--ckpt`` up to step 10.
    ro        remount the file system holding ``--out`` read-only from step 1 to step 5.
    full      fill the file system holding ``--out`` from step 1 to step 5.

``ro`` and ``full`` need ``--out`` to be a mount point of their own (the tests run them under ``unshare -m``).
"""

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))
from lit_helpers import lightning_module_class, loaders

from lightning_cka import CKAMonitor

Base = lightning_module_class(pl.LightningModule)


class NoValidationLogging(Base):
    """Lightning itself writes nothing while the file system is broken: every write then is the monitor's."""

    def validation_step(self, batch, batch_idx):
        pass


class KillAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class BreakFileSystem(pl.Callback):
    """Breaks the file system after step 1 and mends it after step 5."""

    def __init__(self, root, mode):
        self.root, self.mode = Path(root), mode

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            if self.mode == "ro":
                subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)
            else:
                with open(self.root / "filler", "wb") as fh:
                    try:
                        while True:
                            fh.write(b"\0" * (1 << 16))
                            fh.flush()
                    except OSError:
                        pass
        if trainer.global_step == 5:
            if self.mode == "ro":
                subprocess.run(["mount", "-o", "remount,rw", str(self.root)], check=True)
            else:
                (self.root / "filler").unlink()


def kill_while_renaming(step):
    """SIGKILL the process when the arrays of ``step`` are about to be renamed into place."""
    replace = os.replace

    def dying_replace(src, dst, *args, **kwargs):
        if str(dst).endswith(f"step_{step:07d}.npz"):
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = dying_replace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("kill", "kill-mid", "resume", "ro", "full"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    monitor = CKAMonitor(every_n_train_steps=1, probe_size=16, batch_size=8, log_images=True)
    callbacks = [monitor]
    checkpointing = args.mode in ("kill", "kill-mid", "resume")
    if checkpointing:
        callbacks.append(ModelCheckpoint(dirpath=Path(args.out) / "ckpt", every_n_train_steps=1, save_last=True))
    if args.mode == "kill":
        callbacks.append(KillAt(7))
    if args.mode == "kill-mid":
        kill_while_renaming(7)
    if args.mode in ("ro", "full"):
        callbacks.append(BreakFileSystem(args.out, args.mode))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=10 if args.mode == "resume" else 8,
        logger=TensorBoardLogger(args.out, name="run", version=0),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        log_every_n_steps=1,
    )
    trainer.fit(NoValidationLogging(), *loaders(), ckpt_path=args.ckpt)
    print("fit finished", flush=True)


if __name__ == "__main__":
    main()

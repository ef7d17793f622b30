"""Fit a small ViT with CKAMonitor and a ResNet reference on 1 or 2 CPU processes (run as a script by the tests)."""

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))
from lit_helpers import lightning_module_class, loaders, make_model

from lightning_cka import CKAMonitor


class FailsOnRank1(CKAMonitor):
    """With two processes, the probe at step 4 fails on rank 1 only: rank 0 must report rank 1's error."""

    def forward_probe(self, pl_module, inputs):
        if pl_module.trainer.world_size > 1 and pl_module.global_rank == 1 and pl_module.global_step == 4:
            raise RuntimeError("rank 1 fails at step 4")
        return pl_module(inputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--probe-size", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same float32 summation order in every process, so both runs compare exactly
    pl.seed_everything(0, workers=True)
    reference = make_model("test_resnet")
    # Every analysis: with --probe-size 8 there is one minibatch, so rank 1 has none and must still take part.
    monitor = FailsOnRank1(
        every_n_train_steps=2,
        probe_size=args.probe_size,
        batch_size=8,
        reference=reference,
        log_images=False,
        analyses=["default", "localization", "linear_probe"],
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=6,
        logger=TensorBoardLogger(args.out, name="run", version=0),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=True,
    )
    # lr=0: the weights stay put, so every probe of the two runs must agree (DDP training itself is not under test).
    lit = lightning_module_class(pl.LightningModule)(lr=0.0)
    train, val = loaders(batch_size=8 // args.devices, shuffle=False, n_val=max(40, args.probe_size))  # same batch
    trainer.fit(lit, train, val)


if __name__ == "__main__":
    main()

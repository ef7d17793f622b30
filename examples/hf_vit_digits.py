"""A Hugging Face ViT trained on the digits with the monitor: every analysis, on a transformers model.

    pip install -e ".[examples,hf]"
    python examples/hf_vit_digits.py                 # a few minutes on a CPU (7 CPU-minutes, val accuracy 0.86)
    tensorboard --logdir runs/hf_vit_digits          # the CKA tab, the images and the scalars
    lightning-cka summary runs/hf_vit_digits/version_0

The model is ``transformers.ViTForImageClassification`` built from a small config (no download): 4 blocks of 64
channels and 4 heads on the 32 px digits of scikit-learn (``examples/image_data.py``), in 8 x 8 patches of 4 px. Its
LightningModule calls it the Hugging Face way (``pixel_values=``, ``labels=``, the loss from the model's output), on
batches that are dicts; the monitor finds the encoder's blocks, the class token, the attention under SDPA (its
probabilities are formed from the ``q_proj`` / ``k_proj`` outputs, the model's kernel untouched), the heads, the
residual branches and the patch embedding by itself.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).parent))
from image_data import digits_splits

from lightning_cka import CKAMonitor


class PixelValues(Dataset):
    """A ``(image, label)`` dataset as the dicts Hugging Face pipelines use: ``pixel_values`` and ``labels``."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.data[index]
        return {"pixel_values": image, "labels": label}


class HFViTClassifier(pl.LightningModule):
    """``transformers.ViTForImageClassification`` from a config, trained with its own loss."""

    def __init__(self, hidden: int = 64, depth: int = 4, heads: int = 4, lr: float = 1e-3, num_classes: int = 10):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        self.save_hyperparameters()
        config = ViTConfig(
            image_size=32,
            patch_size=4,
            hidden_size=hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            num_labels=num_classes,
        )
        self.model = ViTForImageClassification(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["pixel_values"])
        self.log("val_acc", (logits.argmax(dim=-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--train-size", type=int, help="train on this many of the 1197 training images")
    parser.add_argument("--hidden", type=int, default=64, help="ViT width (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks (default: %(default)s)")
    parser.add_argument("--cka-every", type=int, default=100, help="probe every N steps (default: %(default)s)")
    parser.add_argument("--probe-size", type=int, default=256, help="probe images (default: %(default)s)")
    parser.add_argument("--cka-batch-size", type=int, default=64, help="probe minibatch (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=100, help="validate every N steps (default: %(default)s)")
    parser.add_argument(
        "--reference", help="a reference to compare with: a timm name, a checkpoint, e.g. one of examples/train.py"
    )
    parser.add_argument("--out", type=Path, default=Path("runs"), help="log folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and monitor; returns where the run is and its last validation accuracy."""
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed)
    train, val, _, num_classes = digits_splits()
    if args.train_size:
        train = Subset(train, range(min(args.train_size, len(train))))
    train_loader = DataLoader(PixelValues(train), batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(PixelValues(val), batch_size=args.batch_size)
    monitor = CKAMonitor(
        every_n_train_steps=args.cka_every,
        probe_size=args.probe_size,
        batch_size=args.cka_batch_size,
        reference=args.reference,
        analyses=["default", "localization", "linear_probe"],
    )
    trainer = pl.Trainer(
        accelerator="auto",
        max_steps=args.max_steps,
        val_check_interval=min(args.val_every, max(1, len(train_loader))),
        check_val_every_n_epoch=None,
        logger=TensorBoardLogger(args.out, name="hf_vit_digits"),
        callbacks=[monitor],
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    model = HFViTClassifier(hidden=args.hidden, depth=args.depth, num_classes=num_classes)
    trainer.fit(model, train_loader, val_loader)
    accuracy = trainer.callback_metrics.get("val_acc")
    summary = {
        "log_dir": trainer.log_dir,
        "steps": trainer.global_step,
        "val_acc": float(accuracy) if accuracy is not None else None,
    }
    print(
        f"val accuracy {summary['val_acc']}; probes in {trainer.log_dir}/cka; lightning-cka summary {trainer.log_dir}"
    )
    return summary


if __name__ == "__main__":
    main()

"""The LightningModule of the examples: a timm classifier and the model presets for 32 px images."""

import math
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import Tensor

IMAGE_SIZE = 32
VIT_32PX = {"img_size": IMAGE_SIZE, "patch_size": 4}  # an 8 x 8 grid of 4 px patches, as usual for ViTs on CIFAR
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> timm name and timm.create_model kwargs
    # ViT-Tiny at half depth and width with average pooling: learns the digits in a few CPU minutes.
    "vit_mini_patch4": (
        "vit_tiny_patch16_224",
        {**VIT_32PX, "depth": 6, "embed_dim": 96, "num_heads": 4, "global_pool": "avg"},
    ),
    "vit_tiny_patch4": ("vit_tiny_patch16_224", VIT_32PX),
    "vit_small_patch4": ("vit_small_patch16_224", VIT_32PX),
    # Registered with timm by lightning_cka.models (3x3 stride-1 stem, no max-pool).
    "resnet18_cifar": ("resnet18_cifar", {}),
}


class ImageClassifier(pl.LightningModule):
    """A timm classifier trained with AdamW and a warmup + cosine schedule.

    The hyperparameters ``timm_name`` and ``timm_kwargs`` name the architecture, so that
    ``CKAMonitor(reference="last.ckpt")`` (``lightning_cka.reference.load_reference``) rebuilds it from a checkpoint.

    Args:
        timm_name: the model's name for ``timm.create_model``.
        timm_kwargs: its keyword arguments (``num_classes``, ``img_size``, ...).
        lr: peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms and position embeddings).
        warmup_fraction: fraction of the training steps over which the learning rate rises linearly to ``lr``.
    """

    def __init__(
        self,
        timm_name: str,
        timm_kwargs: dict[str, Any],
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(timm_name, **timm_kwargs)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits of a batch of images."""
        return self.model(images)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        metrics = {f"{stage}/loss": loss, f"{stage}/accuracy": accuracy}
        self.log_dict(metrics, prog_bar=True, batch_size=len(labels), sync_dist=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy loss of one batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log validation loss and accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log test loss and accuracy."""
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warmup and cosine decay to 0 over all training steps, stepped every step."""
        optimizer = create_optimizer_v2(self.model, "adamw", lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, int(self.hparams.warmup_fraction * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def timm_spec(name: str, num_classes: int, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The timm name and ``create_model`` kwargs of a preset or a timm model name, for 32 px images.

    A plain timm name gets ``img_size=32`` when its model accepts it (ViTs need it; ResNets and EfficientNets take any
    size). ``extra`` kwargs override the preset's.
    """
    if name in PRESETS:
        timm_name, kwargs = PRESETS[name]
    elif timm.is_model(name):
        timm_name, kwargs = name, {"img_size": IMAGE_SIZE}
    else:
        raise ValueError(
            f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a timm model name; list names with "
            "python -c \"import timm; print(timm.list_models('vit_*'))\"."
        )
    kwargs = {**kwargs, "num_classes": num_classes, **(extra or {})}
    if "img_size" in kwargs and "img_size" not in (extra or {}):
        try:  # on the meta device: checks the signature without allocating weights
            with torch.device("meta"):
                timm.create_model(timm_name, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            kwargs.pop("img_size")
    return timm_name, kwargs

"""The LightningModule of the examples: a timm classifier, the model presets for 32 px images, and two timm models.

Importing this module registers two models with timm, so that ``timm.create_model`` (and therefore a checkpoint's
``timm_name``) can name them:

- ``vit_no_skip``: a timm ViT (``base``) whose chosen blocks lose the skip connection of their attention and / or MLP
  branch (``no_skip=["3:attn", "3:mlp"]``), the paper's skip-connection experiment;
- ``efficientnet_cifar``: a timm EfficientNet (``base``) whose stem convolution has stride 1, so that its stages run
  at 32, 16, 8, 4 and 2 px on 32 px images instead of ending at 1 x 1.

Only processes that imported this module know the two names (``examples/train.py`` does; ``lightning-cka analyze``
does not).
"""

import math
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

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
    # Registered below: EfficientNets with a stride-1 stem (their last stage at 2 x 2 px instead of 1 x 1).
    # TinyNet-E is EfficientNet-B0 at 0.51 width and 0.6 depth: the size of vit_mini_patch4, and 3x faster than B0.
    "tinynet_e_cifar": ("efficientnet_cifar", {"base": "tinynet_e"}),
    "efficientnet_b0_cifar": ("efficientnet_cifar", {"base": "efficientnet_b0"}),
}
TIMM_OPTIONS = (
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "cache_dir",
)  # timm.create_model passes these to every model
BRANCHES = ("attn", "mlp")


def parse_no_skip(text: str) -> list[str]:
    """``--no-skip`` as sorted ``"BLOCK:BRANCH"`` strings: ``"2:mlp,4"`` -> ``["2:mlp", "4:attn", "4:mlp"]``.

    A block without a branch loses the skip connection of both its branches.

    Raises:
        ValueError: an entry that is not ``N``, ``N:attn`` or ``N:mlp``.
    """
    chosen = set()
    for entry in text.split(","):
        block, sep, branch = entry.strip().partition(":")
        if not block.isdigit() or (sep and branch not in BRANCHES):
            raise ValueError(
                f"expected BLOCK, BLOCK:attn or BLOCK:mlp, comma-separated (e.g. 3 or 2:mlp,4), got {entry!r}"
            )
        chosen |= {f"{int(block)}:{name}" for name in ((branch,) if sep else BRANCHES)}
    return sorted(chosen, key=lambda item: (int(item.split(":")[0]), item))


class NoSkipBlock(Block):
    """A timm ViT ``Block`` whose attention and / or MLP branch has no skip connection: ``x = attn(norm1(x))``.

    Made from a built ``Block`` by :meth:`convert` (same parameters, same state dict keys). It overrides ``forward``,
    so lightning_cka's skip-connection analysis does not recognize it as a residual block (and says so).
    """

    skip_attn: bool = True
    skip_mlp: bool = True

    @classmethod
    def convert(cls, block: Block, branches: Iterable[str]) -> "NoSkipBlock":
        """Turn ``block`` into a NoSkipBlock without the skip connections of ``branches`` (``attn``, ``mlp``)."""
        if type(block) is not Block:
            raise ValueError(f"NoSkipBlock converts timm vision_transformer.Block blocks, got {type(block).__name__}.")
        branches = set(branches)
        block.__class__ = cls
        block.skip_attn, block.skip_mlp = "attn" not in branches, "mlp" not in branches
        return block

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """``Block.forward``, with ``x +`` left out of the branches without a skip connection."""
        y = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + y if self.skip_attn else y
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x + y if self.skip_mlp else y

    def extra_repr(self) -> str:
        return f"skip_attn={self.skip_attn}, skip_mlp={self.skip_mlp}"


def vit_no_skip(
    pretrained: bool = False, base: str = "vit_tiny_patch16_224", no_skip: Iterable[str] = (), **kwargs: Any
) -> VisionTransformer:
    """The timm ViT ``base`` (built with ``kwargs``) without the skip connections named in ``no_skip``.

    Args:
        pretrained: must be False (the blocks change what they compute).
        base: a timm ViT name whose blocks are ``vision_transformer.Block``.
        no_skip: ``"BLOCK:BRANCH"`` strings such as ``"3:attn"`` (see :func:`parse_no_skip`).
        kwargs: ``timm.create_model`` kwargs of ``base``.
    """
    if pretrained:
        raise ValueError("vit_no_skip has no pretrained weights; train it with examples/train.py.")
    for option in TIMM_OPTIONS:
        kwargs.pop(option, None)
    model = timm.create_model(base, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"vit_no_skip needs a timm VisionTransformer; {base} is a {type(model).__name__}.")
    branches: dict[int, set[str]] = {}
    for item in no_skip:
        block, _, branch = item.partition(":")
        branches.setdefault(int(block), set()).add(branch)
    depth = len(model.blocks)
    for index, names in sorted(branches.items()):
        if index >= depth:
            raise ValueError(f"there is no block {index}: {base} has blocks 0 to {depth - 1} here.")
        NoSkipBlock.convert(model.blocks[index], names)
    return model


def efficientnet_cifar(pretrained: bool = False, base: str = "efficientnet_b0", **kwargs: Any) -> nn.Module:
    """The timm EfficientNet ``base`` with a stride-1 stem, for 32 px images (the other strides as in ``base``).

    timm's EfficientNet stem always has stride 2 and no ``create_model`` keyword changes it; at 32 px its last stages
    then run at 1 x 1. With stride 1 they run at 2 x 2, as ``resnet18_cifar``'s stride-1 stem keeps its ``layer4`` at
    4 x 4. The stem keeps timm's initialization (only its stride changes; the 3 x 3 padding of 1 stays right).
    """
    if pretrained:
        raise ValueError("efficientnet_cifar has no pretrained weights; train it with examples/train.py.")
    for option in TIMM_OPTIONS:
        kwargs.pop(option, None)
    model = timm.create_model(base, **kwargs)
    stem = getattr(model, "conv_stem", None)
    if not isinstance(stem, nn.Conv2d) or stem.kernel_size != (3, 3) or stem.padding != (1, 1):
        raise ValueError(f"efficientnet_cifar needs a timm EfficientNet with a 3 x 3 conv_stem; {base} has {stem}.")
    stem.stride = (1, 1)
    return model


for _model in (vit_no_skip, efficientnet_cifar):
    if not timm.is_model(_model.__name__):
        register_model(_model)


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
        mixup_alpha: MixUp strength (timm's ``Mixup``; 0: off, 0.8 the usual).
        cutmix_alpha: CutMix strength (0: off, 1.0 the usual). With both on, each batch takes one of the two (timm's
            ``switch_prob`` 0.5).
        label_smoothing: of the training targets (mixed or not); validation and test use the hard labels.
        lr_scale: ``{pattern: factor}``: parameters whose name (in ``self.model``) matches the glob ``pattern``
            train with ``factor`` times the learning rate (the first matching pattern counts), e.g.
            ``{"patch_embed.*": 0.1}``.
        pos_embed: ``"learn"`` (the model's own, learned position embedding) or ``"sincos"``: a ViT's position
            embedding set to the fixed 2D sine-cosine embedding of MAE (He et al. 2022) and not trained.
    """

    def __init__(
        self,
        timm_name: str,
        timm_kwargs: dict[str, Any],
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float = 0.0,
        lr_scale: dict[str, float] | None = None,
        pos_embed: str = "learn",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(timm_name, **timm_kwargs)
        names = [name for name, _ in self.model.named_parameters()]
        for pattern in lr_scale or {}:
            if not any(fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(names[:6])
                raise ValueError(f"--lr-scale {pattern}: matches no parameter of {timm_name} (its names: {shown}, ...)")
        if pos_embed == "sincos":
            set_sincos_pos_embed(self.model)
        elif pos_embed != "learn":
            raise ValueError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}.")
        self.num_classes = self.model.num_classes
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:  # timm's defaults otherwise: prob 1, switch_prob 0.5, per batch
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )

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
        """Cross-entropy loss of one batch, mixed by MixUp / CutMix and with smoothed labels if asked.

        ``train/accuracy`` counts a prediction right when it is the largest share of the (mixed) target.
        """
        if self.mixup is None:
            images, labels = batch
            logits = self(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        else:
            images, targets = self.mix(*batch)
            logits = self(images)
            loss = F.cross_entropy(logits, targets)  # soft targets
            accuracy = (logits.argmax(dim=1) == targets.argmax(dim=1)).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True, batch_size=len(images))
        return loss

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """MixUp / CutMix of a batch, and its soft targets; of an odd batch the last image stays unmixed.

        timm's ``Mixup`` pairs image ``i`` with image ``n - 1 - i`` and needs an even batch (a training set's last
        batch may be odd).
        """
        smoothing = self.hparams.label_smoothing
        targets = F.one_hot(labels, self.num_classes).to(images.dtype) * (1 - smoothing) + smoothing / self.num_classes
        even = len(images) - len(images) % 2
        if even:
            images = images.clone()  # Mixup works in place
            images[:even], targets[:even] = self.mixup(images[:even], labels[:even])
        return images, targets

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log validation loss and accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log test loss and accuracy."""
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warmup and cosine decay to 0 over all training steps, stepped every step."""
        params = self.model
        if self.hparams.lr_scale:
            params = param_groups(self.model, self.hparams.lr, self.hparams.weight_decay, self.hparams.lr_scale)
        optimizer = create_optimizer_v2(params, "adamw", lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, int(self.hparams.warmup_fraction * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """MAE's fixed 2D sine-cosine position embedding, ``(rows * cols, dim)``: half the channels encode the row.

    Each half holds ``dim / 4`` sines and ``dim / 4`` cosines of the coordinate at frequencies ``10000^(-k / (dim/4))``,
    so every position's vector has norm ``sqrt(dim / 2)`` and nearby positions have the most similar vectors.
    """
    if dim % 4:
        raise ValueError(f"a 2D sine-cosine embedding needs a width divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    parts = []
    for coordinate in (rows, cols):
        angles = coordinate.flatten().double()[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def set_sincos_pos_embed(model: nn.Module) -> None:
    """Give a timm ViT the fixed 2D sine-cosine position embedding (zero for its CLS / register tokens), frozen."""
    if not isinstance(model, VisionTransformer) or model.pos_embed is None:
        raise ValueError(
            f"--pos-embed sincos applies to timm ViTs with a position embedding, not {type(model).__name__}."
        )
    table = sincos_2d(model.patch_embed.grid_size, model.pos_embed.shape[-1])
    prefix = model.pos_embed.shape[1] - len(table)  # CLS / register slots (0 with no_embed_class)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, prefix:] = table.to(model.pos_embed.dtype)
    model.pos_embed.requires_grad_(False)


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_scale: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer parameter groups: timm's weight-decay split, each part split again by its learning-rate factor.

    As ``create_optimizer_v2`` does, biases, norms (every parameter of one dimension) and the model's
    ``no_weight_decay()`` parameters (a ViT's position embedding and CLS token) get no weight decay.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        scale = next((factor for pattern, factor in lr_scale.items() if fnmatchcase(name, pattern)), 1.0)
        group = groups.setdefault(
            (decay, scale), {"params": [], "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0}
        )
        group["params"].append(param)
    return list(groups.values())


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

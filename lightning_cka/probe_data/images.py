"""Probe images from a named source (``lightning-cka analyze --data``): digits, an image folder, an ``.npz`` or noise.

Every problem the user can fix is a ``ValueError`` whose message names the source and the fix.
"""

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from lightning_cka.probe_data.batches import minibatch_slices

NPZ_IMAGE_KEYS = ("x_test", "x", "images")


def input_config(
    model: nn.Module,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[int, int], Tensor, Tensor]:
    """Input size ``(H, W)`` and normalization ``(1, 3, 1, 1)`` mean and std for a timm model.

    The size is ``image_size``, else the size a ViT's ``patch_embed`` was built for (``img_size`` in the model's
    keyword arguments changes it, not its ``pretrained_cfg``), else the ``pretrained_cfg`` input size. Mean and std
    default to the model's ``pretrained_cfg`` (ImageNet's when it has none).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if image_size is not None:
        size = (image_size, image_size)
    elif getattr(getattr(model, "patch_embed", None), "img_size", None) is not None:
        size = tuple(model.patch_embed.img_size)
    else:
        size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    mean = torch.tensor(mean or cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std or cfg.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32).view(1, -1, 1, 1)
    return (int(size[0]), int(size[1])), mean, std


@dataclass
class ImageSource:
    """Probe images as minibatches made on demand, so only one minibatch of full-size images is ever in memory.

    Attributes:
        batches: an iterable of ``(n, 3, H, W)`` float tensors, resized and normalized.
        num_examples: images in all minibatches.
        description: where the images come from, for the report.
    """

    batches: Any
    num_examples: int
    description: str


def probe_images(
    spec: str,
    num_examples: int,
    size: tuple[int, int],
    mean: Tensor,
    std: Tensor,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
) -> ImageSource:
    """The probe images that ``--data`` names, a seeded random sample of ``num_examples`` of them.

    Args:
        spec: ``random`` (Gaussian images, already on the normalized scale), ``digits`` (scikit-learn's 8 x 8 digits
            as grey RGB), a directory of class folders (``torchvision.datasets.ImageFolder``; its ``val/`` or
            ``test/`` subfolder when there is one), or an ``.npz`` file with uint8 images ``(N, H, W, 3)`` under
            ``x_test``, ``x`` or ``images``.
        num_examples: images to use (all of them when the source has fewer).
        size: ``(H, W)`` the images are resized to (not cropped).
        mean: per-channel mean subtracted after scaling to ``[0, 1]``, ``(1, 3, 1, 1)``.
        std: per-channel std divided by, ``(1, 3, 1, 1)``.
        batch_size: minibatch size (a last minibatch of fewer than 4 joins the one before).
        seed: seed of the sample.
        num_workers: DataLoader worker processes decoding an image folder.

    Raises:
        ValueError: an unknown source, a missing optional dependency, unusable arrays, or fewer than 4 images.
    """
    generator = torch.Generator().manual_seed(seed)
    if spec == "random":
        slices = _slices(num_examples, batch_size)
        batches = (torch.randn(s.stop - s.start, 3, *size, generator=generator) for s in slices)
        return ImageSource(batches, num_examples, f"{num_examples} Gaussian random images")
    if spec == "digits":
        images, what = _digits(), "scikit-learn digits"
    elif Path(spec).is_dir():
        return _image_folder(Path(spec), num_examples, size, mean, std, batch_size, generator, num_workers)
    elif Path(spec).is_file() and spec.endswith(".npz"):
        images, what = _npz_images(Path(spec)), spec
    else:
        raise ValueError(
            f"--data {spec}: not 'random', 'digits', a directory of class folders or an existing .npz file."
        )
    indices = torch.randperm(len(images), generator=generator)[:num_examples]
    slices = _slices(len(indices), batch_size)
    batches = (_prepare(images[indices[s].numpy()], size, mean, std) for s in slices)
    return ImageSource(batches, len(indices), f"{len(indices)} of the {len(images)} images of {what}")


def _slices(num_examples: int, batch_size: int) -> list[slice]:
    try:
        return minibatch_slices(num_examples, batch_size)
    except ValueError as err:  # a source with fewer than 4 images
        raise ValueError(f"--data: {err}") from err


def _digits() -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ValueError(
            "--data digits needs scikit-learn: pip install 'lightning-cka[examples]' (or scikit-learn)."
        ) from err
    grey = load_digits().images * (255 / 16)  # pixel values 0..16
    return np.repeat(grey[..., None], 3, axis=-1).round().astype(np.uint8)


def _npz_images(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in NPZ_IMAGE_KEYS if k in data.files), None)
            if key is None:
                raise ValueError(
                    f"--data {path} has none of the keys {', '.join(NPZ_IMAGE_KEYS)} (it has {data.files})."
                )
            images = data[key]
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"--data {path} cannot be read as .npz arrays: {err}") from err
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"--data {path}: {key} must hold uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}."
        )
    return images


def _prepare(images: np.ndarray, size: tuple[int, int], mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``(n, h, w, 3)`` to resized, normalized ``(n, 3, H, W)`` float32."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return (x - mean) / std


def _image_folder(
    root: Path,
    num_examples: int,
    size: tuple[int, int],
    mean: Tensor,
    std: Tensor,
    batch_size: int,
    generator: torch.Generator,
    num_workers: int,
) -> ImageSource:
    try:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder
    except ImportError as err:
        raise ValueError(
            "--data DIRECTORY needs torchvision: pip install 'lightning-cka[examples]' (or torchvision)."
        ) from err
    split = next((root / s for s in ("val", "test") if (root / s).is_dir()), root)
    transform = transforms.Compose(
        [
            transforms.Resize(size, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean.flatten().tolist(), std.flatten().tolist()),
        ]
    )
    try:
        folder = ImageFolder(str(split), transform=transform)
    except OSError as err:
        raise ValueError(f"--data {split}: {err}") from err
    indices = torch.randperm(len(folder), generator=generator)[:num_examples].tolist()
    slices = _slices(len(indices), batch_size)
    sampler = [list(range(s.start, s.stop)) for s in slices]
    loader = DataLoader(Subset(folder, indices), batch_sampler=sampler, num_workers=num_workers)
    return ImageSource(loader, len(indices), f"{len(indices)} of the {len(folder)} images in {split}")

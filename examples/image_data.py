"""The datasets of the examples, as 32 px training, validation and test splits."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from classifier import IMAGE_SIZE
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits", "cifar10", "imagefolder")
DIGITS_HELD_OUT = 300  # digits images in each of the validation and test splits
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def digits_splits() -> tuple[Dataset, Dataset, Dataset, int]:
    """scikit-learn's 1797 8x8 digits, upscaled to 32x32 RGB, split 1197 / 300 / 300 the same way for every seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError('--dataset digits needs scikit-learn: pip install -e ".[examples]"') from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    labels = torch.tensor(digits.target)
    test, val, train = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).split(
        [DIGITS_HELD_OUT, DIGITS_HELD_OUT, len(labels) - 2 * DIGITS_HELD_OUT]
    )
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    train_set, val_set, test_set = (TensorDataset(images[split], labels[split]) for split in (train, val, test))
    return train_set, val_set, test_set, 10


def torchvision_transforms(mean: Sequence[float], std: Sequence[float]) -> tuple[Any, Any]:
    """Training (pad-and-crop, flip) and evaluation transforms to normalized 32 px tensors."""
    try:
        from torchvision import transforms as T
    except ImportError as err:
        raise ImportError('--dataset cifar10 / imagefolder need torchvision: pip install -e ".[examples]"') from err
    resize = [T.Resize(IMAGE_SIZE), T.CenterCrop(IMAGE_SIZE)]
    tensor = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([*resize, T.RandomCrop(IMAGE_SIZE, padding=4), T.RandomHorizontalFlip(), *tensor])
    return train, T.Compose(resize + tensor)


def cifar10_splits(data_dir: Path) -> tuple[Dataset, Dataset, Dataset, int]:
    """CIFAR-10 from torchvision (downloaded into ``data_dir`` when missing); its test set also validates."""
    from torchvision.datasets import CIFAR10

    train_tf, eval_tf = torchvision_transforms(CIFAR_MEAN, CIFAR_STD)
    try:
        train = CIFAR10(str(data_dir), train=True, download=True, transform=train_tf)
        test = CIFAR10(str(data_dir), train=False, download=True, transform=eval_tf)
    except OSError as err:  # offline: the download fails with a URLError
        raise RuntimeError(
            f"CIFAR-10 is not in {data_dir} and could not be downloaded ({err}). Put torchvision's "
            "cifar-10-batches-py folder there, or use a copy in train/<class>/ and test/<class>/ folders with "
            "--dataset imagefolder."
        ) from err
    return train, test, test, 10


def imagefolder_splits(data_dir: Path) -> tuple[Dataset, Dataset, Dataset, int]:
    """``data_dir/train/<class>/*`` for training; ``val/`` validates and ``test/`` tests (either serves for both)."""
    from torchvision.datasets import ImageFolder

    held_out = [data_dir / split for split in ("val", "test") if (data_dir / split).is_dir()]
    if not (data_dir / "train").is_dir() or not held_out:
        raise ValueError(
            f"--data-dir {data_dir} needs train/<class>/ and val/<class>/ or test/<class>/ image folders; give the "
            "folder that holds train/."
        )
    train_tf, eval_tf = torchvision_transforms(IMAGENET_MEAN, IMAGENET_STD)
    train = ImageFolder(str(data_dir / "train"), train_tf)
    val, test = ImageFolder(str(held_out[0]), eval_tf), ImageFolder(str(held_out[-1]), eval_tf)
    for split in (val, test):
        if split.classes != train.classes:
            raise ValueError(f"{split.root} has classes {split.classes}, train/ has {train.classes}; they must match.")
    return train, val, test, len(train.classes)


def subsample(dataset: Dataset, size: int | None, fraction: float | None, seed: int) -> Dataset:
    """``size`` examples, or ``fraction`` of them, drawn without replacement with a generator seeded by ``seed``."""
    if size is None and fraction is None:
        return dataset
    total = len(dataset)
    keep = size if size is not None else max(1, round(fraction * total))
    if keep > total:
        raise ValueError(f"--train-size {size} exceeds the {total} training images; give at most {total}.")
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:keep]
    return Subset(dataset, chosen.sort().values.tolist())

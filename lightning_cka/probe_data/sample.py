"""The monitor's fixed probe: a seeded sample of examples, drawn once and identical at every probe."""

import hashlib
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lightning_cka.taps.probe_mode import preserved_rng

ProbeSource = Tensor | Dataset | DataLoader


@dataclass
class Probe:
    """The probe images with their labels and where they came from.

    Attributes:
        images: ``(N, ...)`` input images.
        labels: ``(N,)`` class labels, or ``None``.
        indices: dataset indices of the images, or ``None`` when the probe was not drawn from a map-style dataset.
    """

    images: Tensor
    labels: Tensor | None
    indices: list[int] | None

    @property
    def hash(self) -> str:
        """SHA-1 of the images' float32 values and shape: equal for the same images in the same order."""
        return probe_hash(self.images)


class ProbeHasher:
    """SHA-1 of probe images fed minibatch by minibatch: the same digest as :func:`probe_hash` of them all at once."""

    def __init__(self) -> None:
        self._digest = hashlib.sha1()
        self.count = 0
        self._shape: tuple[int, ...] = ()

    def update(self, images: Tensor) -> None:
        """Add the next images (in probe order)."""
        self._digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.count += images.shape[0]
        self._shape = tuple(images.shape[1:])

    def hexdigest(self) -> str:
        """The digest of every image so far, their number and shape included."""
        digest = self._digest.copy()
        digest.update(str((self.count, *self._shape)).encode())
        return digest.hexdigest()


def probe_hash(images: Tensor) -> str:
    """SHA-1 hex digest of a probe's float32 values and shape (tells whether two runs probed the same images)."""
    hasher = ProbeHasher()
    hasher.update(images)
    return hasher.hexdigest()


def first_dataloader(loaders: Any) -> DataLoader | None:
    """The first ``DataLoader`` in what ``trainer.val_dataloaders`` / ``trainer.train_dataloader`` return."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and not isinstance(loaders, str):
        for item in loaders:
            found = first_dataloader(item)
            if found is not None:
                return found
    return None


def sample_probe(
    source: ProbeSource,
    probe_size: int,
    seed: int,
    extract: Callable[[Any], Tensor],
    extract_labels: Callable[[Any], Tensor | None],
    indices: list[int] | None = None,
) -> Probe:
    """Draw the probe.

    A tensor is used whole. From a map-style dataset (given directly or behind a DataLoader), ``probe_size`` indices
    are drawn with a private generator seeded by ``seed`` (or ``indices`` are reused, e.g. after a resume) and
    collated with the loader's ``collate_fn``; an iterable dataset gives its first ``probe_size`` examples. The
    global RNG states are restored afterwards, so random transforms of the dataset or a DataLoader's seed draw cannot
    shift the training run's random stream.
    """
    if isinstance(source, Tensor):
        return Probe(source, None, None)
    collate = source.collate_fn if isinstance(source, DataLoader) else default_collate
    dataset = source.dataset if isinstance(source, DataLoader) else source
    with preserved_rng():
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            loader = source if isinstance(source, DataLoader) else DataLoader(dataset, batch_size=probe_size)
            images, labels, count = [], [], 0
            for batch in loader:
                images.append(extract(batch))
                labels.append(extract_labels(batch))
                count += images[-1].shape[0]
                if count >= probe_size:
                    break
            joined = None if any(label is None for label in labels) else torch.cat(labels)[:probe_size]
            return Probe(torch.cat(images)[:probe_size], joined, None)
        if indices is None or max(indices, default=-1) >= len(dataset):
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(len(dataset), generator=generator)[:probe_size].tolist()
        batch = collate([dataset[i] for i in indices])
        return Probe(extract(batch), extract_labels(batch), indices)


def save_probe(path: str | Path, probe: Probe) -> Path:
    """Write the probe images (float32), labels, dataset indices and hash as ``.npz``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": probe.images.detach().to("cpu", torch.float32).numpy(), "hash": np.asarray(probe.hash)}
    if probe.labels is not None:
        arrays["labels"] = probe.labels.detach().cpu().numpy()
    if probe.indices is not None:
        arrays["indices"] = np.asarray(probe.indices, dtype=np.int64)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as fh:
            np.savez(fh, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_probe(path: str | Path) -> Probe:
    """Read a probe written by :func:`save_probe`.

    Raises:
        ValueError: the file is not a probe file, or cannot be read.
    """
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            if "images" not in data.files:
                raise ValueError(f"{path} holds no probe images (no 'images' array).")
            images = torch.from_numpy(data["images"])
            labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
            indices = data["indices"].tolist() if "indices" in data.files else None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} cannot be read as probe images ({err}).") from err
    return Probe(images, labels, indices)

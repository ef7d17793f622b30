"""The fixed probe: a seeded sample of examples, drawn once and identical at every probe."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lightning_cka.taps.probe_mode import preserved_rng

ProbeSource = Tensor | Dataset | DataLoader


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
    indices: list[int] | None = None,
) -> tuple[Tensor, list[int] | None]:
    """Draw the probe images.

    A tensor is used whole. From a map-style dataset (given directly or behind a DataLoader), ``probe_size`` indices
    are drawn with a private generator seeded by ``seed`` (or ``indices`` are reused, e.g. after a resume) and
    collated with the loader's ``collate_fn``; an iterable dataset gives its first ``probe_size`` examples. The
    global RNG states are restored afterwards, so random transforms of the dataset or a DataLoader's seed draw cannot
    shift the training run's random stream.

    Returns:
        ``(images, indices)``; ``indices`` is ``None`` when the probe does not come from indexing a dataset.
    """
    if isinstance(source, Tensor):
        return source, None
    collate = source.collate_fn if isinstance(source, DataLoader) else default_collate
    dataset = source.dataset if isinstance(source, DataLoader) else source
    with preserved_rng():
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            loader = source if isinstance(source, DataLoader) else DataLoader(dataset, batch_size=probe_size)
            parts, count = [], 0
            for batch in loader:
                parts.append(extract(batch))
                count += parts[-1].shape[0]
                if count >= probe_size:
                    break
            return torch.cat(parts)[:probe_size], None
        if indices is None or max(indices, default=-1) >= len(dataset):
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(len(dataset), generator=generator)[:probe_size].tolist()
        return extract(collate([dataset[i] for i in indices])), indices

"""Turning what users pass as probe data into minibatches of input tensors."""

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

# Keys tried, in order, when a batch is a dict and no ``input_key`` is given.
INPUT_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
MIN_BATCH = 4  # the unbiased HSIC estimator needs n >= 4


def extract_inputs(batch: Any, input_key: str | None = None) -> Tensor:
    """The input images of one batch.

    A tensor is taken as is; a tuple or list gives its first element (``(images, labels)``); a dict gives
    ``batch[input_key]``, or without ``input_key`` the first of ``INPUT_KEYS`` it has.

    Raises:
        KeyError / TypeError: naming what the batch holds, and ``input_key`` (or overriding
            ``CKAMonitor.extract_inputs``) as the fix.
    """
    if isinstance(batch, Mapping):
        if input_key is not None:
            if input_key not in batch:
                raise KeyError(f"input_key={input_key!r} is not in the batch; its keys are {sorted(map(str, batch))}.")
            return _tensor(batch[input_key], f"batch[{input_key!r}]")
        for key in INPUT_KEYS:
            if key in batch:
                return _tensor(batch[key], f"batch[{key!r}]")
        raise KeyError(
            f"cannot tell which entry of a dict batch holds the images (keys: {sorted(map(str, batch))}); "
            "pass input_key=..."
        )
    if isinstance(batch, tuple | list) and batch:
        return _tensor(batch[0], "batch[0]")
    return _tensor(batch, "the batch")


def _tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{what} is a {type(value).__name__}, not a tensor of images; pass input_key=... for dict batches or "
            "override CKAMonitor.extract_inputs for custom batches."
        )
    return value


def minibatch_slices(num_examples: int, batch_size: int) -> list[slice]:
    """Consecutive minibatches of ``batch_size``; a last one smaller than 4 is merged into the one before."""
    if num_examples < MIN_BATCH:
        raise ValueError(f"the probe needs at least {MIN_BATCH} examples, got {num_examples}.")
    starts = list(range(0, num_examples, batch_size))
    if len(starts) > 1 and num_examples - starts[-1] < MIN_BATCH:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], num_examples], strict=True)]


def iterate_inputs(data: Any, batch_size: int, input_key: str | None = None) -> Iterator[Tensor]:
    """Minibatches of input tensors from a tensor, a map-style ``Dataset``, or any iterable of batches (DataLoader).

    Tensors and datasets are cut with :func:`minibatch_slices`; an iterable's own batches are used as they come, and
    a batch with fewer than 4 examples is skipped with a warning.
    """
    if isinstance(data, Tensor):
        for part in minibatch_slices(data.shape[0], batch_size):
            yield data[part]
        return
    if isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size)
    elif isinstance(data, Dataset) and not isinstance(data, Iterable):
        slices = minibatch_slices(len(data), batch_size)  # type: ignore[arg-type]
        data = DataLoader(data, batch_sampler=[list(range(s.start, s.stop)) for s in slices])
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor of images, a Dataset or a DataLoader, got {type(data).__name__}.")
    for batch in data:
        inputs = extract_inputs(batch, input_key)
        if inputs.shape[0] < MIN_BATCH:
            warnings.warn(
                f"skipped a minibatch of {inputs.shape[0]} examples: the unbiased CKA estimator needs at least "
                f"{MIN_BATCH}. Use drop_last=True or another batch size.",
                UserWarning,
                stacklevel=2,
            )
            continue
        yield inputs


def fingerprint(images: Tensor) -> list[float]:
    """Number, sum and sum of squares of a probe's values: tells whether two probes hold the same images."""
    flat = images.detach().reshape(images.shape[0], -1).to(torch.float64)
    return [float(images.shape[0]), float(flat.sum()), float(flat.square().sum())]

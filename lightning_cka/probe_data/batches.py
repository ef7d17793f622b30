"""Turning what users pass as probe data into minibatches of input images (and labels)."""

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

# Keys tried, in order, when a batch is a dict and no ``input_key`` / ``label_key`` is given.
INPUT_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")
MIN_BATCH = 4  # the unbiased HSIC estimator needs n >= 4


def extract_inputs(batch: Any, input_key: str | None = None) -> Tensor:
    """The input images of one batch.

    A tensor is taken as is; a tuple or list gives its first element (``(images, labels)``); a dict gives
    ``batch[input_key]``, or without ``input_key`` the first of ``INPUT_KEYS`` it has, which must then hold images
    (a floating tensor with a batch and at least one more dim).

    Raises:
        KeyError / TypeError: naming what the batch holds, and ``input_key`` (or overriding
            ``CKAMonitor.extract_inputs``) as the fix.
    """
    if isinstance(batch, Mapping):
        keys = sorted(map(str, batch))
        if input_key is not None:
            if input_key not in batch:
                raise KeyError(f"input_key={input_key!r} is not in the batch; its keys are {keys}.")
            return _tensor(batch[input_key], f"batch[{input_key!r}]")
        for key in INPUT_KEYS:
            if key in batch:
                value = batch[key]
                if not (isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 2):
                    what = (
                        f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                        if isinstance(value, Tensor)
                        else (f"a {type(value).__name__}")
                    )
                    raise TypeError(
                        f"the dict batch's {key!r} entry was taken for the images, but it holds {what}, not a floating "
                        f"tensor of images (keys: {keys}); pass input_key=..."
                    )
                return value
        raise KeyError(f"cannot tell which entry of a dict batch holds the images (keys: {keys}); pass input_key=...")
    if isinstance(batch, tuple | list) and batch:
        return _tensor(batch[0], "batch[0]")
    return _tensor(batch, "the batch")


def extract_labels(batch: Any, label_key: str | None = None) -> Tensor | None:
    """The class labels of one batch, or ``None`` when it has none.

    A tuple or list gives its second element (``(images, labels)``); a dict gives ``batch[label_key]``, or without it
    the first of ``LABEL_KEYS`` it has; a plain tensor batch has no labels.
    """
    if isinstance(batch, Mapping):
        key = label_key if label_key is not None else next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            return None
        if key not in batch:
            raise KeyError(f"label_key={key!r} is not in the batch; its keys are {sorted(map(str, batch))}.")
        return _labels(batch[key], f"batch[{key!r}]")
    if isinstance(batch, tuple | list) and len(batch) > 1:
        return _labels(batch[1], "batch[1]")
    return None


def _tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{what} is a {type(value).__name__}, not a tensor of images; pass input_key=... for dict batches or "
            "override CKAMonitor.extract_inputs for custom batches."
        )
    return value


def _labels(value: Any, what: str) -> Tensor | None:
    if isinstance(value, Tensor) and value.dim() == 1 and not value.is_floating_point():
        return value
    return None  # not class labels (masks, boxes, ...): the probe simply has none


def minibatch_slices(num_examples: int, batch_size: int) -> list[slice]:
    """Consecutive minibatches of ``batch_size``; a last one smaller than 4 is merged into the one before."""
    if num_examples < MIN_BATCH:
        raise ValueError(f"the probe needs at least {MIN_BATCH} examples, got {num_examples}.")
    starts = list(range(0, num_examples, batch_size))
    if len(starts) > 1 and num_examples - starts[-1] < MIN_BATCH:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], num_examples], strict=True)]


def iterate_batches(
    data: Any, batch_size: int, input_key: str | None = None, label_key: str | None = None
) -> tuple[Iterator[tuple[Tensor, Tensor | None]], int | None]:
    """Minibatches of ``(images, labels or None)`` from a tensor, a map-style ``Dataset`` or any iterable of batches.

    Tensors and datasets are cut with :func:`minibatch_slices`; an iterable's own batches are used as they come, and
    a batch with fewer than 4 examples is skipped with a warning.

    Returns:
        The minibatches, and how many there will be at most (``None`` when the iterable has no length).
    """
    if isinstance(data, Tensor):
        slices = minibatch_slices(data.shape[0], batch_size)
        return ((data[s], None) for s in slices), len(slices)
    if isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size)
    elif isinstance(data, Dataset) and not isinstance(data, Iterable):
        slices = minibatch_slices(len(data), batch_size)  # type: ignore[arg-type]
        data = DataLoader(data, batch_sampler=[list(range(s.start, s.stop)) for s in slices])
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor of images, a Dataset or a DataLoader, got {type(data).__name__}.")
    try:
        count = len(data)  # type: ignore[arg-type]
    except TypeError:
        count = None
    return _batches(data, input_key, label_key), count


def _batches(data: Iterable, input_key: str | None, label_key: str | None) -> Iterator[tuple[Tensor, Tensor | None]]:
    for batch in data:
        inputs = extract_inputs(batch, input_key)
        if inputs.shape[0] < MIN_BATCH:
            warnings.warn(
                f"skipped a minibatch of {inputs.shape[0]} examples: the unbiased CKA estimator needs at least "
                f"{MIN_BATCH}. Use drop_last=True or another batch size.",
                UserWarning,
                stacklevel=3,
            )
            continue
        yield inputs, extract_labels(batch, label_key)

"""Where the monitor's probe comes from: probe data, validation, training examples by index, never a stream.

The user's probe data comes first, else the validation set, else the training set's examples read by index.

The training DataLoader is what the fit consumes: reading from an iterable training dataset would take examples away
from training (a queue, a socket, a generator hands each example out once), so the sampler never iterates it. A
map-style training dataset is read by index, which consumes nothing. A validation set that Lightning has not loaded
yet (``check_val_every_n_epoch > 1`` without a sanity check) is loaded the way Lightning loads it, so that the probe
comes from validation whenever there is one.
"""

from collections.abc import Callable
from typing import Any

from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_cka.engine import options as check
from lightning_cka.probe_data.batches import MIN_BATCH
from lightning_cka.probe_data.sample import Probe, ProbeSource, first_dataloader, sample_probe
from lightning_cka.taps.probe_mode import preserved_rng


class NoProbeSource(Exception):
    """There is nothing to draw a probe from without taking examples away from training."""


class ProbeSampler:
    """The monitor's probe: what it is drawn from, how many examples, with which seed.

    Args:
        data: the probe images: a tensor ``(N, C, H, W)`` (used whole), a ``Dataset`` or a ``DataLoader``; ``None``:
            drawn from the validation set (see the module).
        labels: ``(N,)`` integer class labels of a tensor ``data``.
        size: number of examples drawn from a dataset (fewer if it is smaller).
        seed: seed of the draw.

    Raises:
        ValueError: naming the argument (``probe_data``, ``probe_labels``, ``probe_size``, ``seed``) and what it takes.
    """

    def __init__(self, data: ProbeSource | None, labels: Tensor | None, size: int, seed: int) -> None:
        owner = "CKAMonitor"
        self.size = check.integer(owner, "probe_size", size, MIN_BATCH, hint="the unbiased CKA estimator needs 4")
        self.seed = check.integer(owner, "seed", seed)
        if data is not None and not isinstance(data, ProbeSource):
            raise ValueError(
                f"{owner}: probe_data must be a tensor of images, a Dataset or a DataLoader, got {type(data).__name__}."
            )
        if isinstance(data, Tensor) and (data.dim() < 2 or data.shape[0] < MIN_BATCH or not data.is_floating_point()):
            raise ValueError(
                f"{owner}: a probe_data tensor needs floating images of shape (N, ...) with N >= 4, got "
                f"{data.dtype} {tuple(data.shape)}."
            )
        if labels is not None:
            if not isinstance(data, Tensor):
                raise ValueError(
                    f"{owner}: probe_labels go with a tensor probe_data; a Dataset or DataLoader brings its own labels."
                )
            if (
                not isinstance(labels, Tensor)
                or labels.dim() != 1
                or labels.shape[0] != data.shape[0]
                or labels.is_floating_point()
                or labels.is_complex()
            ):
                what = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(
                    f"{owner}: probe_labels must be a 1-D integer tensor of {data.shape[0]} class labels, one per "
                    f"probe image, got {what}."
                )
        self.data, self.labels = data, labels

    def draw(
        self,
        trainer: Any,
        extract_inputs: Callable[[Any], Tensor],
        extract_labels: Callable[[Any], Tensor | None],
        indices: list[int] | None = None,
    ) -> tuple[Probe, str]:
        """Draw the probe for ``trainer``'s fit (``indices`` reuses a draw, after a resume).

        Returns:
            The probe, and where it came from in words (``"the validation DataLoader's dataset (256 of its 10000
            examples)"``), for the logs and the probe files.

        Raises:
            NoProbeSource: no probe data, no validation set, and a training set that is a stream.
            ValueError: the drawn probe has fewer than 4 examples.
        """
        source, where = self._source(trainer)
        probe = sample_probe(source, self.size, self.seed, extract_inputs, extract_labels, indices)
        if self.labels is not None:
            probe.labels = self.labels
        count = probe.images.shape[0]
        if count < MIN_BATCH:
            raise ValueError(f"CKAMonitor: the probe drawn from {where} has {count} examples; it needs at least 4.")
        total = _length(source)
        if probe.indices is not None and total is not None:
            where = f"{where} ({count} of its {total} examples)"
        elif not isinstance(source, Tensor):
            where = f"{where} (its first {count} examples)"
        return probe, where

    def _source(self, trainer: Any) -> tuple[ProbeSource, str]:
        if self.data is not None:
            kind = (
                f"a tensor of {self.data.shape[0]} images"
                if isinstance(self.data, Tensor)
                else "a " + type(self.data).__name__
            )
            return self.data, f"probe_data ({kind})"
        validation = _validation_loader(trainer)
        if validation is not None:
            return validation, f"the validation {_kind(validation)}"
        training = first_dataloader(trainer.train_dataloader)
        if training is not None and not isinstance(training.dataset, IterableDataset):
            return training.dataset, f"the training {_kind(training)}"
        raise NoProbeSource(
            "CKAMonitor: there is no validation DataLoader, and the training data is a stream (an IterableDataset), "
            "which the monitor never reads: that would take examples away from training. Pass probe_data=... (a "
            "tensor of images, a Dataset or a DataLoader); until then no probe runs and training goes on."
        )


def _validation_loader(trainer: Any) -> DataLoader | None:
    """The first validation DataLoader, loaded the way Lightning loads it when it has not yet (no sanity check)."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
        if loop is not None and hasattr(loop, "setup_data"):
            try:
                with preserved_rng():  # a val_dataloader() hook that draws random numbers must not shift training
                    loop.setup_data()
            except MisconfigurationException:  # a validation_step without any val_dataloader: no validation
                return None
            loaders = trainer.val_dataloaders
    return first_dataloader(loaders)


def _kind(loader: DataLoader) -> str:
    return "stream (an IterableDataset)" if isinstance(loader.dataset, IterableDataset) else "DataLoader's dataset"


def _length(source: ProbeSource) -> int | None:
    dataset = source.dataset if isinstance(source, DataLoader) else source
    if isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset):
        try:
            return len(dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None

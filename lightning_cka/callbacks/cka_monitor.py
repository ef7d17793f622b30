"""CKAMonitor: live CKA heatmaps and the paper's other analyses of a model while it trains, in TensorBoard."""

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_cka.analyses import build_analyses
from lightning_cka.callbacks.writer import ProbeWriter, image_sinks
from lightning_cka.engine.analysis import View
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.engine.options import ProbeOptions
from lightning_cka.probe_data.batches import MIN_BATCH, extract_inputs, extract_labels, minibatch_slices
from lightning_cka.probe_data.sample import Probe, ProbeSource, first_dataloader, sample_probe, save_probe
from lightning_cka.reference import describe_reference, load_reference
from lightning_cka.result import CKAResult
from lightning_cka.taps.grams import REDUCTIONS, Reduction
from lightning_cka.taps.layers import LayerSpec

try:  # the same callback must pass isinstance checks of `lightning.pytorch` when users import Lightning that way
    import lightning.pytorch as _lightning_pytorch

    _CALLBACK_BASES: tuple[type, ...] = (pytorch_lightning.Callback, _lightning_pytorch.Callback)
except ImportError:
    _CALLBACK_BASES = (pytorch_lightning.Callback,)

_NAME = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]+$")
PROBE_FILE_LIMIT = 64 * 2**20  # probe images up to this size are saved with the run, for `lightning-cka analyze`


class CKAMonitor(*_CALLBACK_BASES):  # type: ignore[misc]
    r"""Probe a fixed batch of examples during training and log CKA heatmaps and the paper's other analyses.

    At the start of training (step 0, the untrained model), every ``every_n_train_steps`` optimizer steps or
    ``every_n_epochs`` epochs, and at the end of training, the callback runs the probe images through the model in eval
    mode without autograd (and through the frozen ``reference``, once: its measurements are cached and it then leaves
    the training device), and computes with one forward pass per model: the minibatch CKA (Nguyen et al. 2021) of every
    layer pair, of every layer with the reference's layers and with itself at the previous probe, each with a
    block-jackknife standard error and a permutation-null threshold; and the analyses switched on below (Raghu et al.
    2021). Training is left bit-identical: no RNG draw, BatchNorm update, ``training`` flag, gradient or optimizer
    state is touched. A probe that fails after the first one warns and training goes on. Images, dashboard data and
    ``.npz`` files are written by a background thread on global rank 0.

    Logged tags (``name/`` is prefixed when ``name`` is given), one page each in ``docs/tags/``:

    - images (and the TensorBoard **CKA** dashboard): ``cka/intra``, ``cka/reference``, ``cka/reference_intra``,
      ``cka/intra_change``, ``attention/mean_distance``, and those of the analyses switched on;
    - scalars: ``cka/probe_seconds``, ``cka/offdiag_mean`` (``_se``), ``cka/adjacent_mean`` (``_se``),
      ``cka_vs_previous/<layer>``, ``cka_reference/best_value/<layer>``, ``cka_reference/best_layer/<layer>``,
      ``attention/{mean_distance,min_distance,local_fraction,entropy}/<layer>``, and the other analyses';
    - arrays: ``<log_dir>/cka/step_<global_step:07d>.npz`` (``<log_dir>/cka/<name>/...`` with a name), and the probe
      images once, ``<log_dir>/cka/probe.npz``, when they take at most 64 MiB.

    Args:
        every_n_train_steps: probe every this many optimizer steps. Exclusive with ``every_n_epochs``.
        every_n_epochs: probe at the end of every this many training epochs. Default when neither is given: 1.
        probe: the probe images: a tensor ``(N, C, H, W)`` (used whole), a ``Dataset`` or a ``DataLoader``. Default:
            ``probe_size`` examples drawn once, with a generator seeded by ``seed``, from the validation dataloader's
            dataset (the training dataloader's when there is no validation).
        probe_labels: ``(N,)`` class labels of a tensor ``probe`` (for ``linear_probe``).
        probe_size: number of probe examples drawn from a dataset (fewer if it is smaller).
        batch_size: minibatch size of the unbiased CKA estimator, at least 4; the jackknife's blocks are these
            minibatches (``docs/reading.md`` explains the default).
        layers: ``"auto"`` (residual blocks) or names / glob patterns, see :func:`lightning_cka.find_layers`.
            Looked up in the LightningModule; leading attribute segments may be left out (``"blocks.*"``).
        reduction: ``"flatten"``, ``"cls"`` or ``"mean"``: what a layer's output becomes before its Gram.
        reference: a model to compare with: an ``nn.Module``, a timm model name, or a Lightning checkpoint whose
            hyperparameters name its timm architecture. It is frozen, kept in eval mode and never trained.
        reference_weights: weights for a named reference: a state dict file or a (Lightning) checkpoint of another run.
        reference_pretrained: let timm download pretrained weights for a named reference (needs internet).
        reference_kwargs: keyword arguments for ``timm.create_model`` of a named reference (``num_classes``, ...).
        reference_layers: layers of the reference, as ``layers``.
        reference_reduction: reduction for the reference (default: ``reduction``; a CNN next to ``"cls"``: ``"mean"``).
        attention: mean attention distance and entropy per head: ``"auto"`` when the model has timm attention
            modules, ``True`` to require them, ``False`` to skip.
        heads: CKA of every attention head with every reference layer (``"auto"``: with a reference and attention).
        residual: skip-connection norm ratios of every residual block (``"auto"``: where blocks are recognized).
        localization: CKA of token positions with input-patch positions (Raghu et al. 2021, Figures 9-10).
        localization_layer: the layer localized (default: the last monitored one).
        linear_probe: closed-form ridge probes of the class at every layer (needs labels).
        rank: effective rank (RankMe) of every layer.
        permutations: permutations of the CKA null per minibatch (19: the 5% permutation test; 0: no null).
        minibatch_weights: ``"equal"`` (default) or ``"size"``: how minibatches of unequal size count in the sums.
        local_threshold: a head counts as local when its mean distance is below this fraction of the distance of
            uniform attention over the patch grid (16.5 px for 8 x 8 patches of 4 px, 116.5 px for ViT-B/16 at 224).
        log_images: log the figures to loggers that take images (TensorBoard, W&B), and the dashboard's data to
            TensorBoard.
        save_arrays: write each probe's arrays as ``.npz`` under the log directory.
        input_key: key of the images in dict batches.
        label_key: key of the labels in dict batches.
        seed: seed of the probe sample and of the null's permutations.
        name: distinguishes several monitors on one Trainer: prefixes tags and names the array folder and state key.

    Example::

        from pytorch_lightning import Trainer
        from pytorch_lightning.loggers import TensorBoardLogger
        from lightning_cka import CKAMonitor

        monitor = CKAMonitor(every_n_train_steps=500, reference="resnet18", reference_weights="resnet.ckpt")
        trainer = Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs"))
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe: Tensor | Dataset | DataLoader | None = None,
        probe_labels: Tensor | None = None,
        probe_size: int = 1024,
        batch_size: int = 128,
        layers: LayerSpec = "auto",
        reduction: Reduction = "flatten",
        reference: nn.Module | str | None = None,
        reference_weights: str | None = None,
        reference_pretrained: bool = False,
        reference_kwargs: dict[str, Any] | None = None,
        reference_layers: LayerSpec = "auto",
        reference_reduction: Reduction | None = None,
        attention: bool | Literal["auto"] = "auto",
        heads: bool | Literal["auto"] = "auto",
        residual: bool | Literal["auto"] = "auto",
        localization: bool = False,
        localization_layer: str | None = None,
        linear_probe: bool = False,
        rank: bool = True,
        permutations: int = 19,
        minibatch_weights: Literal["equal", "size"] = "equal",
        local_threshold: float = 0.5,
        log_images: bool = True,
        save_arrays: bool = True,
        input_key: str | None = None,
        label_key: str | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.probe = probe
        self.probe_labels = probe_labels
        self.probe_size = probe_size
        self.batch_size = batch_size
        self.layers = layers
        self.reduction = reduction
        self.reference = reference
        self.reference_weights = reference_weights
        self.reference_pretrained = reference_pretrained
        self.reference_kwargs = reference_kwargs
        self.reference_layers = reference_layers
        self.reference_reduction = reference_reduction or reduction
        self.local_threshold = local_threshold
        self.log_images = log_images
        self.save_arrays = save_arrays
        self.input_key = input_key
        self.label_key = label_key
        self.seed = seed
        self.name = name
        self.options = self._validate_init_configuration(
            attention=attention,
            heads=heads,
            residual=residual,
            localization=localization,
            localization_layer=localization_layer,
            linear_probe=linear_probe,
            rank=rank,
            permutations=permutations,
            minibatch_weights=minibatch_weights,
        )

        # Saved in checkpoints: the cadence, the identity of the probe and the settings.
        self._last_probe_step: int | None = None
        self._probe_indices: list[int] | None = None
        self._probe_hash: str | None = None
        self._restored = False
        # Rebuilt in every fit.
        self._engine: ProbeEngine | None = None
        self._batches: list[ProbeBatch] = []
        self._num_minibatches = 0
        self._num_examples = 0
        self._fit_probes = 0
        self._epoch = 0
        self._previous: CKAResult | None = None
        self._array_dir: Path | None = None
        self._view = View(local_threshold=local_threshold)
        self._writer: ProbeWriter | None = None

    def _validate_init_configuration(self, **analysis_options: Any) -> ProbeOptions:
        """Reject bad arguments at construction, naming the argument and the fix; returns the analysis options."""
        steps, epochs = self.every_n_train_steps, self.every_n_epochs
        if steps is not None and epochs is not None:
            raise MisconfigurationException(
                "CKAMonitor: every_n_train_steps and every_n_epochs are mutually exclusive; set one of them."
            )
        for arg, value in (("every_n_train_steps", steps), ("every_n_epochs", epochs)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise MisconfigurationException(f"CKAMonitor: {arg} must be a positive int, got {value!r}.")
        for arg, value in (("probe_size", self.probe_size), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or value < MIN_BATCH:
                raise MisconfigurationException(
                    f"CKAMonitor: {arg} must be an int >= {MIN_BATCH} (the unbiased CKA estimator needs 4 examples per"
                    f" minibatch), got {value!r}."
                )
        probe = self.probe
        if probe is not None and not isinstance(probe, ProbeSource):
            raise MisconfigurationException(
                f"CKAMonitor: probe must be a tensor of images, a Dataset or a DataLoader, got {type(probe).__name__}."
            )
        if isinstance(probe, Tensor) and (probe.dim() < 2 or probe.shape[0] < MIN_BATCH):
            raise MisconfigurationException(
                f"CKAMonitor: a probe tensor needs shape (N, ...) with N >= 4, got {tuple(probe.shape)}."
            )
        if self.probe_labels is not None:
            if not isinstance(probe, Tensor):
                raise MisconfigurationException(
                    "CKAMonitor: probe_labels go with a tensor probe; a Dataset or DataLoader brings its own labels."
                )
            labels = self.probe_labels
            if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != probe.shape[0]:
                raise MisconfigurationException(
                    f"CKAMonitor: probe_labels must be a 1-D tensor of {probe.shape[0]} class labels, one per probe "
                    f"image, got {getattr(labels, 'shape', type(labels).__name__)}."
                )
        for arg, value in (("reduction", self.reduction), ("reference_reduction", self.reference_reduction)):
            if value not in REDUCTIONS:
                raise MisconfigurationException(f"CKAMonitor: {arg} must be one of {REDUCTIONS}, got {value!r}.")
        if not isinstance(self.local_threshold, int | float) or not 0 < self.local_threshold <= 1:
            raise MisconfigurationException(
                f"CKAMonitor: local_threshold is a fraction of the uniform-attention distance in (0, 1], "
                f"got {self.local_threshold!r}."
            )
        if self.reference is not None and not isinstance(self.reference, nn.Module | str):
            raise MisconfigurationException(
                f"CKAMonitor: reference must be an nn.Module or a timm model name, got {type(self.reference).__name__}."
            )
        if self.reference is None and (self.reference_weights or self.reference_pretrained or self.reference_kwargs):
            raise MisconfigurationException(
                "CKAMonitor: reference_weights / reference_pretrained / reference_kwargs were given without reference."
            )
        if self.name is not None and (not isinstance(self.name, str) or not _NAME.match(self.name)):
            raise MisconfigurationException(
                "CKAMonitor: name must be letters, digits, '_', '-' or '.' (not only dots), without '/': it names a "
                f"folder and a tag prefix; got {self.name!r}."
            )
        if analysis_options["heads"] is True and self.reference is None:
            raise MisconfigurationException(
                "CKAMonitor: heads=True compares attention heads with a reference: pass one."
            )
        try:
            return ProbeOptions(**analysis_options, seed=self.seed)
        except ValueError as err:
            raise MisconfigurationException(f"CKAMonitor: {err}") from err

    @property
    def state_key(self) -> str:
        """Checkpoint key; monitors with another cadence or ``name`` keep separate states."""
        return self._generate_state_key(
            every_n_train_steps=self.every_n_train_steps, every_n_epochs=self.every_n_epochs, name=self.name
        )

    # ----------------------------------------------------------------------------------------------- overridable hooks

    def extract_inputs(self, batch: Any) -> Tensor:
        """The input images of one collated batch; override for custom batch types.

        Default: a tensor as is, the first element of a tuple or list, ``batch[input_key]`` of a dict (without
        ``input_key``: the first of the keys ``image``, ``images``, ``img``, ``pixel_values``, ``input``, ``inputs``,
        ``x`` that holds a floating tensor).
        """
        return extract_inputs(batch, self.input_key)

    def extract_labels(self, batch: Any) -> Tensor | None:
        """The class labels of one collated batch, or ``None``; override for custom batch types.

        Default: the second element of a tuple or list, ``batch[label_key]`` of a dict (without ``label_key``: the
        first of ``label``, ``labels``, ``target``, ``targets``, ``y``, ``class``, ``cls``), if it is a 1-D integer
        tensor.
        """
        return extract_labels(batch, self.label_key)

    def forward_probe(self, pl_module: nn.Module, inputs: Tensor) -> Any:
        """Run the monitored model on a probe minibatch; override when ``pl_module(inputs)`` is not the forward pass."""
        return pl_module(inputs)

    # ------------------------------------------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the logger and the other monitors, resolve the layers, build the reference and the probe engine."""
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "CKAMonitor needs a logger: pass Trainer(logger=TensorBoardLogger(...)) (or any other logger)."
            )
        twins = [
            cb for cb in trainer.callbacks if isinstance(cb, CKAMonitor) and cb is not self and cb.name == self.name
        ]
        if twins:
            raise MisconfigurationException(
                f"CKAMonitor: {len(twins) + 1} monitors on one Trainer share the name {self.name!r}, so they would "
                "write the same files and tags; give each a different name=..."
            )
        # A new fit: forget the last one's cadence and probe, unless a checkpoint restores them (after setup).
        self._last_probe_step = self._probe_indices = self._probe_hash = None
        self._restored = False
        self._fit_probes = 0
        self._previous = None
        models = [
            ProbedModel(
                "model",
                pl_module,
                self.layers,
                self.reduction,
                call=lambda x: self.forward_probe(pl_module, x),
                label=type(getattr(pl_module, "model", pl_module)).__name__,
            )
        ]
        if self.reference is not None:
            label, untrained = describe_reference(self.reference, self.reference_weights, self.reference_pretrained)
            if untrained:
                rank_zero_warn(
                    f"CKAMonitor: the reference {self.reference!r} is an untrained timm model (random weights), so "
                    "cka/reference compares the model with random features. Pass reference_weights=<checkpoint>, a "
                    "checkpoint as reference=, or reference_pretrained=True (needs internet)."
                )
            module = load_reference(
                self.reference, self.reference_weights, self.reference_pretrained, self.reference_kwargs
            ).to(pl_module.device)
            models.append(
                ProbedModel(
                    "reference", module, self.reference_layers, self.reference_reduction, frozen=True, label=label
                )
            )
        self._engine = ProbeEngine(models, build_analyses(self.options))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Draw the probe (the same indices after a resume) and probe the untrained model at step 0."""
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: called on every rank
        keep_files = self.save_arrays and not trainer.fast_dev_run  # as Lightning: a fast_dev_run writes no files
        self._array_dir = Path(log_dir) / "cka" / (self.name or "") if keep_files else None
        self._view = View(run=_run_label(trainer), local_threshold=self.local_threshold)
        if trainer.is_global_zero:
            sinks, summary_writers, skipped = image_sinks(trainer.loggers) if self.log_images else ([], [], [])
            if skipped:
                warnings.warn(
                    f"CKAMonitor: {', '.join(skipped)} cannot take images; its scalars are logged, its images skipped.",
                    stacklevel=2,
                )
            prefix = f"{self.name}/" if self.name else ""
            self._writer = ProbeWriter(self._view, sinks, summary_writers, prefix)
        # Lightning counts the last epoch as done before on_train_end: keep the epoch of the latest weights.
        self._epoch = trainer.current_epoch
        probe = self._draw_probe(trainer)
        self._batches = self._probe_batches(trainer, pl_module, probe)
        if trainer.is_global_zero and self._array_dir is not None:
            self._save_probe(probe)
        if trainer.global_step == 0 and self._last_probe_step != 0:
            self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Probe every ``every_n_train_steps`` optimizer steps (once per step under gradient accumulation)."""
        self._epoch = trainer.current_epoch
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_probe_step:
            self._probe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Probe every ``every_n_epochs`` epochs."""
        if (
            self.every_n_epochs
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and trainer.global_step != self._last_probe_step
        ):
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Probe the final model (unless that step was just probed) and wait for the images and arrays."""
        if trainer.global_step != self._last_probe_step:
            self._probe(trainer, pl_module)
        self._close_writer()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Finish writing what was already probed."""
        self._close_writer()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Stop the writer thread and free the probe, the engine and its caches."""
        self._close_writer()
        self._engine, self._batches, self._previous = None, [], None

    def state_dict(self) -> dict[str, Any]:
        """The cadence (last probed step), the probe's identity (dataset indices, hash) and the settings."""
        return {
            "last_probe_step": self._last_probe_step,
            "probe_indices": self._probe_indices,
            "probe_hash": self._probe_hash,
            "settings": self._settings(),
            "array_dir": None if self._array_dir is None else str(self._array_dir),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; keys missing from older checkpoints keep their defaults."""
        self._last_probe_step = state_dict.get("last_probe_step")
        self._probe_indices = state_dict.get("probe_indices")
        self._probe_hash = state_dict.get("probe_hash")
        self._restored = True

    # ------------------------------------------------------------------------------------------------------- the probe

    def _settings(self) -> dict[str, Any]:
        """What the probe runs with, stored with every probe and in checkpoints (``lightning-cka analyze`` reads it)."""
        reference = self.reference if isinstance(self.reference, str | None) else type(self.reference).__name__
        return {
            "options": self.options.as_dict(),
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "reduction": self.reduction,
            "reference": reference,
            "reference_weights": self.reference_weights,
            "reference_layers": self.reference_layers
            if isinstance(self.reference_layers, str)
            else list(self.reference_layers),
            "reference_reduction": self.reference_reduction,
            "batch_size": self.batch_size,
            "probe_size": self.probe_size,
            "seed": self.seed,
            "local_threshold": self.local_threshold,
            "name": self.name,
        }

    def _draw_probe(self, trainer: Any) -> Probe:
        source = self.probe
        if source is None:
            source = first_dataloader(trainer.val_dataloaders) or first_dataloader(trainer.train_dataloader)
            if source is None:
                raise MisconfigurationException(
                    "CKAMonitor found no validation or training DataLoader to draw the probe from; pass probe=..."
                )
        indices = self._probe_indices if self._restored else None
        probe = sample_probe(source, self.probe_size, self.seed, self.extract_inputs, self.extract_labels, indices)
        if self.probe_labels is not None:
            probe.labels = self.probe_labels
        if probe.images.shape[0] < MIN_BATCH:
            raise MisconfigurationException(
                f"CKAMonitor: the probe has {probe.images.shape[0]} examples; it needs at least 4."
            )
        if self.options.linear_probe and probe.labels is None:
            raise MisconfigurationException(
                "CKAMonitor: linear_probe=True needs class labels: use (image, label) batches, label_key= for dict "
                "batches, or probe_labels= next to a tensor probe."
            )
        digest = probe.hash
        if self._restored and self._probe_hash is not None and digest != self._probe_hash:
            warnings.warn(
                "CKAMonitor: the probe images differ from those before the checkpoint was saved; CKA over time is not "
                "comparable across the resume.",
                stacklevel=2,
            )
        self._probe_indices, self._probe_hash = probe.indices, digest
        return probe

    def _probe_batches(self, trainer: Any, pl_module: Any, probe: Probe) -> list[ProbeBatch]:
        """This rank's share of the probe minibatches, on the model's device."""
        images = trainer.strategy.precision_plugin.convert_input(probe.images)
        slices = minibatch_slices(images.shape[0], self.batch_size)
        self._num_minibatches, self._num_examples = len(slices), images.shape[0]
        labels = probe.labels
        return [
            ProbeBatch(
                index,
                part.start,
                images[part].to(pl_module.device),
                None if labels is None else labels[part].to(pl_module.device),
            )
            for index, part in enumerate(slices)
            if index % trainer.world_size == trainer.global_rank
        ]

    def _save_probe(self, probe: Probe) -> None:
        size = probe.images.numel() * 4
        if size > PROBE_FILE_LIMIT:
            return
        path = self._array_dir / "probe.npz"
        try:
            save_probe(path, probe)
        except OSError as err:
            warnings.warn(f"CKAMonitor could not write the probe images to {path}: {err!r}", stacklevel=2)

    def _probe(self, trainer: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        try:
            with trainer.strategy.precision_plugin.forward_context():
                self._engine.run(self._batches, self._num_minibatches, pl_module.device)
            error = None
        except Exception as err:  # a monitor must not stop training; only the first probe reports misconfiguration
            error = err
        # Every rank reaches this collective, failed or not, so that no rank waits forever in the metric sync.
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            message = f"CKAMonitor: the probe at step {trainer.global_step} failed ({_gather_errors(trainer, error)})"
            if self._fit_probes == 0:
                raise RuntimeError(f"{message}; fix the configuration.") from error
            warnings.warn(f"{message}; training continues, the next probe runs as scheduled.", stacklevel=2)
            return
        try:
            fields = self._engine.compute()  # collective: the analyses sum their states across ranks
        except Exception as err:
            warnings.warn(
                f"CKAMonitor: the probe at step {trainer.global_step} could not be reduced ({err!r}); "
                "training continues.",
                stacklevel=2,
            )
            return
        self._last_probe_step = trainer.global_step
        self._fit_probes += 1
        if trainer.is_global_zero:
            try:
                self._report(trainer, fields, time.perf_counter() - start)
            except Exception as err:  # after the forward pass too, the rule is: warn and go on
                warnings.warn(
                    f"CKAMonitor: the results of step {trainer.global_step} could not be logged ({err!r}); "
                    "training continues.",
                    stacklevel=2,
                )

    def _report(self, trainer: Any, fields: dict[str, Any], seconds: float) -> None:
        result = CKAResult(
            fields,
            step=trainer.global_step,
            epoch=self._epoch,
            num_examples=self._num_examples,
            run=self._view.run,
            probe_hash=self._probe_hash,
            probe_indices=self._probe_indices,
            settings=json.dumps(self._settings()),
        )
        scalars = {"cka/probe_seconds": seconds, **result.scalars(self._view)}
        prefix = f"{self.name}/" if self.name else ""
        finite = {prefix + tag: value for tag, value in scalars.items() if np.isfinite(value)}
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=trainer.global_step)
        array_path = self._array_dir / f"step_{trainer.global_step:07d}.npz" if self._array_dir else None
        self._writer.submit(result, self._previous, array_path)
        self._previous = result

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _run_label(trainer: Any) -> str:
    """``name/version_N`` of the trainer's first logger: which run a figure belongs to."""
    logger = trainer.logger
    name, version = getattr(logger, "name", None), getattr(logger, "version", None)
    version = f"version_{version}" if isinstance(version, int) else version
    return "/".join(str(part) for part in (name, version) if part not in (None, ""))


def _gather_errors(trainer: Any, error: BaseException | None) -> str:
    """Every rank's error, as ``rank 1: RuntimeError(...)`` (a collective, called on every rank)."""
    text = None if error is None else repr(error)
    world = trainer.world_size
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        texts: list[str | None] = [None] * world
        torch.distributed.all_gather_object(texts, text)
    else:
        texts = [text]
    return "; ".join(f"rank {rank}: {t}" if world > 1 else t for rank, t in enumerate(texts) if t)

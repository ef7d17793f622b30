"""CKAMonitor: live CKA heatmaps and attention statistics of a model while it trains."""

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning
from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_cka.callbacks.probe_data import ProbeSource, first_dataloader, sample_probe
from lightning_cka.callbacks.renderer import ProbeRenderer
from lightning_cka.callbacks.reporting import BackgroundWriter, image_sinks, probe_scalars, write_probe
from lightning_cka.data import MIN_BATCH, extract_inputs, fingerprint, minibatch_slices
from lightning_cka.metrics.attention_distance import MeanAttentionDistance
from lightning_cka.metrics.minibatch_cka import MinibatchCKA
from lightning_cka.reference import load_reference
from lightning_cka.result import CKAResult
from lightning_cka.taps.layers import LayerSpec, display_names, find_layers
from lightning_cka.taps.recorder import REDUCTIONS, Recorder, Reduction

try:  # the same callback must pass isinstance checks of `lightning.pytorch` when users import Lightning that way
    import lightning.pytorch as _lightning_pytorch

    _CALLBACK_BASES: tuple[type, ...] = (pytorch_lightning.Callback, _lightning_pytorch.Callback)
except ImportError:
    _CALLBACK_BASES = (pytorch_lightning.Callback,)


class CKAMonitor(*_CALLBACK_BASES):  # type: ignore[misc]
    r"""Probe a fixed batch of examples during training and log CKA heatmaps and attention statistics.

    At the start of training (step 0, the untrained model), every ``every_n_train_steps`` optimizer steps or
    ``every_n_epochs`` epochs, and at the end of training, the callback runs the probe images through the model in eval
    mode without autograd (and through the frozen ``reference``, once: its Grams are cached), records the Gram matrix
    of every monitored layer, and computes the minibatch CKA (Nguyen et al. 2021) of every layer pair, of every layer
    with the reference's layers and with itself at the previous probe, and the mean attention distance of every head
    of timm ViTs. Training is left bit-identical: no RNG draw, BatchNorm update, ``training`` flag, gradient or
    optimizer state is touched. Images and ``.npz`` files are produced by a background thread on global rank 0.

    Logged tags (``name/`` is prefixed when ``name`` is given), see ``docs/callback.md``:

    - images: ``cka/intra``, ``cka/reference``, ``cka/intra_change``, ``attention/mean_distance``;
    - scalars: ``cka/probe_seconds``, ``cka/adjacent_mean``, ``cka/offdiag_mean``, ``cka_vs_previous/<layer>``,
      ``cka_reference/best_value/<layer>``, ``cka_reference/best_layer/<layer>``, ``attention/mean_distance/<layer>``,
      ``attention/min_distance/<layer>``, ``attention/local_fraction/<layer>``;
    - arrays: ``<log_dir>/cka/step_<global_step:07d>.npz`` (``<log_dir>/cka/<name>/...`` with a name).

    Args:
        every_n_train_steps: probe every this many optimizer steps. Exclusive with ``every_n_epochs``.
        every_n_epochs: probe at the end of every this many training epochs. Default when neither is given: 1.
        probe: the probe images: a tensor ``(N, C, H, W)`` (used whole), a ``Dataset`` or a ``DataLoader``. Default:
            ``probe_size`` examples drawn once, with a generator seeded by ``seed``, from the validation dataloader's
            dataset (the training dataloader's when there is no validation).
        probe_size: number of probe examples drawn from a dataset (fewer if it is smaller).
        batch_size: minibatch size of the unbiased CKA estimator, at least 4.
        layers: ``"auto"`` (residual blocks) or names / glob patterns, see :func:`lightning_cka.find_layers`.
            Looked up in the LightningModule; leading attribute segments may be left out (``"blocks.*"``).
        reduction: ``"flatten"``, ``"cls"`` or ``"mean"``: what a layer's output becomes before its Gram.
        reference: a model to compare with: an ``nn.Module`` or a timm model name. It is frozen, kept in eval mode
            on the training device and never trained.
        reference_weights: weights for the reference: a state dict file or a (Lightning) checkpoint of another run.
        reference_pretrained: let timm download pretrained weights for a named reference (needs internet).
        reference_kwargs: keyword arguments for ``timm.create_model`` of a named reference (``num_classes``, ...).
        reference_layers: layers of the reference, as ``layers``.
        reference_reduction: reduction for the reference (default: ``reduction``; a CNN next to ``"cls"``: ``"mean"``).
        attention: log mean attention distances: ``"auto"`` when the model has timm attention modules, ``True`` to
            require them, ``False`` to skip.
        local_threshold: a head counts as local when its mean distance is below this fraction of the distance of
            uniform attention over the patch grid (16.5 px for 8 x 8 patches of 4 px, 116.5 px for ViT-B/16 at 224).
        log_images: log the figures to loggers that take images (TensorBoard, W&B).
        save_arrays: write each probe's matrices and distances as ``.npz`` under the log directory.
        input_key: key of the images in dict batches.
        seed: seed of the probe sample.
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
        probe_size: int = 1024,
        batch_size: int = 256,
        layers: LayerSpec = "auto",
        reduction: Reduction = "flatten",
        reference: nn.Module | str | None = None,
        reference_weights: str | None = None,
        reference_pretrained: bool = False,
        reference_kwargs: dict[str, Any] | None = None,
        reference_layers: LayerSpec = "auto",
        reference_reduction: Reduction | None = None,
        attention: bool | Literal["auto"] = "auto",
        local_threshold: float = 0.5,
        log_images: bool = True,
        save_arrays: bool = True,
        input_key: str | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise MisconfigurationException(
                "CKAMonitor: every_n_train_steps and every_n_epochs are mutually exclusive; set one of them."
            )
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        for arg, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MisconfigurationException(f"CKAMonitor: {arg} must be a positive int, got {value!r}.")
        for arg, value in (("probe_size", probe_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < MIN_BATCH:
                raise MisconfigurationException(
                    f"CKAMonitor: {arg} must be an int >= {MIN_BATCH} (the unbiased CKA estimator needs 4 examples per"
                    f" minibatch), got {value!r}."
                )
        if probe is not None and not isinstance(probe, ProbeSource):
            raise MisconfigurationException(
                f"CKAMonitor: probe must be a tensor of images, a Dataset or a DataLoader, got {type(probe).__name__}."
            )
        if isinstance(probe, Tensor) and (probe.dim() < 2 or probe.shape[0] < MIN_BATCH):
            raise MisconfigurationException(
                f"CKAMonitor: a probe tensor needs shape (N, ...) with N >= 4, got {tuple(probe.shape)}."
            )
        for arg, value in (("reduction", reduction), ("reference_reduction", reference_reduction or reduction)):
            if value not in REDUCTIONS:
                raise MisconfigurationException(f"CKAMonitor: {arg} must be one of {REDUCTIONS}, got {value!r}.")
        if attention not in (True, False, "auto"):
            raise MisconfigurationException(f"CKAMonitor: attention must be True, False or 'auto', got {attention!r}.")
        if not 0 < local_threshold <= 1:
            raise MisconfigurationException(
                f"CKAMonitor: local_threshold is a fraction of the uniform-attention distance in (0, 1], "
                f"got {local_threshold!r}."
            )
        if reference is not None and not isinstance(reference, nn.Module | str):
            raise MisconfigurationException(
                f"CKAMonitor: reference must be an nn.Module or a timm model name, got {type(reference).__name__}."
            )
        if reference is None and (reference_weights or reference_pretrained or reference_kwargs):
            raise MisconfigurationException(
                "CKAMonitor: reference_weights / reference_pretrained / reference_kwargs were given without reference."
            )
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise MisconfigurationException(f"CKAMonitor: name must be a non-empty string without '/', got {name!r}.")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.probe = probe
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
        self.attention = attention
        self.local_threshold = local_threshold
        self.log_images = log_images
        self.save_arrays = save_arrays
        self.input_key = input_key
        self.seed = seed
        self.name = name

        # Saved in checkpoints: the cadence and the identity of the probe.
        self._last_probe_step: int | None = None
        self._probe_indices: list[int] | None = None
        self._probe_fingerprint: list[float] | None = None
        # Rebuilt in every fit.
        self._fit_probes = 0
        self._layer_names: list[str] = []
        self._reference_model: nn.Module | None = None
        self._reference_layer_names: list[str] = []
        self._batches: list[Tensor] | None = None
        self._probe_count = 0
        self._reference_grams: list[list[Tensor]] | None = None
        self._reference_recording: _Recording | None = None
        self._previous_grams: list[list[Tensor]] | None = None
        self._previous: CKAResult | None = None
        self._array_dir: Path | None = None
        self._sinks: list = []
        self._renderer: ProbeRenderer | None = None  # used on the writer thread only
        self._writer = BackgroundWriter()

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
        ``x``).
        """
        return extract_inputs(batch, self.input_key)

    def forward_probe(self, pl_module: nn.Module, inputs: Tensor) -> Any:
        """Run the monitored model on a probe minibatch; override when ``pl_module(inputs)`` is not the forward pass."""
        return pl_module(inputs)

    # ------------------------------------------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the logger, resolve the layer names and build the reference: misconfiguration fails before training."""
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "CKAMonitor needs a logger: pass Trainer(logger=TensorBoardLogger(...)) (or any other logger)."
            )
        self._fit_probes = 0
        self._previous = self._previous_grams = self._renderer = None
        self._layer_names = find_layers(pl_module, self.layers)
        if self.reference is not None:
            self._reference_model = load_reference(
                self.reference, self.reference_weights, self.reference_pretrained, self.reference_kwargs
            )
            self._reference_layer_names = find_layers(self._reference_model, self.reference_layers)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Draw the probe (the same indices after a resume) and probe the untrained model at step 0."""
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: called on every rank
        self._array_dir = Path(log_dir) / "cka" / (self.name or "") if self.save_arrays else None
        if trainer.is_global_zero and self.log_images:
            self._sinks, skipped = image_sinks(trainer.loggers)
            if skipped:
                warnings.warn(
                    f"CKAMonitor: {', '.join(skipped)} cannot take images; its scalars are logged, its images skipped.",
                    stacklevel=2,
                )
        if self._reference_model is not None:
            self._reference_model.to(pl_module.device)
        self._batches = self._probe_batches(trainer, pl_module)
        if trainer.global_step == 0 and self._last_probe_step != 0:
            self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Probe every ``every_n_train_steps`` optimizer steps (once per step under gradient accumulation)."""
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
        self._writer.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Finish writing what was already probed."""
        self._writer.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Stop the writer thread and free the probe and the cached Grams."""
        self._writer.close()
        self._batches = self._reference_grams = self._reference_recording = self._previous_grams = None

    def state_dict(self) -> dict[str, Any]:
        """The cadence (last probed step) and the probe's identity (dataset indices and a fingerprint)."""
        return {
            "last_probe_step": self._last_probe_step,
            "probe_indices": self._probe_indices,
            "probe_fingerprint": self._probe_fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._last_probe_step = state_dict["last_probe_step"]
        self._probe_indices = state_dict["probe_indices"]
        self._probe_fingerprint = state_dict["probe_fingerprint"]

    # ------------------------------------------------------------------------------------------------------- the probe

    def _probe_batches(self, trainer: Any, pl_module: Any) -> list[Tensor]:
        """This rank's share of the probe minibatches, on the model's device."""
        source = self.probe
        if source is None:
            source = first_dataloader(trainer.val_dataloaders) or first_dataloader(trainer.train_dataloader)
            if source is None:
                raise MisconfigurationException(
                    "CKAMonitor found no validation or training DataLoader to draw the probe from; pass probe=..."
                )
        images, indices = sample_probe(source, self.probe_size, self.seed, self.extract_inputs, self._probe_indices)
        if images.shape[0] < MIN_BATCH:
            raise MisconfigurationException(
                f"CKAMonitor: the probe has {images.shape[0]} examples; it needs at least 4."
            )
        identity = fingerprint(images)
        if self._probe_fingerprint is not None and not np.allclose(identity, self._probe_fingerprint, rtol=1e-6):
            warnings.warn(
                "CKAMonitor: the probe images differ from those before the checkpoint was saved; CKA over time is not "
                "comparable across the resume.",
                stacklevel=2,
            )
        self._probe_indices, self._probe_fingerprint, self._probe_count = indices, identity, images.shape[0]
        images = trainer.strategy.precision_plugin.convert_input(images)
        slices = minibatch_slices(images.shape[0], self.batch_size)
        mine = slices[trainer.global_rank :: trainer.world_size]
        return [images[s].to(pl_module.device) for s in mine]

    def _probe(self, trainer: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        try:
            recording, error = self._record(trainer, pl_module), None
        except Exception as err:  # a monitor must not stop training; only the first probe reports misconfiguration
            recording, error = None, err
        # Every rank reaches this collective, failed or not, so that no rank waits forever in the metric sync.
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            message = f"CKAMonitor: the probe at step {trainer.global_step} failed"
            if self._fit_probes == 0:
                raise RuntimeError(f"{message} (on this rank: {error!r}); fix the configuration.") from error
            warnings.warn(f"{message} ({error!r}); training continues, the next probe runs as scheduled.", stacklevel=2)
            return
        result = self._compute(trainer, recording)  # collective: the metrics sum their states across ranks
        self._previous_grams, previous, self._previous = recording.grams, self._previous, result
        self._last_probe_step = trainer.global_step
        self._fit_probes += 1
        if trainer.is_global_zero:
            scalars = {"cka/probe_seconds": time.perf_counter() - start}
            threshold_px = self.local_threshold * result.uniform_attention_distance  # NaN without attention
            scalars.update(probe_scalars(result, threshold_px))
            prefix = f"{self.name}/" if self.name else ""
            for logger in trainer.loggers:
                logger.log_metrics({prefix + tag: value for tag, value in scalars.items()}, step=trainer.global_step)
            array_path = self._array_dir / f"step_{trainer.global_step:07d}.npz" if self._array_dir else None
            if self._renderer is None:
                self._renderer = ProbeRenderer(threshold_px)
            self._writer.submit(write_probe, result, previous, self._renderer, self._sinks, prefix, array_path)

    def _record(self, trainer: Any, pl_module: Any) -> "_Recording":
        """Forward passes and HSIC sums of this rank's minibatches; no collective calls."""
        with trainer.strategy.precision_plugin.forward_context():
            if self._reference_model is not None and self._reference_grams is None:
                reference = self._reference_model
                dtype = next(reference.parameters()).dtype
                self._reference_recording = self._record_model(
                    reference,
                    self._reference_layer_names,
                    self.reference_reduction,
                    lambda x: reference(x.to(dtype) if x.is_floating_point() else x),
                )
                self._reference_grams = self._reference_recording.grams
            recording = self._record_model(
                pl_module, self._layer_names, self.reduction, lambda x: self.forward_probe(pl_module, x)
            )
        names = list(self._layer_names)
        if self._previous_grams is not None:
            names += [f"{n} (previous probe)" for n in self._layer_names]
        names += [f"{n} (reference)" for n in self._reference_layer_names]
        recording.cka = MinibatchCKA(layer_names_a=names).to(pl_module.device)
        for i, grams in enumerate(recording.grams):
            previous = self._previous_grams[i] if self._previous_grams is not None else []
            reference = self._reference_grams[i] if self._reference_grams is not None else []
            recording.cka.update(grams + previous + reference, grams=True)
        return recording

    def _record_model(self, model: nn.Module, layers: list[str], reduction: str, call: Any) -> "_Recording":
        recording = _Recording()
        with Recorder(model, layers, reduction, self.attention) as rec:
            for batch in self._batches or []:
                call(batch)
                recording.grams.append(rec.grams)
        if rec.attention is not None:
            recording.attention = rec.attention
            recording.attention_layers = display_names(model, rec.attention_layers)
        return recording

    def _compute(self, trainer: Any, recording: "_Recording") -> CKAResult:
        full = recording.cka.compute().cpu().numpy()
        num = len(self._layer_names)
        result = CKAResult(
            layers=display_names(trainer.lightning_module, self._layer_names),
            intra=full[:num, :num],
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            num_examples=self._probe_count,
        )
        offset = num
        if self._previous_grams is not None:
            result.previous = full[:num, num : 2 * num]
            offset += num
        if self._reference_model is not None:
            result.reference_layers = display_names(self._reference_model, self._reference_layer_names)
            result.reference = full[:num, offset:]
            result.reference_intra = full[offset:, offset:]
        if recording.attention is not None:
            result.attention_layers = recording.attention_layers
            result.mean_attention_distance = recording.attention.compute().cpu().numpy()
            result.uniform_attention_distance = recording.attention.uniform_distance
        reference = self._reference_recording
        if reference is not None and reference.attention is not None:
            if reference.distances is None:
                reference.distances = reference.attention.compute().cpu().numpy()
            result.reference_attention_layers = reference.attention_layers
            result.reference_mean_attention_distance = reference.distances
            result.reference_uniform_attention_distance = reference.attention.uniform_distance
        return result


@dataclass
class _Recording:
    """What one model's probe pass left behind on this rank."""

    grams: list[list[Tensor]] = field(default_factory=list)  # per minibatch, per layer: (n, n)
    attention: MeanAttentionDistance | None = None
    attention_layers: list[str] = field(default_factory=list)
    distances: np.ndarray | None = None  # computed attention distances (cached for the reference)
    cka: MinibatchCKA | None = None

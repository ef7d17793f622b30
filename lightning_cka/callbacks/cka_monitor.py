"""CKAMonitor: live CKA heatmaps and the paper's other analyses of a model while it trains, in TensorBoard."""

import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_cka.analyses import resolve_analyses
from lightning_cka.callbacks.agreement import agree
from lightning_cka.callbacks.writer import ProbeWriter
from lightning_cka.engine import options as check
from lightning_cka.engine.analysis import Analysis, View, describe_error, json_ready
from lightning_cka.engine.engine import ProbeBatch, ProbeEngine
from lightning_cka.engine.models import ProbedModel
from lightning_cka.findings import Criteria, Event
from lightning_cka.probe_data.batches import MIN_BATCH, extract_inputs, extract_labels, minibatch_slices
from lightning_cka.probe_data.sample import Probe, save_probe
from lightning_cka.probe_data.sampler import NoProbeSource, ProbeSampler
from lightning_cka.reference import Reference
from lightning_cka.result import CKAResult
from lightning_cka.taps.grams import REDUCTIONS, Reduction, token_layout
from lightning_cka.taps.layers import LayerSpec, find_layers, named_modules
from lightning_cka.taps.unwrap import classifier_pool

MIN_JACKKNIFE = 4  # minibatches below which the monitor warns that the standard errors are unreliable

try:  # the same callback must pass isinstance checks of `lightning.pytorch` when users import Lightning that way
    import lightning.pytorch as _lightning_pytorch

    _CALLBACK_BASES: tuple[type, ...] = (pytorch_lightning.Callback, _lightning_pytorch.Callback)
except ImportError:
    _CALLBACK_BASES = (pytorch_lightning.Callback,)

_NAME = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]+$")
PROBE_FILE_LIMIT = 64 * 2**20  # probe images up to this size are saved with the run, for `lightning-cka analyze`


class CKAMonitor(*_CALLBACK_BASES):  # type: ignore[misc]
    r"""Probe a fixed batch of examples during training and log CKA heatmaps and the paper's other analyses.

    At the start of training (step 0, the untrained model), on the cadence below, and at the end of training, the
    callback runs the probe images through the model in eval mode without autograd (and through the frozen
    ``reference``, once: its measurements are cached and it then leaves the training device), and runs the
    ``analyses`` on what it sees, with one forward pass per model. By default: the minibatch CKA (Nguyen et al. 2021)
    of every layer pair, of every layer with the reference's layers and with itself at the previous probe, each with a
    block-jackknife standard error and a permutation-null threshold; attention distances and entropies; per-head CKA
    with the reference; skip-connection ratios; effective ranks (Raghu et al. 2021).

    What it promises (``docs/callback.md``, "Guarantees", says exactly what each test proves):

    - training is bit-identical to training without it: no RNG draw (the reference's construction included),
      BatchNorm update, ``training`` flag, gradient, optimizer state or training example is touched;
    - a probe's arrays (``<log_dir>/cka/step_<global_step:07d>.npz``) are on disk before the probe counts as done in a
      checkpoint; a disk that refuses them gets them as soon as it takes them again;
    - nothing it does stops training after the first probe: a failing analysis is left out (with one warning), a
      failing logger costs pictures and scalars, never arrays or the fit;
    - every argument is checked here, at construction, naming the argument and what it takes.

    Logged tags (``name/`` is prefixed when ``name`` is given), one page each in ``docs/tags/``: images (and the
    TensorBoard **CKA** dashboard) such as ``cka/intra``, ``cka/reference``, ``attention/mean_distance``; scalars such
    as ``cka/offdiag_mean`` (``_se``), ``cka_vs_previous/<layer>``, ``attention/mean_distance/<layer>``; arrays
    ``<log_dir>/cka/step_<global_step:07d>.npz`` (``<log_dir>/cka/<name>/...`` with a name), and the probe images once,
    ``<log_dir>/cka/probe.npz``, when they take at most 64 MiB.

    Args:
        every_n_train_steps: probe whenever ``trainer.global_step`` reaches a new multiple of this (optimizer steps;
            under manual optimization with two optimizers, each ``optimizer.step()`` counts).
        every_n_train_batches: probe after every this many training batches.
        every_n_epochs: probe at the end of every this many training epochs. Default when no cadence is given: 1.
        analyses: what to measure: analyses and names, ``"default"`` for the default ones (:data:`None`: the
            defaults, ``cka``, ``attention``, ``heads``, ``residual`` and ``rank``). For example ``["default",
            "linear_probe", Localization(layer="blocks.5")]``. An analysis that does not apply to the model is left
            out, with one warning when it was named here.
        probe_data: the probe images: a tensor ``(N, C, H, W)`` (used whole), a ``Dataset`` or a ``DataLoader``.
            Default: ``probe_size`` examples drawn once, with a generator seeded by ``seed``, from the validation
            DataLoader's dataset (the training set's, read by index, when there is no validation; never a training
            stream).
        probe_labels: ``(N,)`` integer class labels of a tensor ``probe_data`` (for the ``linear_probe`` analysis).
        probe_size: number of probe examples drawn from a dataset (fewer if it is smaller).
        batch_size: minibatch size of the unbiased CKA estimator, at least 4; the jackknife's blocks are these
            minibatches (``docs/reading.md`` explains the default).
        layers: ``"auto"`` (residual blocks) or names / glob patterns, see :func:`lightning_cka.find_layers`. Looked up
            in the LightningModule; leading attribute segments may be left out (``"blocks.*"``).
        reduction: ``"flatten"``, ``"cls"`` or ``"mean"``: what a layer's output becomes before its Gram.
        reference: a model to compare with: a :class:`lightning_cka.Reference`, or what its ``model`` takes (an
            ``nn.Module``, a timm model name, or a Lightning checkpoint path whose hyperparameters name its timm
            architecture). It is frozen, kept in eval mode and never trained.
        log_images: log the figures to loggers that take images (TensorBoard, W&B), and the dashboard's data to
            TensorBoard.
        save_arrays: write each probe's arrays as ``.npz`` under the log directory.
        input_key: key of the images in dict batches.
        label_key: key of the labels in dict batches.
        seed: seed of the probe sample and of the null's permutations.
        name: distinguishes several monitors on one Trainer: prefixes tags and names the array folder and state key.
        criteria: thresholds of the events the monitor notices (a head becoming local, a block that stopped changing,
            a collapse, ...), by ``"<analysis>.<key>"``: ``{"attention.hysteresis": 0.2}``; docs/report.md lists
            them with their defaults. Each event is logged as TensorBoard text and an ``events/<kind>`` scalar, and
            stored in the probe's file.

    Example::

        from pytorch_lightning import Trainer
        from pytorch_lightning.loggers import TensorBoardLogger
        from lightning_cka import CKAMonitor, Reference

        monitor = CKAMonitor(every_n_train_steps=500, reference=Reference("resnet18", weights="resnet.ckpt"))
        trainer = Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs"))
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_train_batches: int | None = None,
        every_n_epochs: int | None = None,
        analyses: Sequence[Analysis | str] | None = None,
        probe_data: Tensor | Dataset | DataLoader | None = None,
        probe_labels: Tensor | None = None,
        probe_size: int = 1024,
        batch_size: int = 128,
        layers: LayerSpec = "auto",
        reduction: Reduction = "flatten",
        reference: Reference | nn.Module | str | os.PathLike | None = None,
        log_images: bool = True,
        save_arrays: bool = True,
        input_key: str | None = None,
        label_key: str | None = None,
        seed: int = 0,
        name: str | None = None,
        criteria: dict[str, float] | None = None,
    ) -> None:
        try:
            self._validate_init_configuration(
                every_n_train_steps, every_n_train_batches, every_n_epochs, batch_size, layers, reduction, name
            )
            self.sampler = ProbeSampler(probe_data, probe_labels, probe_size, seed)
            self.reference = Reference.of(reference)
            resolved = resolve_analyses(analyses)
            for analysis, _ in resolved:
                json_ready(f"CKAMonitor: the options of the {analysis.name} analysis", analysis.describe())
            if criteria is not None and not isinstance(criteria, dict):
                raise ValueError(f"criteria must be a dict of '<analysis>.<key>': number, got {criteria!r}.")
            self._criteria = Criteria(criteria, [analysis for analysis, _ in resolved])
            self.log_images = check.flag("CKAMonitor", "log_images", log_images)
            self.save_arrays = check.flag("CKAMonitor", "save_arrays", save_arrays)
            self.input_key = check.optional_text("CKAMonitor", "input_key", input_key, "a dict key")
            self.label_key = check.optional_text("CKAMonitor", "label_key", label_key, "a dict key")
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self.analyses = [analysis for analysis, _ in resolved]
        self._named = {analysis.name for analysis, named in resolved if named}
        self.every_n_train_steps = every_n_train_steps
        self.every_n_train_batches = every_n_train_batches
        self.every_n_epochs = every_n_epochs
        if every_n_train_steps is None and every_n_train_batches is None and every_n_epochs is None:
            self.every_n_epochs = 1
        self.batch_size, self.layers, self.reduction, self.name = batch_size, layers, reduction, name
        self.seed = self.sampler.seed
        self.criteria = dict(criteria or {})

        # Saved in checkpoints: the cadence, the identity of the probe, the settings (plain types only).
        self._last_probe_step: int | None = None
        self._last_probe_batch: int | None = None
        self._last_attempt_step: int | None = None  # the cadence counts failed probes as held
        self._probe_indices: list[int] | None = None
        self._probe_hash: str | None = None
        self._restored = False
        # Rebuilt in every fit.
        self._engine: ProbeEngine | None = None
        self._batches: list[ProbeBatch] = []
        self._num_minibatches = 0
        self._num_examples = 0
        self._probe_source = ""
        self._fit_probes = 0
        self._epoch = 0
        self._previous: CKAResult | None = None
        self._array_dir: Path | None = None
        self._view = View()
        self._writer: ProbeWriter | None = None
        self._said: set[Any] = set()
        self._left_out: dict[str, str] = {}  # analyses out of this fit, with the reason
        self._pool, self._train_examples = "", 0  # what the classifier reads; the training set's size (0: unknown)
        self._history: list[CKAResult] = []  # this fit's probes, holding only what the analyses' events read

    def _validate_init_configuration(
        self,
        every_n_train_steps: Any,
        every_n_train_batches: Any,
        every_n_epochs: Any,
        batch_size: Any,
        layers: Any,
        reduction: Any,
        name: Any,
    ) -> None:
        """Reject bad arguments at construction, naming the argument and what it takes (``ValueError``)."""
        cadences = {
            "every_n_train_steps": every_n_train_steps,
            "every_n_train_batches": every_n_train_batches,
            "every_n_epochs": every_n_epochs,
        }
        given = [arg for arg, value in cadences.items() if value is not None]
        if len(given) > 1:
            raise ValueError(f"CKAMonitor: {' and '.join(given)} are mutually exclusive; set one of them.")
        for arg in given:
            check.integer("CKAMonitor", arg, cadences[arg], 1)
        check.integer("CKAMonitor", "batch_size", batch_size, MIN_BATCH, hint="the unbiased CKA estimator needs 4")
        check.layer_spec("CKAMonitor", "layers", layers)
        check.choice("CKAMonitor", "reduction", reduction, REDUCTIONS)
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ValueError(
                "CKAMonitor: name must be letters, digits, '_', '-' or '.' (not only dots), without '/': it names a "
                f"folder and a tag prefix; got {name!r}."
            )

    @property
    def state_key(self) -> str:
        """Checkpoint key; monitors with another cadence or ``name`` keep separate states."""
        return self._generate_state_key(
            every_n_train_steps=self.every_n_train_steps,
            every_n_train_batches=self.every_n_train_batches,
            every_n_epochs=self.every_n_epochs,
            name=self.name,
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
        """Run the monitored model on a probe minibatch; override when ``pl_module(inputs)`` is not the forward pass.

        ``return pl_module.model(inputs)`` is fine: the hooks are on the layers, wherever the call enters.
        """
        return pl_module(inputs)

    # ------------------------------------------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the logger and the other monitors, resolve the layers, build the reference and bind the analyses."""
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
        self._last_probe_step = self._last_probe_batch = self._probe_indices = self._probe_hash = None
        self._last_attempt_step = None
        self._restored = False
        self._fit_probes = 0
        self._previous = None
        self._history = []
        self._said = set()
        self._left_out = {}
        self._engine = None
        self._pool = classifier_pool(pl_module)
        self._train_examples = 0
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
            label, untrained = self.reference.describe()
            if untrained:
                self._warn(
                    f"CKAMonitor: the reference {self.reference.model!r} is an untrained timm model (random weights), "
                    "so cka/reference compares the model with random features. Pass Reference(name, weights="
                    "<checkpoint>), a checkpoint as reference=, or Reference(name, pretrained=True) (needs internet)."
                )
            module = self.reference.build(pl_module.device)
            reduction = self.reference.reduction or self.reduction
            if self.reference.reduction is None and reduction == "cls" and not _has_class_token(module, self.reference):
                reduction = "mean"  # a CNN next to a model read at its class token: its pooled features
            models.append(ProbedModel("reference", module, self.reference.layers, reduction, frozen=True, label=label))
        self._engine = ProbeEngine(models, self.analyses, seed=self.seed)
        self._report_skipped()

    def _report_skipped(self) -> None:
        quiet = []
        self._left_out.update(self._engine.skipped)
        for name, reason in self._engine.skipped.items():
            if name in self._named:
                self._warn(
                    f"CKAMonitor: the {name} analysis is left out of this fit: {reason}. Leave it out of analyses=... "
                    "to silence this."
                )
            else:
                quiet.append(f"{name} ({reason})")
        if quiet:
            rank_zero_info(f"CKAMonitor: default analyses that do not apply here: {'; '.join(quiet)}.")

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Draw the probe (the same indices after a resume) and probe the untrained model at step 0."""
        if self._engine is None:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: called on every rank
        keep_files = self.save_arrays and not trainer.fast_dev_run  # as Lightning: a fast_dev_run writes no files
        self._array_dir = Path(log_dir) / "cka" / (self.name or "") if keep_files else None
        self._view = View(run=_run_label(trainer))
        if trainer.is_global_zero:
            prefix = f"{self.name}/" if self.name else ""
            self._writer = ProbeWriter(self._view, list(trainer.loggers), prefix, self.log_images, self._warn)
        # Lightning counts the last epoch as done before on_train_end: keep the epoch of the latest weights.
        self._epoch = trainer.current_epoch
        self._train_examples = _train_examples(trainer)
        probe = self._draw_probe(trainer)
        if probe is None:
            self._engine = None  # said once; training goes on unwatched
            return
        self._batches = self._probe_batches(trainer, pl_module, probe)
        if trainer.is_global_zero and self._array_dir is not None:
            self._save_probe(probe)
        if trainer.global_step == 0 and self._last_probe_step != 0:
            self._probe(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Probe on the step or batch cadence (once per optimizer step under gradient accumulation)."""
        self._epoch = trainer.current_epoch
        step, batches = trainer.global_step, _batches_done(trainer)
        if self.every_n_train_steps and step != self._last_attempt_step:
            last = self._last_attempt_step if self._last_attempt_step is not None else -1
            if step // self.every_n_train_steps > last // self.every_n_train_steps:
                self._probe(trainer, pl_module)
        elif (
            self.every_n_train_batches
            and batches % self.every_n_train_batches == 0
            and batches != self._last_probe_batch
            and step != self._last_probe_step
        ):
            self._probe(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Probe every ``every_n_epochs`` epochs."""
        if (
            self.every_n_epochs
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and trainer.global_step != self._last_probe_step
        ):
            self._probe(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Probe the final model (unless that step was just probed) and write what is still waiting."""
        if trainer.global_step != self._last_probe_step:
            self._probe(trainer, pl_module)
        self._close_writer()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Finish writing what was already probed."""
        self._close_writer()

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Stop the writer thread and free the probe, the engine and its caches."""
        self._close_writer()
        self._engine, self._batches, self._previous = None, [], None

    @override
    def state_dict(self) -> dict[str, Any]:
        """The cadence, the probe's identity and the settings, in plain types.

        Probes whose arrays are not on disk yet are written first, or named as missing.
        """
        if self._writer is not None:
            self._writer.flush_arrays()
        return {
            "last_probe_step": self._last_probe_step,
            "last_probe_batch": self._last_probe_batch,
            "probe_indices": self._probe_indices,
            "probe_hash": self._probe_hash,
            "settings": self._settings(),
            "analyses": [analysis.describe() for analysis in self.analyses],
            "array_dir": None if self._array_dir is None else str(self._array_dir),
            "missing_arrays": self._writer.missing_steps if self._writer is not None else [],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; keys missing from older checkpoints keep their defaults."""
        self._last_probe_step = self._last_attempt_step = state_dict.get("last_probe_step")
        self._last_probe_batch = state_dict.get("last_probe_batch")
        self._probe_indices = state_dict.get("probe_indices")
        self._probe_hash = state_dict.get("probe_hash")
        self._restored = True
        missing = state_dict.get("missing_arrays") or []
        if missing:
            self._warn(
                f"CKAMonitor: the checkpoint was saved while the arrays of steps {missing} were waiting for the disk; "
                "they were not written before the run stopped and are lost."
            )

    # ------------------------------------------------------------------------------------------------------- the probe

    def _settings(self) -> dict[str, Any]:
        """What the probe runs with, stored with every probe and in checkpoints (``lightning-cka analyze`` reads it)."""
        return {
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "reduction": self.reduction,
            "reference": None if self.reference is None else self.reference.settings(),
            "batch_size": self.batch_size,
            "probe_size": self.sampler.size,
            "probe_source": self._probe_source,
            "seed": self.seed,
            "name": self.name,
            "left_out": dict(self._left_out),
            "pool": self._pool,
            "train_examples": self._train_examples,
            "criteria": dict(self.criteria),
        }

    def _draw_probe(self, trainer: Any) -> Probe | None:
        indices = self._probe_indices if self._restored else None
        try:
            probe, self._probe_source = self.sampler.draw(trainer, self.extract_inputs, self.extract_labels, indices)
        except NoProbeSource as message:
            self._warn(str(message))
            return None
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        rank_zero_info(f"CKAMonitor{f' {self.name}' if self.name else ''}: the probe is {self._probe_source}.")
        for analysis in [a for a in self._engine.analyses if a.needs_labels] if probe.labels is None else []:
            message = (
                f"CKAMonitor: the {analysis.name} analysis needs class labels: use (image, label) batches, label_key= "
                "for dict batches, or probe_labels= next to a tensor probe_data"
            )
            if analysis.name in self._named:
                raise MisconfigurationException(f"{message}.")
            self._engine.disable(analysis.name)
            self._left_out[analysis.name] = "the probe has no class labels"
            rank_zero_info(f"{message}; it is left out.")
        digest = probe.hash
        if self._restored and self._probe_hash is not None and digest != self._probe_hash:
            self._warn(
                "CKAMonitor: the probe images differ from those before the checkpoint was saved; CKA over time is not "
                "comparable across the resume."
            )
        self._probe_indices, self._probe_hash = probe.indices, digest
        return probe

    def _probe_batches(self, trainer: Any, pl_module: Any, probe: Probe) -> list[ProbeBatch]:
        """This rank's share of the probe minibatches, on the model's device."""
        images = trainer.strategy.precision_plugin.convert_input(probe.images)
        slices = minibatch_slices(images.shape[0], self.batch_size)
        self._num_minibatches, self._num_examples = len(slices), images.shape[0]
        if len(slices) < MIN_JACKKNIFE:
            self._warn(
                f"CKAMonitor: the probe's {images.shape[0]} images make {len(slices)} minibatch(es) of batch_size="
                f"{self.batch_size}: the standard errors rest on the jackknife over minibatches and are unreliable "
                f"below {MIN_JACKKNIFE} (none with 1). Use batch_size <= {max(MIN_BATCH, images.shape[0] // 8)} "
                "(8 minibatches) or a larger probe_size."
            )
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
        if probe.images.numel() * 4 > PROBE_FILE_LIMIT:
            return
        path = self._array_dir / "probe.npz"
        try:
            save_probe(path, probe)
        except OSError as err:
            self._warn(f"CKAMonitor could not write the probe images to {path}: {err!r}")

    def _probe(self, trainer: Any, pl_module: Any) -> None:
        if self._engine is None:
            return
        start, step, error = time.perf_counter(), trainer.global_step, None
        self._last_attempt_step = step
        try:
            with trainer.strategy.precision_plugin.forward_context():
                self._engine.run(self._batches, self._num_minibatches, pl_module.device)
        except Exception as err:  # a monitor must not stop training; only the first probe reports misconfiguration
            error = err
        account = agree(trainer, error, self._engine.failures)  # every rank, failed or not: no rank waits forever
        if account.forward:
            message = f"CKAMonitor: the probe at step {step} failed ({account.forward})"
            if self._fit_probes == 0:
                raise RuntimeError(f"{message}; fix the configuration.") from error
            self._warn(f"{message}; training continues, the next probe runs as scheduled.")
            return
        skipped = self._leave_out(account.analyses, step)
        try:
            fields = self._engine.compute(skip=skipped)  # collective: the analyses sum states across ranks
        except Exception as err:
            self._warn(f"CKAMonitor: the probe at step {step} could not be reduced ({err!r}); training continues.")
            return
        failures = {name: describe_error(err) for name, err in self._engine.finalize_failures.items()}
        self._leave_out(failures, step, disable=False)
        self._last_probe_step, self._last_probe_batch = step, _batches_done(trainer)
        self._fit_probes += 1
        if trainer.is_global_zero:
            result = CKAResult(
                fields,
                analyses=self._engine.result_analyses(skip=skipped),
                step=step,
                epoch=self._epoch,
                num_examples=self._num_examples,
                run=self._view.run,
                probe_hash=self._probe_hash,
                probe_indices=self._probe_indices,
                settings=json.dumps(self._settings()),
            )
            self._write(result, time.perf_counter() - start)

    def _leave_out(self, failed: dict[str, str], step: int, disable: bool = True) -> list[str]:
        """Leave failed analyses out of this probe; at the fit's first probe, out of the fit (they cannot run here).

        Only failures every rank agreed on may disable an analysis: every rank must go on reducing the same ones.
        """
        for name, errors in failed.items():
            if self._fit_probes == 0 and disable:
                self._engine.disable(name)
                self._left_out[name] = errors
                self._warn(
                    f"CKAMonitor: the {name} analysis cannot run on this model ({errors}); it is left out of this fit "
                    "and the others go on. Leave it out of analyses=... to silence this."
                )
            else:
                self._warn(
                    f"CKAMonitor: the {name} analysis failed at step {step} ({errors}); it is left out of this probe "
                    "and the others are kept.",
                    key=(name, errors),
                )
        return list(failed)

    def _write(self, result: CKAResult, seconds: float) -> None:
        """Arrays first (before the probe counts in a checkpoint), then scalars and pictures; never raises."""
        events = self._events(result)
        try:
            if self._array_dir is not None:
                self._writer.save_arrays(result, self._array_dir / f"step_{result.step:07d}.npz")
            prefix = f"{self.name}/" if self.name else ""
            scalars = {"cka/probe_seconds": seconds, **result.scalars(self._view), **_event_counts(events)}
            finite = {prefix + tag: float(value) for tag, value in scalars.items() if math.isfinite(value)}
            self._writer.publish(result, self._previous, finite)
        except Exception as err:  # a bug in an analysis's figures or scalars must not stop training either
            self._warn(f"CKAMonitor: the results of step {result.step} could not be logged ({err!r}).")
        self._previous = result

    def _events(self, result: CKAResult) -> list[Event]:
        """The events of this probe, stored in its result (and so in its file) and told on the console."""
        keys = {key for analysis in result.analyses for key in analysis.event_fields} | {"layers", "reference_layers"}
        try:
            thin = {key: result.get(key) for key in keys if result.get(key) is not None}
            self._history.append(CKAResult(thin, analyses=result.analyses, step=result.step))
            events = [
                event
                for analysis in result.analyses
                for event in analysis.events(self._history, self._criteria)
                if event.step == result.step
            ]
        except Exception as err:  # an analysis's events must not stop training either
            self._warn(f"CKAMonitor: the events of step {result.step} could not be read ({err!r}).")
            return []
        if events:
            result.events = json.dumps([event.as_dict() for event in events])
            who = f"CKAMonitor{f' {self.name}' if self.name else ''}"
            rank_zero_info("\n".join(f"{who}, step {result.step}: {event.text}" for event in events))
        return events

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _warn(self, message: str, key: Any = None) -> None:
        """A warning on global rank 0, once per fit for each message (or each ``key``)."""
        key = message if key is None else key
        if key not in self._said:
            self._said.add(key)
            rank_zero_warn(message, category=UserWarning)


def _has_class_token(module: nn.Module, reference: Reference) -> bool:
    modules = named_modules(module)
    return all(token_layout(modules, name).has_class_token for name in find_layers(module, reference.layers))


def _batches_done(trainer: Any) -> int:
    """Training batches processed in this fit so far (restored by Lightning from a checkpoint)."""
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return int(progress.total.processed) if progress is not None else 0


def _run_label(trainer: Any) -> str:
    """``name/version_N`` of the trainer's first logger: which run a figure belongs to."""
    logger = trainer.logger
    name, version = getattr(logger, "name", None), getattr(logger, "version", None)
    version = f"version_{version}" if isinstance(version, int) else version
    return "/".join(str(part) for part in (name, version) if part not in (None, ""))


def _train_examples(trainer: Any) -> int:
    """Examples in the training set(s), when the dataloaders' datasets have a length (0: unknown)."""
    loader = trainer.train_dataloader
    loaders = getattr(loader, "flattened", None) or [loader]
    total = 0
    for one in loaders:
        try:
            total += len(one.dataset)
        except (AttributeError, TypeError):  # an iterable dataset, or no dataloader at all
            return 0
    return total


def _event_counts(events: list[Event]) -> dict[str, float]:
    """``events/<kind>``: how many events of each kind this probe noticed (a marker on the scalar plots)."""
    counts: dict[str, float] = {}
    for event in events:
        counts[f"events/{event.kind}"] = counts.get(f"events/{event.kind}", 0.0) + 1.0
    return counts

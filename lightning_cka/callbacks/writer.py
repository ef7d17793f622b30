"""What a probe leaves behind: its arrays first, on the training thread; pictures and scalars after, off it.

Arrays are the measurement: :meth:`ProbeWriter.save_arrays` writes them atomically before the probe counts as done
(a checkpoint never counts a probe whose arrays are not on disk), and when the disk refuses them (full, read-only) they
wait in memory and are written as soon as it takes them again. Pictures and scalars are views of the arrays: they are
rendered and logged by one background thread, and a logger that fails costs them, never the arrays or the fit.

TensorBoard gets the monitor's scalars, images and dashboard summaries in an event file of the monitor's own, in the
logger's directory (TensorBoard shows it as the same run). TensorBoard's event writer re-raises its first failed write
forever; writing through the logger's own writer would break the user's logging, and the fit with it, after one
failure. The monitor's event file is reopened after a failure. Other loggers get scalars through ``log_metrics`` and
images through ``log_image`` where they have it (W&B); MLflow's logger has none, so its images go through its client
(``logger.experiment.log_image(run_id, image, key=..., step=...)``), under the names of TensorBoard mapped to the
characters MLflow accepts (:func:`mlflow_key`).
"""

import contextlib
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cka.engine.analysis import View
from lightning_cka.figures.render import FrameCache
from lightning_cka.figures.spec import Figure
from lightning_cka.result import CKAResult

Warn = Callable[[str], None]
PENDING_BYTES = 256 * 2**20  # arrays kept in memory while the disk refuses them, at most


class OwnEventFile:
    """The monitor's TensorBoard event file in ``log_dir``, opened on first use and again after a failure."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._writer: Any = None
        self._opened = 0

    def write(self, write: Callable[[Any], None]) -> None:
        """Run ``write(summary_writer)`` and flush; on any error, drop the file (a later call opens a new one)."""
        from torch.utils.tensorboard import SummaryWriter

        try:
            if self._writer is None:
                self._opened += 1
                self._writer = SummaryWriter(log_dir=self.log_dir, filename_suffix=f".lightning_cka.{self._opened}")
            write(self._writer)
            self._writer.flush()
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (its last error, if any, is dropped with it)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # its writer thread died on a write: nothing more to save from it
                writer.close()


class ProbeWriter:
    """Writes each probe's arrays (at once), then its scalars, images and dashboard summaries (on a worker thread).

    The worker thread writes in submission order, to every logger.

    Args:
        view: how figures are labelled.
        loggers: the trainer's loggers.
        tag_prefix: the monitor's name followed by ``/``, or ``""``.
        log_images: also draw the figures and send them (and the dashboard's data) to the loggers.
        warn: how failures are reported (once per kind of failure; never raised).
    """

    def __init__(self, view: View, loggers: list[Any], tag_prefix: str, log_images: bool, warn: Warn) -> None:
        self.view = view
        self.tag_prefix = tag_prefix
        self.log_images = log_images
        self.render_seconds: list[float] = []
        self._warn = warn
        self._event_files = [OwnEventFile(str(logger.log_dir)) for logger in loggers if _is_tensorboard(logger)]
        self._others = [logger for logger in loggers if not _is_tensorboard(logger)]
        self._pending: list[tuple[CKAResult, Path]] = []
        self._frames = FrameCache()
        self._mlflow_folders: set[str] = set()  # names that hold other names in MLflow (see _mlflow_names)
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []
        if log_images:
            blind = [type(logger).__name__ for logger in self._others if _image_sink(logger) is None]
            if blind:
                warn(f"CKAMonitor: {', '.join(blind)} cannot take images; its scalars are logged, its images skipped.")

    # ----------------------------------------------------------------------------------------------------- arrays

    def save_arrays(self, result: CKAResult, path: Path) -> bool:
        """Write the arrays of ``result`` (and of earlier probes still waiting) now; ``True`` when they are on disk.

        A refused write keeps them in memory (up to 256 MiB, oldest dropped first, with a warning) for the next call.
        """
        self._pending.append((result, path))
        self.flush_arrays()
        return not any(waiting is result for waiting, _ in self._pending)

    def flush_arrays(self) -> None:
        """Try to write every probe whose arrays are waiting, in order; keep those the disk refuses."""
        waiting = []
        for result, path in self._pending:
            try:
                result.save(path)
            except Exception as err:
                self._warn(
                    f"CKAMonitor could not write the arrays of step {result.step} to {path} ({err!r}); they are kept "
                    "in memory and written as soon as the disk takes them."
                )
                waiting.append((result, path))
        self._pending = waiting
        self._bound_pending()

    @property
    def missing_steps(self) -> list[int]:
        """The probes measured whose arrays are not on disk yet."""
        return [result.step for result, _ in self._pending]

    def _bound_pending(self) -> None:
        sizes = [_nbytes(result) for result, _ in self._pending]
        while len(self._pending) > 1 and sum(sizes) > PENDING_BYTES:
            dropped, _ = self._pending.pop(0)
            sizes.pop(0)
            self._warn(
                f"CKAMonitor: the disk has refused probe arrays for more than {PENDING_BYTES >> 20} MiB of them; the "
                f"arrays of step {dropped.step} (the oldest) are lost."
            )

    # ------------------------------------------------------------------------------------------ scalars, pictures

    def publish(self, result: CKAResult, previous: CKAResult | None, scalars: dict[str, float]) -> None:
        """Log ``scalars`` and (with ``log_images``) the figures of ``result``.

        Loggers other than TensorBoard get their scalars now; everything else is written on the worker thread.
        """
        self.report()
        step = result.step
        for logger in self._others:
            try:
                logger.log_metrics(self._mlflow_names(scalars) if _is_mlflow(logger) else scalars, step=step)
            except Exception as err:
                self._warn(f"CKAMonitor could not log scalars to {type(logger).__name__} ({err!r}).")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-cka-writer")
        self._jobs.append(self._executor.submit(self._publish, result, previous, scalars))

    def _mlflow_names(self, scalars: dict[str, float]) -> dict[str, float]:
        """The scalars under names MLflow takes: :func:`mlflow_key`, and ``/all`` after a name that is also a folder.

        MLflow's file store keeps each metric in a file called by its name, so ``attention/local_fraction`` cannot
        sit next to ``attention/local_fraction/blocks.0.attn`` (a folder of that name): a name that is the folder of
        another name logged in this fit gets ``/all`` (``attention/local_fraction/all``), in every MLflow store alike.
        """
        names = {tag: mlflow_key(tag) for tag in scalars}
        for name in names.values():
            parts = name.split("/")
            self._mlflow_folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return {f"{name}/all" if name in self._mlflow_folders else name: scalars[tag] for tag, name in names.items()}

    def _publish(self, result: CKAResult, previous: CKAResult | None, scalars: dict[str, float]) -> list[str]:
        start, failures, step = time.perf_counter(), [], result.step
        figures = []
        if self.log_images:
            try:
                figures = result.figures(previous, self.view)
            except Exception as err:
                failures.append(f"could not draw the figures of step {step} ({err!r})")
        images = []
        for figure in figures if self._event_files or self._others else []:
            try:
                images.append((figure, self._frames.render(figure)))
            except Exception as err:
                failures.append(f"could not draw {figure.tag} of step {step} ({err!r})")
        events = _events_text(result)
        for event_file in self._event_files:
            try:
                event_file.write(lambda writer: self._tensorboard(writer, scalars, images, figures, step, events))
            except Exception as err:
                failures.append(f"could not write to TensorBoard in {event_file.log_dir} ({err!r}); later probes retry")
        for logger in self._others:
            sink = _image_sink(logger)
            if sink is None:
                continue
            for figure, image in images:
                try:
                    sink(self.tag_prefix + figure.tag, image, step)
                except Exception as err:
                    failures.append(f"could not log images to {type(logger).__name__} ({err!r})")
                    break
        self.render_seconds.append(time.perf_counter() - start)
        return failures

    def _tensorboard(
        self,
        writer: Any,
        scalars: dict[str, float],
        images: list[tuple[Figure, np.ndarray]],
        figures: list[Figure],
        step: int,
        events: str = "",
    ) -> None:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
        if events:
            writer.add_text(f"{self.tag_prefix}events", events, global_step=step)
        for figure, image in images:
            writer.add_image(self.tag_prefix + figure.tag, image, global_step=step, dataformats="HWC")
        if figures:
            from lightning_cka.dashboard.summaries import write_figures

            write_figures(writer, figures, step, prefix=self.tag_prefix)

    def report(self) -> None:
        """Warn about finished jobs that failed (once per kind of failure); keep the unfinished ones."""
        running = []
        for job in self._jobs:
            if not job.done():
                running.append(job)
                continue
            messages = [repr(job.exception())] if job.exception() is not None else job.result()
            for message in messages:
                self._warn(f"CKAMonitor {message}.")
        self._jobs = running

    def close(self) -> None:
        """Write waiting arrays, wait for every job, close the event files; warn about arrays that stay unwritten."""
        self.flush_arrays()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.report()
        for event_file in self._event_files:
            event_file.close()
        if self._pending:
            self._warn(
                f"CKAMonitor: the arrays of steps {self.missing_steps} could not be written before the end of the fit "
                "and are lost."
            )
            self._pending = []


def _is_tensorboard(logger: Any) -> bool:
    """Lightning's ``TensorBoardLogger`` (either namespace): a logger with a log directory of TensorBoard files."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__) and bool(
        getattr(logger, "log_dir", None)
    )


def _is_mlflow(logger: Any) -> bool:
    """Lightning's ``MLFlowLogger`` (either namespace)."""
    return any(cls.__name__ == "MLFlowLogger" for cls in type(logger).__mro__)


def _image_sink(logger: Any) -> Callable[[str, np.ndarray, int], None] | None:
    """How ``logger`` takes an ``(H, W, 3)`` uint8 image under a tag at a step, or ``None`` when it takes none."""
    if _is_mlflow(logger):
        # MLFlowLogger has no log_image: its client (logger.experiment) writes images/<key>+step+<step>+... artifacts.
        return lambda tag, image, step: logger.experiment.log_image(
            logger.run_id, image, key=mlflow_key(tag), step=step
        )
    if callable(getattr(logger, "log_image", None)):  # WandbLogger: one image per call, stored as a wandb.Image
        return lambda tag, image, step: logger.log_image(key=tag, images=[image], step=step)
    return None


_MLFLOW_REFUSED = re.compile(r"[^A-Za-z0-9_\-./ ]")


def mlflow_key(tag: str) -> str:
    """``tag`` as MLflow takes it for a metric or an image: the same name wherever MLflow allows it.

    MLflow refuses names with other characters than letters, digits, ``_ - . /`` and spaces (image keys; metric names
    also refuse ``:`` on Windows), names that are not a normalized relative path (``//``, a leading or trailing ``/``,
    ``.`` or ``..`` segments) and names over 250 characters; Lightning's ``MLFlowLogger`` drops refused characters
    with a warning, or raises. Each refused character becomes ``_``, repeated ``/`` one, and ``.`` / ``..`` segments
    ``_``; a name longer than 250 characters is cut. Every tag of the built-in analyses (``cka/intra``,
    ``attention/mean_distance/blocks.0``, ``residual/patch_ratio/layers.1.blocks.0``, ...) is kept as it is.

    Example:
        >>> mlflow_key("cka/reference_diag/model.layer1.0")
        'cka/reference_diag/model.layer1.0'
        >>> mlflow_key("probe:early//attention (mean)/")
        'probe_early/attention _mean_'
    """
    key = re.sub(r"/+", "/", _MLFLOW_REFUSED.sub("_", tag)).strip("/")
    key = "/".join("_" if part in (".", "..") else part for part in key.split("/"))
    return key[:250] or "_"


def _nbytes(result: CKAResult) -> int:
    return sum(value.nbytes for key in result if isinstance(value := result.get(key), np.ndarray))


def _events_text(result: CKAResult) -> str:
    """The probe's events as Markdown lines for TensorBoard's text tab (``""`` without any)."""
    if not result.get("events"):
        return ""
    return "\n".join(f"- **{e['kind']}** ({e['analysis']}): {e['text']}" for e in json.loads(result.events))

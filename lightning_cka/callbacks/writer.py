"""What a probe leaves behind, written off the training thread: ``.npz`` arrays, images and dashboard summaries.

Rendering a matplotlib figure takes a tenth of a second or more, so figures and files are produced by one background
thread on global rank 0; the training thread only hands over a finished :class:`CKAResult`. Arrays, images and
summaries fail independently: a full disk costs the arrays, not the pictures, and every warning names what failed.
"""

import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cka.engine.analysis import View
from lightning_cka.figures.render import FrameCache
from lightning_cka.result import CKAResult

ImageSink = Callable[[str, np.ndarray, int], None]


def image_sinks(loggers: list[Any]) -> tuple[list[ImageSink], list[Any], list[str]]:
    """Image writers for the loggers that take images, TensorBoard writers for the dashboard, and the rest's names."""
    sinks: list[ImageSink] = []
    tensorboards: list[Any] = []
    skipped = []
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
            sinks.append(_tensorboard_sink(experiment))
            tensorboards.append(experiment)
        elif callable(getattr(logger, "log_image", None)):  # W&B and other loggers with an image API
            sinks.append(lambda tag, image, step, logger=logger: logger.log_image(key=tag, images=[image], step=step))
        else:
            skipped.append(type(logger).__name__)
    return sinks, tensorboards, skipped


def _tensorboard_sink(writer: Any) -> ImageSink:
    def write(tag: str, image: np.ndarray, step: int) -> None:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")
        writer.flush()

    return write


class ProbeWriter:
    """Writes each probe's arrays, images and dashboard summaries, in submission order, on one worker thread.

    Failures are collected and re-raised as warnings on the training thread (:meth:`report`), never raised there.

    Args:
        view: how figures are labelled.
        image_sinks: where images go (see :func:`image_sinks`).
        summary_writers: TensorBoard ``SummaryWriter`` s that receive the dashboard's tensor summaries.
        tag_prefix: the monitor's name followed by ``/``, or ``""``.
    """

    def __init__(self, view: View, image_sinks: list[ImageSink], summary_writers: list[Any], tag_prefix: str) -> None:
        self.view = view
        self.image_sinks = image_sinks
        self.summary_writers = summary_writers
        self.tag_prefix = tag_prefix
        self.render_seconds: list[float] = []
        self._frames = FrameCache()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def submit(self, result: CKAResult, previous: CKAResult | None, array_path: Path | None) -> None:
        """Write one probe (its arrays to ``array_path`` when given) on the worker thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-cka-writer")
        self.report()
        self._pending.append(self._executor.submit(self._write, result, previous, array_path))

    def _write(self, result: CKAResult, previous: CKAResult | None, array_path: Path | None) -> tuple[float, list]:
        start = time.perf_counter()
        failures = []
        if array_path is not None:
            try:
                result.save(array_path)
            except Exception as err:
                failures.append(f"the arrays of step {result.step} to {array_path}: {err!r}")
        if self.image_sinks or self.summary_writers:
            try:
                figures = result.figures(previous, self.view)
            except Exception as err:
                figures = []
                failures.append(f"the figures of step {result.step}: {err!r}")
            for figure in figures:
                if self.image_sinks:
                    try:
                        image = self._frames.render(figure)
                        for sink in self.image_sinks:
                            sink(self.tag_prefix + figure.tag, image, result.step)
                    except Exception as err:
                        failures.append(f"the image {self.tag_prefix + figure.tag} of step {result.step}: {err!r}")
            if self.summary_writers and figures:
                try:
                    from lightning_cka.dashboard.summaries import write_figures

                    for writer in self.summary_writers:
                        write_figures(writer, figures, result.step, prefix=self.tag_prefix)
                except Exception as err:
                    failures.append(f"the dashboard data of step {result.step}: {err!r}")
        return time.perf_counter() - start, failures

    def report(self) -> None:
        """Warn about finished jobs that failed; keep the unfinished ones."""
        still_running = []
        for future in self._pending:
            if not future.done():
                still_running.append(future)
                continue
            if future.exception() is not None:
                messages = [repr(future.exception())]
            else:
                seconds, messages = future.result()
                self.render_seconds.append(seconds)
            for message in messages:
                warnings.warn(f"CKAMonitor could not write {message}", stacklevel=2)
        self._pending = still_running

    def close(self) -> None:
        """Wait for every submitted job, then stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.report()

"""What a probe turns into: scalars for every logger, figures for loggers that take images, and ``.npz`` arrays.

Rendering a matplotlib figure takes a tenth of a second or more, so figures and files are produced by one background
thread on global rank 0; the training thread only hands over small NumPy arrays.
"""

import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cka.callbacks.renderer import ProbeRenderer
from lightning_cka.result import CKAResult
from lightning_cka.stats import adjacent_mean, best_matches, offdiag_mean

ImageSink = Callable[[str, np.ndarray, int], None]


def probe_scalars(result: CKAResult, local_threshold_px: float) -> dict[str, float]:
    """Headline numbers of one probe, keyed by tag (without the monitor's name prefix).

    Args:
        result: the probe.
        local_threshold_px: heads with a mean distance below this many pixels count as local.
    """
    scalars: dict[str, float] = {}
    intra = result.intra
    if len(result.layers) > 1:
        scalars["cka/adjacent_mean"] = adjacent_mean(intra)
        scalars["cka/offdiag_mean"] = offdiag_mean(intra)
    if result.previous.size:
        for name, value in zip(result.layers, np.diagonal(result.previous), strict=True):
            scalars[f"cka_vs_previous/{name}"] = float(value)
    if result.reference.size:
        for name, best, value in zip(result.layers, *best_matches(result.reference), strict=True):
            scalars[f"cka_reference/best_value/{name}"] = float(value)
            scalars[f"cka_reference/best_layer/{name}"] = float(best)
    for name, heads in zip(result.attention_layers, result.mean_attention_distance, strict=True):
        heads = heads[np.isfinite(heads)]
        scalars[f"attention/mean_distance/{name}"] = float(heads.mean())
        scalars[f"attention/min_distance/{name}"] = float(heads.min())
        scalars[f"attention/local_fraction/{name}"] = float((heads < local_threshold_px).mean())
    return scalars


def image_sinks(loggers: list[Any]) -> tuple[list[ImageSink], list[str]]:
    """A writer function for each logger that can take images, and the class names of those that cannot."""
    sinks: list[ImageSink] = []
    skipped = []
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
            sinks.append(_tensorboard_sink(experiment))
        elif callable(getattr(logger, "log_image", None)):  # W&B and other loggers with an image API
            sinks.append(lambda tag, image, step, logger=logger: logger.log_image(key=tag, images=[image], step=step))
        else:
            skipped.append(type(logger).__name__)
    return sinks, skipped


def _tensorboard_sink(writer: Any) -> ImageSink:
    def write(tag: str, image: np.ndarray, step: int) -> None:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")
        writer.flush()

    return write


class BackgroundWriter:
    """One worker thread that renders figures and writes images and ``.npz`` files in submission order.

    Failures are collected and re-raised as warnings on the training thread (:meth:`report`), never raised there.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self.render_seconds: list[float] = []

    def submit(self, fn: Callable[..., float], *args: Any) -> None:
        """Run ``fn(*args)`` on the worker; ``fn`` returns the seconds it spent."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-cka-writer")
        self.report()
        self._pending.append(self._executor.submit(fn, *args))

    def report(self) -> None:
        """Warn about finished jobs that failed; keep the unfinished ones."""
        still_running = []
        for future in self._pending:
            if not future.done():
                still_running.append(future)
            elif future.exception() is not None:
                err = future.exception()
                warnings.warn(f"CKAMonitor could not write a probe's images or arrays: {err!r}", stacklevel=2)
            else:
                self.render_seconds.append(future.result())
        self._pending = still_running

    def close(self) -> None:
        """Wait for every submitted job, then stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.report()


def write_probe(
    result: CKAResult,
    previous: CKAResult | None,
    renderer: ProbeRenderer,
    sinks: list[ImageSink],
    tag_prefix: str,
    array_path: Path | None,
) -> float:
    """Render and write one probe (runs on the writer thread); returns the seconds spent."""
    start = time.perf_counter()
    if array_path is not None:
        result.save(array_path)
    if sinks:
        for tag, image in renderer.render(result, previous).items():
            for sink in sinks:
                sink(tag_prefix + tag, image, result.step)
    return time.perf_counter() - start

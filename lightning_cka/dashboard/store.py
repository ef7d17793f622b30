"""The plugin's reads, through TensorBoard's data provider only, with a small cache.

``read_tensors`` has no step filter: it returns a whole time series. With the fast (Rust) loader that is a gRPC copy of
every step's JSON, so a series is read once and kept until ``list_tensors`` reports a newer step or wall time.
"""

import bisect
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorboard.data import provider

from lightning_cka.dashboard.summaries import METADATA_VERSION, PLUGIN_NAME, figure_tag, summary_tag

# read_tensors wants an explicit cap; the loader has already applied the reservoir sampling the user asked for.
_ALL_SAMPLES = 1 << 40


@dataclass(frozen=True)
class FigureTag:
    """One figure time series of a run, as ``list_tensors`` describes it."""

    tag: str
    title: str
    caption: str
    max_step: int
    max_wall_time: float
    summary_tag: str


@dataclass(frozen=True)
class Sample:
    """One step of a figure time series: the raw JSON bytes, or ``None`` when the tensor is not a string scalar."""

    step: int
    wall_time: float
    payload: bytes | None


class Samples:
    """The steps of one (run, tag), in step order; a step logged twice keeps its last value."""

    def __init__(self, samples: list[Sample]) -> None:
        by_step = {s.step: s for s in samples}
        self.samples = [by_step[step] for step in sorted(by_step)]
        self.steps = [s.step for s in self.samples]
        self.nbytes = sum(len(s.payload or b"") for s in self.samples) + 64 * len(self.samples)

    def at(self, step: int | None) -> Sample | None:
        """The sample at ``step`` (the last one for ``None``), or ``None`` when that step is not kept."""
        if not self.samples:
            return None
        if step is None:
            return self.samples[-1]
        i = bisect.bisect_left(self.steps, step)
        return self.samples[i] if i < len(self.steps) and self.steps[i] == step else None


class BytesLRU:
    """A least-recently-used map bounded by the total size its values report; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Hashable, Any, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: Hashable, version: Hashable, make: Callable[[], tuple[Any, int]]) -> Any:
        """The value cached for ``key`` at ``version``, else ``make()``'s ``(value, nbytes)``, cached."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] == version:
                self._items.move_to_end(key)
                return hit[1]
        value, nbytes = make()  # outside the lock: a slow read must not block other requests
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[2]
            if nbytes <= self.max_bytes:
                self._items[key] = (version, value, nbytes)
                self._size += nbytes
            while self._size > self.max_bytes:
                _, (_, _, size) = self._items.popitem(last=False)
                self._size -= size
        return value


class FigureStore:
    """Lists and reads the ``lightning_cka`` tensor summaries of an experiment.

    Args:
        data_provider: the ``TBContext.data_provider``.
        max_bytes: memory for cached series (raw JSON) and for cached history stacks, each.
    """

    def __init__(self, data_provider: provider.DataProvider, max_bytes: int = 256 << 20) -> None:
        self._provider = data_provider
        self._series = BytesLRU(max_bytes)
        self.derived = BytesLRU(max_bytes)  # for values computed from a series, e.g. history stacks

    def list(
        self, ctx: Any, experiment_id: str, run: str | None = None, tag: str | None = None
    ) -> tuple[dict[str, dict[str, FigureTag]], list[dict[str, str]]]:
        """The figure tags of each run, and the tags skipped because a newer version of the package wrote them.

        Args:
            ctx: the request's ``RequestContext``.
            experiment_id: from ``plugin_util.experiment_id``.
            run: only this run, when given.
            tag: only this tag, when given.
        """
        tags = None if tag is None else [summary_tag(tag), tag]
        run_tag_filter = provider.RunTagFilter(runs=None if run is None else [run], tags=tags)
        listing = self._provider.list_tensors(
            ctx, experiment_id=experiment_id, plugin_name=PLUGIN_NAME, run_tag_filter=run_tag_filter
        )
        runs: dict[str, dict[str, FigureTag]] = {}
        skipped = []
        for run_name, tags in (listing or {}).items():
            # a figure under both tags (an old run exported again) is read from its current one, listed last
            for tag_name, series in sorted(tags.items(), key=lambda item: item[0] != figure_tag(item[0])):
                version = _metadata_version(series.plugin_content)
                if version is None or version > METADATA_VERSION:
                    reason = f"metadata version {version}" if version else "unreadable metadata"
                    skipped.append({"run": run_name, "tag": tag_name, "reason": reason})
                    continue
                runs.setdefault(run_name, {})[figure_tag(tag_name)] = FigureTag(
                    tag=figure_tag(tag_name),
                    title=series.display_name or "",
                    caption=series.description or "",
                    max_step=int(series.max_step),
                    max_wall_time=float(series.max_wall_time),
                    summary_tag=tag_name,
                )
        return runs, skipped

    def series(self, ctx: Any, experiment_id: str, run: str, tag: str) -> tuple[Samples, FigureTag] | None:
        """Every kept step of one (run, tag), or ``None`` when the run has no such figure."""
        info = self.list(ctx, experiment_id, run, tag)[0].get(run, {}).get(tag)
        if info is None:
            return None

        def read() -> tuple[Samples, int]:
            data = self._provider.read_tensors(
                ctx,
                experiment_id=experiment_id,
                plugin_name=PLUGIN_NAME,
                downsample=_ALL_SAMPLES,
                run_tag_filter=provider.RunTagFilter(runs=[run], tags=[info.summary_tag]),
            )
            datums = (data or {}).get(run, {}).get(info.summary_tag, [])
            samples = Samples([Sample(int(d.step), float(d.wall_time), _string_scalar(d.numpy)) for d in datums])
            return samples, samples.nbytes

        version = (info.max_step, info.max_wall_time)
        return self._series.get_or_make((experiment_id, run, tag), version, read), info


def parse_figure(payload: bytes | None) -> dict[str, Any]:
    """A sample's figure JSON as a dict, checked to be a whole figure the frontend can draw.

    Strict JSON (no ``NaN`` or ``Infinity`` literals: the figure route hands the payload to the browser as it is), and
    every panel of a known kind whose arrays are numbers (or null) of the shapes its names say.

    Raises:
        ValueError: when the payload is not the JSON of a figure (not a string tensor, bad JSON, a panel that is not
            one), naming what is wrong.
    """
    if payload is None:
        raise ValueError("the tensor is not a scalar string")
    try:
        figure = json.loads(payload, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the tensor is not valid JSON ({e})") from e
    if not isinstance(figure, dict) or not isinstance(figure.get("panels"), list):
        raise ValueError("the JSON is not a figure (no list of panels)")
    for i, panel in enumerate(figure["panels"]):
        try:
            _check_panel(panel)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"panel {i} is not a figure panel: {e}") from None
    return figure


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (the figure writer writes null)")


def _check_panel(panel: Any) -> None:
    """Raise unless ``panel`` is a panel of a known kind with arrays of the shapes its names give."""
    kind = panel.get("kind") if isinstance(panel, dict) else None
    if kind == "heatmap":
        rows, cols = _names(panel, "rows"), _names(panel, "cols")
        for name in ("values", "error", "null", "marked"):
            if name == "values" or panel.get(name) is not None:
                _numbers(panel[name], name, (len(rows), len(cols)))
    elif kind in ("dots", "curves", "scatter"):
        size = len(_names(panel, "x")) if kind != "scatter" else None
        series = panel.get("series")
        if not isinstance(series, list):
            raise ValueError("its series are not a list")
        for s in series:
            values = _numbers(s["values"], "series values")
            if kind == "curves" and values.shape != (size,):
                raise ValueError(f"curve values of shape {values.shape} for {size} x positions")
            if kind == "dots" and (values.ndim not in (1, 2) or values.shape[0] != size):
                raise ValueError(f"dot values of shape {values.shape} for {size} x positions")
            if kind == "scatter" and (values.ndim != 2 or values.shape[1] != 2):
                raise ValueError(f"scatter points of shape {values.shape}, not (N, 2)")
            if s.get("error") is not None:
                _numbers(s["error"], "series error", values.shape)
    else:
        raise ValueError(f"unknown kind {kind!r}")


def _names(panel: dict[str, Any], key: str) -> list[str]:
    names = panel.get(key)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"its {key} are not a list of names")
    return names


def _numbers(values: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    try:
        array = np.asarray(_null_to_nan(values), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"its {name} are not a rectangular array of numbers") from None
    if shape is not None and array.shape != shape:
        raise ValueError(f"its {name} have shape {array.shape}, not {shape}")
    return array


def _null_to_nan(values: Any) -> Any:
    if isinstance(values, list):
        return [_null_to_nan(v) for v in values]
    if isinstance(values, bool | int | float) or values is None:
        return math.nan if values is None else values
    raise TypeError(f"{type(values).__name__} where a number belongs")


def _metadata_version(content: bytes) -> int | None:
    try:
        version = json.loads(content or b"{}").get("version")
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) else None


def _string_scalar(array: Any) -> bytes | None:
    if getattr(array, "shape", None) != ():
        return None
    value = array.item()
    if isinstance(value, str):
        return value.encode()
    return value if isinstance(value, bytes) else None

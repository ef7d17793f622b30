"""The TensorBoard plugin behind the "CKA" tab.

Routes (under ``data/plugin/lightning_cka/``; every data route answers JSON, errors as ``{"error": "..."}``):

- ``index.js``: the frontend, one ES module.
- ``runs``: the runs holding figures, with their tags, titles, captions and last steps.
- ``steps?run=R&tag=T``: the kept steps of one figure time series.
- ``figure?run=R&tag=T&step=S``: the figure JSON at step ``S`` (the last step without ``step``).
- ``history?run=R&tag=T&panel=P&row=I&col=J``: one heatmap cell over every kept step; ``x=I`` names a layer of a
  dots or curves panel, ``series=I&point=J`` a scatter point.
"""

import functools
import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from tensorboard.util import tb_logging
from werkzeug import wrappers

from lightning_cka.dashboard import history
from lightning_cka.dashboard.store import FigureStore, parse_figure
from lightning_cka.dashboard.summaries import PLUGIN_NAME

logger = tb_logging.get_logger()

Handler = Callable[[wrappers.Request], wrappers.Response]


class _Error(Exception):
    """A request the plugin answers with an HTTP error code and a one-line JSON reason."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _json_route(method: Callable[..., Any]) -> Handler:
    """A WSGI app from a method returning JSON-ready data (or bytes of JSON); every failure becomes a JSON error."""

    @wrappers.Request.application
    @functools.wraps(method)
    def app(self: "CKADashboardPlugin", request: wrappers.Request) -> wrappers.Response:
        try:
            body = method(self, request)
        except _Error as e:
            return _respond(request, {"error": str(e)}, e.code)
        except Exception as e:  # a plugin must never take TensorBoard down; say what failed instead
            logger.exception("lightning_cka: %s failed", request.path)
            return _respond(request, {"error": f"{type(e).__name__}: {e}"}, 500)
        return _respond(request, body, 200)

    return app


def _respond(request: wrappers.Request, body: Any, code: int) -> wrappers.Response:
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=False)
    return http_util.Respond(request, content, "application/json", code=code)


class CKADashboardPlugin(base_plugin.TBPlugin):
    """Serves the "CKA" tab: the monitor's figures, step by step, from any TensorBoard data provider.

    Args:
        context: TensorBoard's ``TBContext``; only ``data_provider`` and ``sampling_hints`` are used.
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._store = FigureStore(context.data_provider) if context.data_provider is not None else None
        # None: the user did not pass --samples_per_plugin lightning_cka=..., so TensorBoard keeps a sample.
        self._samples_hint = (context.sampling_hints or {}).get(PLUGIN_NAME)

    def get_plugin_apps(self) -> dict[str, Handler]:
        """The plugin's routes."""
        return {
            "/index.js": self._serve_js,
            "/runs": self._serve_runs,
            "/steps": self._serve_steps,
            "/figure": self._serve_figure,
            "/history": self._serve_history,
        }

    def is_active(self) -> bool:
        """``False``: TensorBoard activates the tab itself when a run has data of :meth:`data_plugin_names`."""
        return False

    def data_plugin_names(self) -> tuple[str, ...]:
        """The summaries this plugin reads: its own."""
        return (PLUGIN_NAME,)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        """An iframed ES module frontend in a tab named "CKA"."""
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="CKA")

    @wrappers.Request.application
    def _serve_js(self, request: wrappers.Request) -> wrappers.Response:
        script = resources.files("lightning_cka.dashboard").joinpath("static", "index.js").read_bytes()
        return http_util.Respond(request, script, "text/javascript")

    @_json_route
    def _serve_runs(self, request: wrappers.Request) -> dict[str, Any]:
        ctx, experiment = self._request_context(request)
        runs, skipped = self._require_store().list(ctx, experiment)
        return {
            "runs": [
                {
                    "run": run,
                    "tags": [
                        {"tag": t.tag, "title": t.title, "caption": t.caption, "max_step": t.max_step}
                        for t in sorted(tags.values(), key=lambda t: t.tag)
                    ],
                }
                for run, tags in sorted(runs.items())
            ],
            "skipped": skipped,
            "samples_per_plugin": self._samples_hint,
        }

    @_json_route
    def _serve_steps(self, request: wrappers.Request) -> dict[str, Any]:
        run, tag = _run_tag(request)
        samples, _ = self._series(request, run, tag)
        return {"run": run, "tag": tag, "steps": samples.steps, "wall_times": [s.wall_time for s in samples.samples]}

    @_json_route
    def _serve_figure(self, request: wrappers.Request) -> bytes:
        run, tag = _run_tag(request)
        step = _int_arg(request, "step")
        samples, _ = self._series(request, run, tag)
        sample = samples.at(step)
        if sample is None:
            raise _Error(404, f"step {step} of {tag!r} in run {run!r} is not kept ({len(samples.steps)} steps are)")
        try:
            parse_figure(sample.payload)  # never hand the frontend a half-figure
        except ValueError as e:
            raise _Error(422, f"step {sample.step} of {tag!r} in run {run!r}: {e}") from None
        head = json.dumps({"run": run, "tag": tag, "step": sample.step, "wall_time": sample.wall_time})
        # The stored JSON goes out as it is: no decoding and re-encoding of large heatmaps per request.
        return head[:-1].encode() + b',"figure":' + sample.payload + b"}"  # type: ignore[operator]

    @_json_route
    def _serve_history(self, request: wrappers.Request) -> dict[str, Any]:
        run, tag = _run_tag(request)
        panel = _int_arg(request, "panel") or 0
        samples, info = self._series(request, run, tag)
        _, experiment = self._request_context(request)
        key = ("stack", experiment, run, tag)
        stacks = self._require_store().derived.get_or_make(
            key, (info.max_step, info.max_wall_time), lambda: _with_size(history.stack(samples))
        )
        try:
            out = history.history(stacks, panel, dict(request.args))
        except history.HistoryError as e:
            raise _Error(400, str(e)) from None
        return {"run": run, "tag": tag, "panel": panel, **out}

    def _series(self, request: wrappers.Request, run: str, tag: str) -> Any:
        ctx, experiment = self._request_context(request)
        found = self._require_store().series(ctx, experiment, run, tag)
        if found is None:
            raise _Error(404, f"run {run!r} has no figure {tag!r}")
        return found

    def _require_store(self) -> FigureStore:
        if self._store is None:
            raise _Error(503, "TensorBoard gave the plugin no data provider")
        return self._store

    @staticmethod
    def _request_context(request: wrappers.Request) -> tuple[Any, str]:
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)


def _run_tag(request: wrappers.Request) -> tuple[str, str]:
    run, tag = request.args.get("run"), request.args.get("tag")
    if run is None or tag is None:
        raise _Error(400, "`run` and `tag` are required")
    return run, tag


def _int_arg(request: wrappers.Request, name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise _Error(400, f"`{name}` must be an integer; got {raw!r}") from None


def _with_size(stacks: history.FigureStack) -> tuple[history.FigureStack, int]:
    return stacks, stacks.nbytes

"""A real ``tensorboard`` server and headless Chromium driven over the DevTools protocol, for the dashboard's browser
test and for docs/make_dashboard_images.py.

Chromium is driven through ``--remote-debugging-pipe``: DevTools messages are NUL-terminated JSON on file
descriptors 3 (to the browser) and 4 (from it), so no driver binary, no websocket library and no network port are
needed, and a driver can never mismatch the browser's version.
"""

import base64
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# A closed network: everything Chromium would fetch by itself is switched off, or it floods the network with retries.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM``, else the first of :data:`CHROMIUM_NAMES` on ``PATH``."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard(logdir: Path, *flags: str, runs: int = 1, timeout: float = 60.0) -> Iterator[str]:
    """A ``tensorboard`` server on a free localhost port, once its CKA tab lists ``runs`` runs; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open for as long as the server runs, closed below)
    server = subprocess.Popen([*command, "--port", str(port), *flags], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tensorboard exited with {server.returncode}:\n{log.read().decode()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "data/plugin/lightning_cka/runs", timeout=2) as response:
                    if len(json.load(response)["runs"]) >= runs:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensorboard did not list {runs} runs within {timeout} s")
            time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


class DevToolsError(RuntimeError):
    """Chromium answered a DevTools command with an error, or a script threw."""


class Browser:
    """Headless Chromium with one page, driven over the DevTools pipe.

    Args:
        binary: the Chromium executable.
        width: viewport width in CSS px.
        height: viewport height in CSS px.
        scale: device pixels per CSS px (screenshots come out ``scale`` times larger).
    """

    def __init__(self, binary: str, width: int = 1400, height: int = 1000, scale: float = 1.0) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="lightning-cka-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def at_fds_3_and_4() -> None:  # in the child, before exec: where --remote-debugging-pipe looks
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe"]
        self._process = subprocess.Popen(
            [*command, f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=at_fds_3_and_4,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=scale, mobile=False)  # fmt: skip

    def call(self, method: str, session: bool = False, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and wait for its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise DevToolsError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def goto(self, url: str, timeout: float = 30.0) -> None:
        """Load ``url`` in the page and wait until it has loaded."""
        self.evaluate("window.__leaving = true")  # so that the old document is never taken for the new one
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("!window.__leaving && document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(DevToolsError):
                value = self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.05)

    def hover(self, x: float, y: float) -> None:
        """Move the mouse to viewport coordinates ``(x, y)``."""
        self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x, y=y)

    def press(self, key: str, code: int) -> None:
        """Press and release a key on the focused element (``"ArrowLeft"``, 37)."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", session=True, type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> None:
        """Save the viewport, or the ``{x, y, width, height}`` region of it, as a PNG."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": False}  # no resize, so no re-render
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Quit Chromium and remove its profile."""
        with contextlib.suppress(OSError, DevToolsError, TimeoutError):
            self.call("Browser.close", timeout=5)
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# JavaScript helpers run in the page: the dashboard is in TensorBoard's iframe (same origin, so reachable), or is the
# page itself when the plugin's entry page is opened directly.
DASHBOARD_JS = """
window.cka = () => {
  const frame = document.querySelector("iframe");
  return frame ? frame.contentDocument : document;
};
window.ckaOffset = () => {
  const frame = document.querySelector("iframe");
  if (!frame) return [0, 0];
  const box = frame.getBoundingClientRect();
  return [box.left, box.top];
};
// viewport coordinates of the centre of cell (row, col) of the n-th heatmap; row 0 is drawn at the bottom
window.ckaCell = (n, row, col) => {
  const cells = cka().querySelectorAll("svg.heatmap rect.cells")[n];
  const box = cells.getBoundingClientRect();
  const [dx, dy] = ckaOffset();
  return [dx + box.left + (col + 0.5) * box.width / +cells.dataset.cols,
          dy + box.top + (+cells.dataset.rows - 1 - row + 0.5) * box.height / +cells.dataset.rows];
};
// viewport coordinates of the centre of the n-th point (dot, curve point or scatter point) of the dashboard
window.ckaPoint = (n) => {
  const box = cka().querySelectorAll("circle.mark")[n].getBoundingClientRect();
  const [dx, dy] = ckaOffset();
  return [dx + box.left + box.width / 2, dy + box.top + box.height / 2];
};
true
"""

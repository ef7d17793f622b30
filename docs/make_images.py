"""Make the pictures in docs/images/ from a real run of the demo, so the docs show what the tool itself logs.

    python examples/small_vs_large.py --out runs/small_vs_large
    python docs/make_images.py runs/small_vs_large

reads the TensorBoard events of the large run (the last image of every tag CKAMonitor logs), copies the comparison
figure, and takes screenshots of a real `tensorboard` server on localhost with headless Chromium (skipped, with a
message, when `chromium` is not installed: `apt-get install chromium`).
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

IMAGE_TAGS = {  # CKAMonitor's image tag: file in docs/images, step (None: the last)
    "cka/intra": ("cka-intra.png", None),
    "cka/reference": ("cka-reference.png", None),
    "cka/intra_change": ("cka-intra-change.png", 50),  # by the end of the demo the layers barely move any more
    "attention/mean_distance": ("attention-mean-distance.png", None),
}
SCREENSHOTS = {  # file: (TensorBoard URL fragment, window size)
    "tensorboard-images.png": ("#images", "1400,1100"),
    "tensorboard-scalars.png": ("#scalars&tagFilter=attention%2Fmean_distance", "1400,900"),
}


def main() -> None:
    """Write every picture of docs/images/ from the runs named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="the --out folder of examples/small_vs_large.py")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images", help="default: docs/images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    large = _version_dir(args.runs, "large")
    events = EventAccumulator(str(large), size_guidance={IMAGES: 0})  # 0 keeps every image, not a sample
    events.Reload()
    for tag, (name, step) in IMAGE_TAGS.items():
        step = _write_image(events, tag, step, args.out / name)
        print(f"{args.out / name}: {tag} at step {step} of {large}")
    shutil.copy(args.runs / "comparison.png", args.out / "small-vs-large.png")
    print(f"{args.out / 'small-vs-large.png'}: lightning-cka compare of the two runs")
    if shutil.which("chromium") is None:
        print("chromium is not installed: no TensorBoard screenshots", file=sys.stderr)
        return
    with _tensorboard(large) as url:
        for name, (fragment, size) in SCREENSHOTS.items():
            _screenshot(url + fragment, size, args.out / name)
            print(f"{args.out / name}: Chromium screenshot of {url + fragment}")


def _version_dir(runs: Path, which: str) -> Path:
    found = sorted(runs.glob(f"*{which}*/version_*"))
    if not found:
        raise SystemExit(f"no {which} run under {runs}: run examples/small_vs_large.py --out {runs} first")
    return found[-1]


def _write_image(events: EventAccumulator, tag: str, step: int | None, path: Path) -> int:
    images = events.Images(tag)
    image = images[-1] if step is None else next(i for i in images if i.step == step)
    path.write_bytes(image.encoded_image_string)
    return image.step


class _tensorboard:
    """A `tensorboard` server on a free localhost port, for as long as the `with` block runs."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(self.logdir), "--host", "127.0.0.1"]
        self.server = subprocess.Popen([*command, "--port", str(port)], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "data/runs", timeout=1)
                return url
            except OSError:
                time.sleep(0.5)
        self.server.kill()
        raise SystemExit("tensorboard did not start within a minute")

    def __exit__(self, *exc: object) -> None:
        self.server.terminate()
        self.server.wait()


def _screenshot(url: str, size: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
        command += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        command += [f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=15000"]
        subprocess.run([*command, f"--screenshot={path.resolve()}", url], check=True, capture_output=True, timeout=180)


if __name__ == "__main__":
    main()

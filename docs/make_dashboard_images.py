"""Make the dashboard pictures in docs/images/ (dashboard-*.png) from a real `tensorboard` and headless Chromium.

    python docs/make_dashboard_images.py --logdir runs/small_vs_large --run-b small-seed0

serves the runs of a real training (here `python examples/small_vs_large.py --seeds 2`) with `tensorboard` and
screenshots the CKA tab with the browser test's machinery (tests/dashboard_browser.py): the heatmap with a hovered cell
and its history, the attention distances, and two runs side by side with their difference. Without `--logdir` it uses
the synthetic runs of `python -m lightning_cka.dashboard.demo` (figures shaped like the monitor's, 12 layers). Needs
Chromium (`apt-get install chromium`, or set $CHROMIUM).
"""

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dashboard_browser import DASHBOARD_JS, Browser, find_chromium, tensorboard

from lightning_cka.dashboard import demo

READY = "cka().body.dataset.status === 'ready'"
WIDTH = 1400


def main() -> None:
    """Write docs/images/dashboard-heatmap.png, dashboard-attention.png and dashboard-compare.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images", help="default: docs/images")
    parser.add_argument("--logdir", type=Path, help="runs of a real training (default: the synthetic demo runs)")
    parser.add_argument("--runs", type=int, default=2, help="runs the logdir holds, to wait for (default: 2)")
    parser.add_argument("--run-b", default="vit-small", help="the run shown as B in the comparison")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium found: apt-get install chromium, or set $CHROMIUM")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        logdir, runs = args.logdir, args.runs
        if logdir is None:
            logdir, runs = Path(scratch), 3
            demo.write_demo(logdir)
        with tensorboard(logdir, "--samples_per_plugin", "lightning_cka=0", runs=runs) as url:
            shots = {"heatmap": heatmap, "attention": attention, "compare": partial(compare, run_b=args.run_b)}
            for name, shoot in shots.items():
                with Browser(chromium, WIDTH, 1000) as browser:
                    path = args.out / f"dashboard-{name}.png"
                    shoot(browser, url, path)
                    print(path)


def heatmap(b: Browser, url: str, path: Path) -> None:
    """The tab in TensorBoard: cka/intra early in training, a cell marked as null hovered, its history below."""
    open_tab(b, url + "#lightning_cka")
    step_back(b, 4)  # early in training: the demo's far-apart layers are still as similar as unrelated images
    hover(b, "ckaCell(0, cka().querySelector('svg.heatmap rect.cells').dataset.rows - 2, 1)")
    b.screenshot(path, clip={"x": 0, "y": 0, "width": WIDTH, "height": 960})


def attention(b: Browser, url: str, path: Path) -> None:
    """attention/mean_distance: a local head of an early layer hovered, its layer's heads over steps below."""
    open_tab(b, url + "data/plugin_entry.html?name=lightning_cka")
    choose(b, "figure", "attention/mean_distance")
    hover(b, "ckaPoint(1)")
    b.screenshot(path, clip={"x": 0, "y": 0, "width": WIDTH, "height": content_height(b)})


def compare(b: Browser, url: str, path: Path, run_b: str) -> None:
    """The first run against ``run_b``, side by side, with A − B and a hovered cell of the difference."""
    b.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=1100, deviceScaleFactor=1,
           mobile=False)  # fmt: skip
    open_tab(b, url + "data/plugin_entry.html?name=lightning_cka")
    choose(b, "run B", run_b)
    hover(b, "ckaCell(2, cka().querySelectorAll('svg.heatmap rect.cells')[2].dataset.rows - 3, 2)")
    b.screenshot(path, clip={"x": 0, "y": 0, "width": WIDTH, "height": content_height(b)})


def content_height(b: Browser) -> int:
    """The page's height down to the end of its content, in CSS px."""
    return int(b.evaluate("Math.ceil(document.body.getBoundingClientRect().bottom)")) + 4


def open_tab(b: Browser, url: str) -> None:
    """Load the dashboard at ``url`` and wait until it has drawn."""
    b.goto(url)
    b.evaluate(DASHBOARD_JS)
    b.wait_for(READY, 30)


def choose(b: Browser, which: str, value: str) -> None:
    """Pick ``value`` in the toolbar's select titled ``which``."""
    b.evaluate(
        f"""(() => {{ const e = cka().querySelector('.bar select[title^={json.dumps(which)}]');
        e.value = {json.dumps(value)}; e.dispatchEvent(new Event('change')); }})()"""
    )
    time.sleep(0.1)
    b.wait_for(READY)


def step_back(b: Browser, steps: int) -> None:
    """Move the step slider ``steps`` steps back with the keyboard."""
    b.evaluate("cka().querySelector('.bar input[type=range]').focus()")
    for _ in range(steps):
        b.press("ArrowLeft", 37)
    b.evaluate("cka().activeElement.blur()")  # no focus ring in the picture
    time.sleep(0.2)
    b.wait_for(READY)


def hover(b: Browser, where: str) -> None:
    """Point at the viewport position that the JavaScript ``where`` gives; wait for the history chart."""
    b.hover(*b.evaluate(where))
    b.wait_for("!!cka().querySelector('.history svg')")
    b.hover(*b.evaluate(where))  # again: the history chart may have moved the page
    time.sleep(0.3)


if __name__ == "__main__":
    main()

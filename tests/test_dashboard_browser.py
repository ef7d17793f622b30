"""The CKA tab in a real browser: a `tensorboard` subprocess over demo runs, headless Chromium over the DevTools pipe.

Skipped when no Chromium is installed (`apt-get install chromium`, or point $CHROMIUM at one).
"""

import json
import threading
import time

import numpy as np
import pytest
from dashboard_browser import DASHBOARD_JS, Browser, find_chromium, tensorboard

from lightning_cka.dashboard import demo

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium found (apt-get install chromium, or set $CHROMIUM): no browser test"
)
STEPS = (0, 50, 100, 150, 200, 250, 300)
READY = "cka().body.dataset.status === 'ready'"
TIMES, MINUS = "\N{MULTIPLICATION SIGN}", "\N{MINUS SIGN}"  # as the dashboard writes them


def js_fmt(v: float) -> str:
    """How the dashboard prints a value: 3 decimals under 10, 2 under 100, 1 under 1000."""
    a = abs(v)
    return f"{v:.{0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 10 else 3}f}"


def written(run: str, step: int, tag: str) -> dict:
    """The figure the demo wrote for `run` at `step`, as its spec objects (what the test checks against)."""
    reach, probe = {"vit-large": (1.0, "probe-3f2a9c"), "vit-small": (0.55, "probe-3f2a9c")}[run]
    figures = demo.figures(step, run=run, progress=reach * step / STEPS[-1], probe=probe)
    return next(f for f in figures if f.tag == tag)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("dashboard")
    demo.write_demo(logdir, steps=STEPS)
    browser = {}
    # Chromium starts while TensorBoard loads: together they take the time of the slower one.
    starter = threading.Thread(target=lambda: browser.setdefault("b", Browser(CHROMIUM, 1400, 1000)))
    starter.start()
    with tensorboard(logdir, runs=3) as url:
        starter.join()
        b = browser["b"]
        b.url = url
        try:
            yield b
        finally:
            b.close()


def open_dashboard(b: Browser, full_ui: bool = False) -> None:
    b.goto(b.url + ("#lightning_cka" if full_ui else "data/plugin_entry.html?name=lightning_cka"))
    b.evaluate(DASHBOARD_JS)
    b.wait_for(READY, 30)  # in the full UI, once TensorBoard has made the tab's iframe and the dashboard has drawn


def choose(b: Browser, which: str, value: str) -> None:
    """Pick `value` in the toolbar's select titled `which` ("run A", "figure", ...) as a user would."""
    b.evaluate(
        f"""(() => {{ const e = cka().querySelector('.bar select[title^={json.dumps(which)}]');
        e.value = {json.dumps(value)}; e.dispatchEvent(new Event('change')); }})()"""
    )
    time.sleep(0.05)
    b.wait_for(READY)


def hover_cell(b: Browser, heatmap: int, row: int, col: int) -> str:
    b.hover(*b.evaluate(f"ckaCell({heatmap}, {row}, {col})"))
    return b.wait_for("(t => t.style.display === 'block' && t.innerText)(cka().querySelector('.tooltip'))")


def test_tab_shows_the_heatmap_with_layer_names(page):
    open_dashboard(page, full_ui=True)
    assert "CKA" in page.evaluate("document.body.innerText")  # TensorBoard's tab bar
    assert page.evaluate("cka().querySelector('.bar select[title^=figure]').value") == "cka/intra"
    rows = page.evaluate("[...cka().querySelectorAll('svg.heatmap text.row-label')].map(t => t.textContent)")
    cols = page.evaluate("[...cka().querySelectorAll('svg.heatmap text.col-label')].map(t => t.textContent)")
    names = [f"blocks.{i}" for i in range(12)]
    assert rows == names
    assert cols == names
    # the first row is drawn at the bottom
    y = page.evaluate("[...cka().querySelectorAll('svg.heatmap text.row-label')].map(t => t.getBoundingClientRect().y)")
    assert y == sorted(y, reverse=True)
    assert page.evaluate("cka().querySelector('.step').textContent") == "step 300 · 7/7"


def test_hover_shows_the_cell_its_error_and_its_history(page):
    open_dashboard(page)
    heatmap = written("vit-large", 300, "cka/intra").panels[0]
    tip = hover_cell(page, 0, 2, 7)
    assert tip.splitlines()[0] == f"blocks.2 {TIMES} blocks.7"
    assert f"CKA {heatmap.values[2, 7]:.3f} ± {heatmap.error[2, 7]:.3f}" in tip
    title = page.wait_for("(t => t && t.textContent)(cka().querySelector('.history svg .title'))")
    assert title.startswith(f"blocks.2 {TIMES} blocks.7")
    assert page.evaluate("cka().querySelectorAll('.history circle.history-point').length") == len(STEPS)


def test_slider_changes_the_step(page):
    open_dashboard(page)
    before = hover_cell(page, 0, 2, 7)
    page.evaluate("cka().querySelector('.bar input[type=range]').focus()")
    page.press("ArrowLeft", 37)
    page.wait_for("cka().body.dataset.step === '250' && " + READY)
    assert page.evaluate("cka().querySelector('.step').textContent") == "step 250 · 6/7"
    value = written("vit-large", 250, "cka/intra").panels[0].values[2, 7]
    after = hover_cell(page, 0, 2, 7)
    assert f"CKA {value:.3f}" in after
    assert after != before
    for _ in range(5):
        page.press("ArrowLeft", 37)
    page.wait_for("cka().body.dataset.step === '0' && " + READY)
    # at step 0 the far cells are as similar as unrelated images: marked, and the tooltip says so
    marked = written("vit-large", 0, "cka/intra").panels[0].marked
    row, col = (int(i) for i in np.argwhere(marked)[0])
    assert "indistinguishable from the null" in hover_cell(page, 0, row, col)


def test_two_runs_side_by_side_with_their_difference(page):
    open_dashboard(page)
    choose(page, "run B", "vit-small")
    headers = page.evaluate("[...cka().querySelectorAll('.block h3')].map(h => h.textContent)")
    assert headers == ["A · vit-large · step 300", "B · vit-small · step 300", f"A {MINUS} B"]
    a = written("vit-large", 300, "cka/intra").panels[0].values[4, 1]
    b = written("vit-small", 300, "cka/intra").panels[0].values[4, 1]
    tip = hover_cell(page, 2, 4, 1)  # the third heatmap: the difference
    assert f"A {a:.3f}" in tip
    assert f"B {b:.3f}" in tip
    assert f"A {MINUS} B {a - b:.3f}" in tip
    # another probe: refused with its reason, until the user allows it
    choose(page, "run B", "vit-other-probe")
    reason = page.evaluate("cka().querySelector('.refused .reason').textContent")
    assert "different probe images (probe-3f2a9c vs probe-77e0b1)" in reason
    assert page.evaluate("cka().querySelector('.difference')") is None
    page.evaluate("cka().querySelector('.refused input[type=checkbox]').click()")
    title = page.wait_for("(d => d && d.querySelector('h3').textContent)(cka().querySelector('.difference'))")
    assert title == f"A {MINUS} B (different probe images)"


def test_attention_distances_with_the_local_threshold(page):
    open_dashboard(page)
    choose(page, "figure", "attention/mean_distance")
    labels = page.evaluate("[...cka().querySelectorAll('text.line-label')].map(t => t.textContent)")
    assert sorted(labels) == ["local threshold (48 px)", "uniform attention"]
    dots = written("vit-large", 300, "attention/mean_distance").panels[0]
    heads = dots.series[0].values
    assert page.evaluate("cka().querySelectorAll('circle.mark').length") == np.isfinite(heads).sum()
    # the first drawn dot is head 0 of the first layer
    page.hover(*page.evaluate("ckaPoint(0)"))
    tip = page.wait_for("(t => t.style.display === 'block' && t.innerText)(cka().querySelector('.tooltip'))")
    assert tip.splitlines() == ["blocks.0 · head 0", f"mean attention distance (px) {js_fmt(heads[0, 0])}"]
    legend = page.wait_for("(h => h && h.textContent)(cka().querySelector('.history svg'))")
    assert "local threshold (48 px)" in legend
    assert "head 0" in legend

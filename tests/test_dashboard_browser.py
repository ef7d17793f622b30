"""The CKA tab in a real browser: a `tensorboard` subprocess over demo runs, headless Chromium over the DevTools pipe.

Skipped when no Chromium is installed (`apt-get install chromium`, or point $CHROMIUM at one).
"""

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
from dashboard_browser import DASHBOARD_JS, Browser, find_chromium, tensorboard

from lightning_cka.dashboard import demo
from lightning_cka.dashboard.summaries import write_figures
from lightning_cka.figures.cka import NULL_MARK

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium found (apt-get install chromium, or set $CHROMIUM): no browser test"
)
STEPS = demo.STEPS
LAST, LAYERS = STEPS[-1], 8
READY = "cka().body.dataset.status === 'ready'"
TIMES, MINUS = "\N{MULTIPLICATION SIGN}", "\N{MINUS SIGN}"  # as the dashboard writes them


def js_fmt(v: float) -> str:
    """How the dashboard prints a value: 3 decimals under 10, 2 under 100, 1 under 1000."""
    a = abs(v)
    return f"{v:.{0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 10 else 3}f}"


def written(run: str, step: int, tag: str) -> dict:
    """The figure the demo wrote for `run` at `step`, as its spec objects (what the test checks against)."""
    return next(f for f in demo.figures(run, step) if f.tag == tag)


def marked_figure():
    """The demo's first cka/intra with cell (5, 1) and its mirror marked as null: real probes of the demo's synthetic
    images are all far above their null, and the tab's marks must still be drawn and explained.
    """
    figure = written("vit-large", 0, "cka/intra")
    marked = np.zeros((LAYERS, LAYERS), dtype=bool)
    marked[5, 1] = marked[1, 5] = True
    panel = dataclasses.replace(figure.panels[0], marked=marked, mark_label=NULL_MARK)
    return dataclasses.replace(figure, panels=(panel,), meta={**figure.meta, "run": "vit-marked"})


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path_factory.mktemp("dashboard")
    demo.write_demo(logdir, steps=STEPS)
    writer = SummaryWriter(str(logdir / "vit-marked"))
    write_figures(writer, [marked_figure()], 0)
    writer.close()
    browser = {}
    # Chromium starts while TensorBoard loads: together they take the time of the slower one.
    starter = threading.Thread(target=lambda: browser.setdefault("b", Browser(CHROMIUM, 1400, 1000)))
    starter.start()
    with tensorboard(logdir, runs=4) as url:
        starter.join()
        b = browser["b"]
        b.url, b.logdir = url, logdir
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
    names = [f"blocks.{i}" for i in range(LAYERS)]
    assert rows == names
    assert cols == names
    # the first row is drawn at the bottom
    y = page.evaluate("[...cka().querySelectorAll('svg.heatmap text.row-label')].map(t => t.getBoundingClientRect().y)")
    assert y == sorted(y, reverse=True)
    assert page.evaluate("cka().querySelector('.step').textContent") == f"step {LAST} · 7/7"


def test_hover_shows_the_cell_its_error_and_its_history(page):
    open_dashboard(page)
    heatmap = written("vit-large", LAST, "cka/intra").panels[0]
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
    page.wait_for(f"cka().body.dataset.step === '{STEPS[-2]}' && " + READY)
    assert page.evaluate("cka().querySelector('.step').textContent") == f"step {STEPS[-2]} · 6/7"
    value = written("vit-large", STEPS[-2], "cka/intra").panels[0].values[2, 7]
    after = hover_cell(page, 0, 2, 7)
    assert f"CKA {value:.3f}" in after
    assert after != before
    for _ in range(5):
        page.press("ArrowLeft", 37)
    page.wait_for("cka().body.dataset.step === '0' && " + READY)


def test_cells_marked_as_null_are_drawn_and_explained(page):
    open_dashboard(page)
    choose(page, "run A", "vit-marked")
    legend = page.evaluate("[...cka().querySelectorAll('.legend span.dot')].map(e => e.textContent).join(' ')")
    assert NULL_MARK in legend
    assert "indistinguishable from the null" in hover_cell(page, 0, 5, 1)
    assert "indistinguishable from the null" not in hover_cell(page, 0, 2, 3)


def test_two_runs_side_by_side_with_their_difference(page):
    open_dashboard(page)
    choose(page, "run B", "vit-small")
    headers = page.evaluate("[...cka().querySelectorAll('.block h3')].map(h => h.textContent)")
    assert headers == [f"A · vit-large · step {LAST}", f"B · vit-small · step {LAST}", f"A {MINUS} B"]
    a = written("vit-large", LAST, "cka/intra").panels[0].values[4, 1]
    b = written("vit-small", LAST, "cka/intra").panels[0].values[4, 1]
    tip = hover_cell(page, 2, 4, 1)  # the third heatmap: the difference
    assert f"A {a:.3f}" in tip
    assert f"B {b:.3f}" in tip
    assert f"A {MINUS} B {a - b:.3f}" in tip
    # another probe: refused with its reason, until the user allows it
    choose(page, "run B", "vit-other-probe")
    reason = page.evaluate("cka().querySelector('.refused .reason').textContent")
    probes = [written(run, LAST, "cka/intra").meta["probe"] for run in ("vit-large", "vit-other-probe")]
    assert f"different probe images ({probes[0]} vs {probes[1]})" in reason
    assert page.evaluate("cka().querySelector('.difference')") is None
    page.evaluate("cka().querySelector('.refused input[type=checkbox]').click()")
    title = page.wait_for("(d => d && d.querySelector('h3').textContent)(cka().querySelector('.difference'))")
    assert title == f"A {MINUS} B (different probe images)"


def test_attention_distances_with_the_local_threshold(page):
    open_dashboard(page)
    choose(page, "figure", "attention/mean_distance")
    labels = page.evaluate("[...cka().querySelectorAll('text.line-label')].map(t => t.textContent)")
    dots = written("vit-large", LAST, "attention/mean_distance").panels[0]
    assert sorted(labels) == sorted(line.label for line in dots.lines)  # local below ... px, uniform attention ...
    heads = dots.series[0].values
    assert page.evaluate("cka().querySelectorAll('circle.mark').length") == np.isfinite(heads).sum()
    # the first drawn dot is head 0 of the first layer
    page.hover(*page.evaluate("ckaPoint(0)"))
    tip = page.wait_for("(t => t.style.display === 'block' && t.innerText)(cka().querySelector('.tooltip'))")
    assert tip.splitlines() == [f"{dots.x[0]} · head 0", f"{dots.y_label} {js_fmt(heads[0, 0])}"]
    legend = page.wait_for("(h => h && h.textContent)(cka().querySelector('.history svg'))")
    assert dots.lines[0].label in legend
    assert "head 0" in legend


# The report of the demo's two runs (a larger and a smaller learning rate), as a reader opens it.
VERDICT_COLOURS = {"shows": (26, 127, 55), "does not show": (180, 35, 24), "cannot tell": (87, 96, 106)}


def test_the_report_of_the_demo_runs_opens_offline_with_its_findings_and_pictures(page, tmp_path):
    from PIL import Image

    from lightning_cka.cli import main

    out = tmp_path / "report.html"
    runs = [str(page.logdir / "vit-large"), "--vs", str(page.logdir / "vit-small")]
    assert main(["report", *runs, "--labels", "larger rate", "smaller rate", "--out", str(out), "--no-markdown"]) == 0
    page.goto(out.as_uri())
    seen = page.evaluate(
        """(() => ({
        pictures: [...document.images].map(i => i.complete && i.naturalWidth > 0),
        findings: [...document.querySelectorAll('h3')].map(h => h.textContent),
        verdicts: [...document.querySelectorAll('.verdict')]
            .filter(v => v.getBoundingClientRect().bottom < window.innerHeight).map(v => v.textContent),
        figureOne: document.querySelector('img[alt^="Figure 1 layout"]').getBoundingClientRect().top,
        }))()"""
    )
    assert len(seen["pictures"]) >= 4 and all(seen["pictures"])  # every picture is inside the file and decodes
    assert "Layers alike throughout, or in stages (larger rate)" in seen["findings"]
    assert "Local heads and the amount of training data" in seen["findings"]
    top = tmp_path / "top.png"
    page.screenshot(top)  # the title, the runs and the verdicts at a glance
    pixels = np.asarray(Image.open(top).convert("RGB")).reshape(-1, 3)
    assert seen["verdicts"], "no verdict in the first screen"
    for verdict in {v for v in seen["verdicts"] if v in VERDICT_COLOURS}:  # those the first screen shows
        badge = np.all(np.abs(pixels.astype(int) - VERDICT_COLOURS[verdict]) <= 2, axis=1).sum()
        assert badge > 200, f"no {verdict} badge drawn in the first screen"
    page.evaluate(f"window.scrollTo(0, {seen['figureOne']})")
    page.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")  # painted
    shot = tmp_path / "figure_one.png"
    page.screenshot(shot)
    picture = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64)[:400]
    colourful = (picture.max(axis=2) - picture.min(axis=2) > 60).mean()  # the heatmaps' colour scale, not text
    assert colourful > 0.05, f"only {colourful:.1%} of the Figure 1 screen is coloured: the pictures are not drawn"

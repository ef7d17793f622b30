// The "CKA" tab of TensorBoard: lightning-cka's figures, step by step, with hover, history and run comparison.
// One ES module, no dependencies: TensorBoard loads it in an iframe whose base URL is data/plugin/lightning_cka/,
// so every fetch below is relative to the plugin's routes (see plugin.py).

const SVG = "http://www.w3.org/2000/svg";
const FONT = "11px system-ui, sans-serif";
const PLAY_MS = 700;
const POLL_MS = 30000;
// viridis: the sequential scale of the package's matplotlib figures, 0 dark, 1 bright
const SEQUENTIAL = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
const DIVERGING = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"];
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

const CSS = `
body { font: 13px system-ui, sans-serif; color: #212121; margin: 0; padding: 12px 16px 40px; background: #fff; }
.bar { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; padding-bottom: 8px; border-bottom: 1px solid #e0e0e0; }
.bar label { display: flex; gap: 6px; align-items: center; color: #616161; }
.bar select { max-width: 280px; font: inherit; }
.bar input[type=range] { width: 220px; }
.bar button { font: inherit; min-width: 32px; }
.step { font-variant-numeric: tabular-nums; min-width: 120px; }
.note { color: #757575; font-size: 12px; margin: 6px 0; }
.error { color: #c62828; margin: 6px 0; }
.refused { color: #8d6e00; margin: 6px 0; display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }
h2 { font-size: 16px; font-weight: 500; margin: 14px 0 2px; }
.caption { color: #616161; margin: 0 0 8px; max-width: 900px; }
.blocks { display: flex; flex-wrap: wrap; gap: 12px 28px; align-items: flex-start; }
.block h3 { font-size: 13px; font-weight: 500; margin: 8px 0 4px; color: #424242; }
.panels { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: flex-start; }
.panel { overflow-x: auto; max-width: 100%; }
.panel svg text { font: ${FONT}; fill: #424242; }
.panel svg .title { font-weight: 600; fill: #212121; }
.legend { display: flex; flex-wrap: wrap; gap: 2px 12px; font-size: 12px; color: #424242; max-width: 640px; margin-left: 48px; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; margin-right: 4px; background: var(--c); border-radius: 2px; }
.legend span.dot::before { background: radial-gradient(circle, #fff 0 2px, #3e4989 2.5px); } /* a marked cell */
.tooltip { position: fixed; pointer-events: none; background: rgba(33,33,33,.92); color: #fff; padding: 6px 8px; border-radius: 4px;
  font-size: 12px; line-height: 1.45; max-width: 360px; z-index: 10; display: none; white-space: nowrap; }
.history { margin-top: 16px; border-top: 1px solid #e0e0e0; padding-top: 8px; }
.history svg text { font: ${FONT}; fill: #424242; }
.empty { color: #616161; max-width: 720px; line-height: 1.5; }
`;

// --- small helpers -------------------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  e.append(...children.filter((c) => c != null));
  return e;
}

function s(tag, attrs = {}, ...children) {
  const e = document.createElementNS(SVG, tag);
  setAttrs(e, attrs);
  e.append(...children.filter((c) => c != null));
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k in e && !(e instanceof SVGElement)) e[k] = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
}

function query(route, params) {
  const search = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null) search.set(k, v);
  return `${route}?${search}`;
}

async function getJSON(url) {
  const response = await fetch(url);
  let body;
  try {
    body = await response.json();
  } catch {
    throw new Error(`${url}: HTTP ${response.status}, not JSON`);
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

const finite = (v) => typeof v === "number" && Number.isFinite(v);
const tick = (v) => String(+v.toPrecision(6)); // axis ticks: 0.2, not 0.200

function fmt(v) {
  if (!finite(v)) return "–";
  const a = Math.abs(v);
  return v.toFixed(a >= 1000 ? 0 : a >= 100 ? 1 : a >= 10 ? 2 : 3);
}

// "CKA 0.734 ± 0.012" for tooltips; the value is bold
const valueLine = (label, v, se) => `${escapeHTML(label)} <b class="value">${fmt(v)}</b>${finite(se) ? ` ± ${fmt(se)}` : ""}`;

function escapeHTML(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

let measureContext;
function textWidth(text) {
  measureContext ??= document.createElement("canvas").getContext("2d");
  measureContext.font = FONT;
  return measureContext.measureText(text).width;
}

function lerpColor(stops, t) {
  t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(Math.floor(t), stops.length - 2);
  const [a, b] = [stops[i], stops[i + 1]].map((c) => [1, 3, 5].map((k) => parseInt(c.slice(k, k + 2), 16)));
  return a.map((x, k) => Math.round(x + (b[k] - x) * (t - i)));
}

function seriesColor(i, n) {
  if (n <= PALETTE.length) return PALETTE[i % PALETTE.length];
  const [r, g, b] = lerpColor(SEQUENTIAL, n > 1 ? i / (n - 1) : 0); // many series: one per layer, in layer order
  return `rgb(${r},${g},${b})`;
}

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(12));
  return ticks;
}

function niceCeil(v) {
  if (!(v > 0)) return 1;
  const mag = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= v - 1e-12);
}

const scale = (d0, d1, r0, r1) => (v) => (d1 === d0 ? (r0 + r1) / 2 : r0 + ((v - d0) / (d1 - d0)) * (r1 - r0));
const dash = { dashed: "6 4", dotted: "2 3", solid: null };

// Every k-th label, k chosen so that labels `spacing` px apart do not overlap.
const labelEvery = (cell, spacing = 13) => Math.max(1, Math.ceil(spacing / cell));

function extent(values, extra = []) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of [...values, ...extra]) {
    if (!finite(v)) continue;
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  if (lo === Infinity) return [0, 1];
  if (lo === hi) return [lo - 1, hi + 1];
  const pad = (hi - lo) * 0.06;
  return [lo - pad, hi + pad];
}

// --- panels --------------------------------------------------------------------------------------------------------
// Each draw function returns a DOM element; `ctx` carries the sizes and the hover callbacks:
// ctx.onHover(element, html) with element = {panel, args, head?} (or null to hide) and ctx.cellSide (heatmap px).

function drawPanel(panel, ctx) {
  const draw = { heatmap: drawHeatmap, dots: drawDots, curves: drawCurves, scatter: drawScatter }[panel.kind];
  if (!draw) return h("div", { className: "panel note" }, `panel of unknown kind ${panel.kind}`);
  return draw(panel, ctx);
}

function drawHeatmap(p, ctx) {
  const rows = p.rows.length;
  const cols = p.cols.length;
  const cell = Math.max(1, Math.min(ctx.cellSide / Math.max(rows, cols), 36 * ctx.zoom));
  const [w, h_] = [cols * cell, rows * cell];
  const rowEvery = labelEvery(cell);
  const colEvery = labelEvery(cell, 16);
  const shown = (names, every) => names.filter((_, i) => i % every === 0);
  const left = 18 + Math.min(160, Math.max(24, ...shown(p.rows, rowEvery).map(textWidth))) + 6;
  const bottom = 22 + Math.min(120, Math.max(16, ...shown(p.cols, colEvery).map(textWidth)) * 0.72) + 8;
  const top = p.title ? 20 : 8;
  const right = 86;
  const diverging = p.cmap === "diverging";
  const [vmin, vmax] = [finite(p.vmin) ? p.vmin : 0, finite(p.vmax) ? p.vmax : 1];
  const stops = diverging ? DIVERGING : SEQUENTIAL;
  const color = (v) => lerpColor(stops, (v - vmin) / (vmax - vmin || 1));

  // Cells go into a canvas at the device's pixel size (no smoothing, no seams), placed in the SVG as one image.
  const dpr = window.devicePixelRatio || 1;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(w * dpr));
  canvas.height = Math.max(1, Math.round(h_ * dpr));
  const g = canvas.getContext("2d");
  const edge = (i, n, size) => Math.round((i / n) * size);
  const showDots = cell >= 4;
  let below = false;
  let above = false;
  for (let r = 0; r < rows; r++) {
    const y0 = edge(rows - 1 - r, rows, canvas.height); // first row at the bottom, as in the paper
    const y1 = edge(rows - r, rows, canvas.height);
    for (let c = 0; c < cols; c++) {
      const v = p.values[r]?.[c];
      if (!finite(v)) continue;
      below ||= v < vmin;
      above ||= v > vmax;
      const [R, G, B] = color(v);
      const x0 = edge(c, cols, canvas.width);
      const x1 = edge(c + 1, cols, canvas.width);
      g.fillStyle = `rgb(${R},${G},${B})`;
      g.fillRect(x0, y0, x1 - x0, y1 - y0);
      if (showDots && p.marked?.[r]?.[c]) {
        g.fillStyle = 0.299 * R + 0.587 * G + 0.114 * B > 140 ? "#212121" : "#ffffff";
        g.beginPath();
        g.arc((x0 + x1) / 2, (y0 + y1) / 2, Math.max(1.5, Math.min(cell * 0.16, 3.5)) * dpr, 0, 2 * Math.PI);
        g.fill();
      }
    }
  }
  const svg = s("svg", { width: left + w + right, height: top + h_ + bottom, class: "heatmap" });
  if (p.title) svg.append(s("text", { x: left, y: 13, class: "title" }, p.title));
  const plot = s("g", { transform: `translate(${left},${top})` });
  svg.append(plot);
  plot.append(s("rect", { width: w, height: h_, fill: "#fafafa", stroke: "#bdbdbd" }));
  plot.append(s("image", { href: canvas.toDataURL(), width: w, height: h_, preserveAspectRatio: "none" }));
  for (let r = 0; r < rows; r += rowEvery) {
    const y = (rows - 1 - r + 0.5) * cell;
    plot.append(s("text", { x: -5, y: y + 4, "text-anchor": "end", class: "row-label" }, p.rows[r]));
  }
  for (let c = 0; c < cols; c += colEvery) {
    const x = (c + 0.5) * cell;
    plot.append(
      s("text", { transform: `translate(${x + 3},${h_ + 8}) rotate(-45)`, "text-anchor": "end", class: "col-label" }, p.cols[c]),
    );
  }
  plot.append(
    s("text", { transform: `translate(${-left + 12},${h_ / 2}) rotate(-90)`, "text-anchor": "middle" }, p.row_label || ""),
  );
  plot.append(s("text", { x: w / 2, y: h_ + bottom - 6, "text-anchor": "middle" }, p.col_label || ""));
  plot.append(colorBar(w + 14, h_, vmin, vmax, stops, p.colorbar || "", below, above));
  const hoverBox = s("rect", { width: cell, height: cell, fill: "none", stroke: "#ff1744", "stroke-width": 2, visibility: "hidden" });
  plot.append(hoverBox);

  // the pointer's cell, from the position over the plot rectangle
  const catcher = s("rect", { width: w, height: h_, fill: "transparent", class: "cells", "data-rows": rows, "data-cols": cols });
  plot.append(catcher);
  catcher.addEventListener("mousemove", (event) => {
    const box = catcher.getBoundingClientRect();
    const c = Math.min(cols - 1, Math.floor(((event.clientX - box.left) / box.width) * cols));
    const r = rows - 1 - Math.min(rows - 1, Math.floor(((event.clientY - box.top) / box.height) * rows));
    if (c < 0 || r < 0) return;
    hoverBox.setAttribute("x", c * cell);
    hoverBox.setAttribute("y", (rows - 1 - r) * cell);
    hoverBox.setAttribute("visibility", "visible");
    ctx.onHover({ panel: ctx.index, args: { row: r, col: c } }, heatmapTip(p, r, c, ctx), event);
  });
  catcher.addEventListener("mouseleave", () => {
    hoverBox.setAttribute("visibility", "hidden");
    ctx.onHover(null);
  });
  const wrap = h("div", { className: "panel" }, svg);
  const notes = [];
  if (p.marked && p.mark_label) notes.push(h("span", { className: "dot" }, p.mark_label + (showDots ? "" : " (zoom in to see the dots)")));
  if (notes.length) wrap.append(h("div", { className: "legend" }, ...notes));
  return wrap;
}

function heatmapTip(p, r, c, ctx) {
  const v = p.values[r]?.[c];
  const se = p.error?.[r]?.[c];
  const lines = [`<b>${escapeHTML(p.rows[r])}</b> × <b>${escapeHTML(p.cols[c])}</b>`];
  if (ctx.tip) lines.push(...ctx.tip(r, c));
  else lines.push(valueLine(p.colorbar || "value", v, se));
  const nullAt = p.null?.[r]?.[c];
  if (p.marked?.[r]?.[c]) lines.push(`indistinguishable from the null${finite(nullAt) ? ` (threshold ${fmt(nullAt)})` : ""}`);
  else if (finite(nullAt)) lines.push(`null threshold ${fmt(nullAt)}`);
  return lines.join("<br>");
}

function colorBar(x, height, vmin, vmax, stops, label, below, above) {
  const id = `cb${Math.random().toString(36).slice(2)}`;
  const gradient = s("linearGradient", { id, x1: 0, y1: 1, x2: 0, y2: 0 });
  stops.forEach((c, i) => gradient.append(s("stop", { offset: i / (stops.length - 1), "stop-color": c })));
  const y = scale(vmin, vmax, height, 0);
  const bar = s("g", { transform: `translate(${x},0)`, class: "colorbar" }, s("defs", {}, gradient));
  bar.append(s("rect", { width: 12, height, fill: `url(#${id})`, stroke: "#9e9e9e" }));
  for (const t of niceTicks(vmin, vmax, 5)) {
    bar.append(s("line", { x1: 12, x2: 16, y1: y(t), y2: y(t), stroke: "#757575" }));
    bar.append(s("text", { x: 18, y: y(t) + 4 }, tick(t)));
  }
  // values beyond the scale are clipped: an arrow at that end says so
  if (above) bar.append(s("path", { d: "M0,-2 L12,-2 L6,-9 Z", fill: stops.at(-1) }));
  if (below) bar.append(s("path", { d: `M0,${height + 2} L12,${height + 2} L6,${height + 9} Z`, fill: stops[0] }));
  bar.append(s("text", { transform: `translate(66,${height / 2}) rotate(-90)`, "text-anchor": "middle" }, label));
  return bar;
}

// Dots, curves and scatter share one frame: axes, grid, reference lines, a legend and nearest-point hover.
function drawXY(p, ctx, { points, xTicks, xDomain, yDomain, width, xLabel, hoverArgs }) {
  const left = 54;
  const lineLabels = (p.lines || []).filter((l) => l.axis !== "x").map((l) => textWidth(l.label));
  const right = 16 + (lineLabels.length ? Math.max(...lineLabels) : 0);
  const top = p.title ? 22 : 10;
  const xLabelWidth = xTicks.categorical ? Math.min(110, Math.max(20, ...xTicks.labels.map((t) => textWidth(t.text))) * 0.72) : 14;
  const bottom = 26 + xLabelWidth;
  const height = 260;
  const svg = s("svg", { width: left + width + right, height: top + height + bottom });
  if (p.title) svg.append(s("text", { x: left, y: 14, class: "title" }, p.title));
  const plot = s("g", { transform: `translate(${left},${top})` });
  svg.append(plot);
  const x = scale(xDomain[0], xDomain[1], 0, width);
  const y = scale(yDomain[0], yDomain[1], height, 0);
  plot.append(s("rect", { width, height, fill: "#fff", stroke: "#bdbdbd" }));
  for (const t of niceTicks(yDomain[0], yDomain[1], 5)) {
    plot.append(s("line", { x1: 0, x2: width, y1: y(t), y2: y(t), stroke: "#eeeeee" }));
    plot.append(s("text", { x: -6, y: y(t) + 4, "text-anchor": "end" }, tick(t)));
  }
  for (const t of xTicks.labels) {
    const attrs = xTicks.categorical
      ? { transform: `translate(${x(t.at) + 3},${height + 10}) rotate(-45)`, "text-anchor": "end", class: "x-label" }
      : { x: x(t.at), y: height + 16, "text-anchor": "middle" };
    plot.append(s("text", attrs, t.text));
    if (!xTicks.categorical) plot.append(s("line", { x1: x(t.at), x2: x(t.at), y1: 0, y2: height, stroke: "#eeeeee" }));
  }
  plot.append(s("text", { x: width / 2, y: height + bottom - 4, "text-anchor": "middle" }, xLabel || ""));
  plot.append(s("text", { transform: `translate(-42,${height / 2}) rotate(-90)`, "text-anchor": "middle" }, p.y_label || ""));
  // reference lines, labelled in the right margin so that no label hides a point
  const labelled = [];
  for (const line of p.lines || []) {
    if (!finite(line.value)) continue;
    const style = { stroke: "#616161", "stroke-dasharray": dash[line.style], "stroke-width": 1.3, class: "reference-line" };
    if (line.axis === "x") {
      plot.append(s("line", { x1: x(line.value), x2: x(line.value), y1: 0, y2: height, ...style }));
      plot.append(s("text", { x: x(line.value) + 4, y: 12, class: "line-label" }, line.label));
    } else {
      plot.append(s("line", { x1: 0, x2: width, y1: y(line.value), y2: y(line.value), ...style }));
      labelled.push([y(line.value), line.label]);
    }
  }
  labelled.sort((a, b) => a[0] - b[0]);
  labelled.forEach(([at, label], i) => {
    const placed = i ? Math.max(at, labelled[i - 1][0] + 13) : at; // keep close lines' labels apart
    labelled[i][0] = placed;
    plot.append(s("text", { x: width + 6, y: placed + 4, class: "line-label" }, label));
  });
  const marks = s("g");
  plot.append(marks);
  for (const pt of points) pt.px = [x(pt.x), y(pt.y)];
  ctx.drawMarks(marks, points, x, y);
  const ring = s("circle", { r: 6, fill: "none", stroke: "#ff1744", "stroke-width": 2, visibility: "hidden" });
  plot.append(ring);
  const catcher = s("rect", { width, height, fill: "transparent" });
  plot.append(catcher);
  catcher.addEventListener("mousemove", (event) => {
    const box = catcher.getBoundingClientRect();
    const [mx, my] = [event.clientX - box.left, event.clientY - box.top];
    let best = null;
    let bestD = 14 ** 2;
    for (const pt of points) {
      if (!finite(pt.y) || !finite(pt.x)) continue;
      const d = (pt.px[0] - mx) ** 2 + (pt.px[1] - my) ** 2;
      if (d < bestD) [best, bestD] = [pt, d];
    }
    if (!best) {
      ring.setAttribute("visibility", "hidden");
      return ctx.onHover(null);
    }
    ring.setAttribute("cx", best.px[0]);
    ring.setAttribute("cy", best.px[1]);
    ring.setAttribute("visibility", "visible");
    ctx.onHover({ panel: ctx.index, args: hoverArgs(best), head: best.head }, best.tip, event);
  });
  catcher.addEventListener("mouseleave", () => {
    ring.setAttribute("visibility", "hidden");
    ctx.onHover(null);
  });
  const wrap = h("div", { className: "panel" }, svg);
  const named = p.series.filter((sr) => sr.label);
  if (named.length) {
    wrap.append(
      h("div", { className: "legend" }, ...p.series.map((sr, i) => h("span", { style: `--c:${seriesColor(i, p.series.length)}` }, sr.label || "(unnamed)"))),
    );
  }
  return wrap;
}

function categoricalTicks(names, width) {
  const every = labelEvery(width / Math.max(1, names.length), 15);
  return { categorical: true, labels: names.map((text, i) => ({ at: i, text })).filter((_, i) => i % every === 0) };
}

function drawDots(p, ctx) {
  const n = p.x.length;
  const width = Math.max(480, Math.min(960, n * 44));
  const points = [];
  p.series.forEach((sr, si) => {
    sr.values.forEach((heads, xi) => {
      const row = Array.isArray(heads) ? heads : [heads];
      row.forEach((v, k) => {
        if (!finite(v)) return;
        // heads spread a little around their layer so each one can be pointed at
        const spread = row.length > 1 ? (k / (row.length - 1) - 0.5) * 0.36 : 0;
        const se = Array.isArray(sr.error?.[xi]) ? sr.error[xi][k] : sr.error?.[xi];
        const who = `${sr.label ? `${escapeHTML(sr.label)} · ` : ""}head ${k}`;
        const tip = `<b>${escapeHTML(p.x[xi])}</b> · ${who}<br>${valueLine(p.y_label || "value", v, se)}`;
        points.push({ x: xi + spread, y: v, series: si, xi, head: k, tip });
      });
    });
  });
  const yDomain = p.ylim ? p.ylim : extent(points.map((pt) => pt.y), (p.lines || []).map((l) => l.value));
  ctx.drawMarks = (g, pts) => {
    for (const pt of pts) {
      g.append(s("circle", { cx: pt.px[0], cy: pt.px[1], r: 3.2, fill: seriesColor(pt.series, p.series.length), "fill-opacity": 0.85, class: "mark" }));
    }
  };
  return drawXY(p, ctx, {
    points,
    width,
    xTicks: categoricalTicks(p.x, width),
    xDomain: [-0.6, n - 0.4],
    yDomain,
    xLabel: p.x_label,
    hoverArgs: (pt) => ({ x: pt.xi }),
  });
}

function drawCurves(p, ctx) {
  const n = p.x.length;
  const width = Math.max(480, Math.min(960, n * 44));
  const points = [];
  p.series.forEach((sr, si) => {
    sr.values.forEach((v, xi) => {
      const se = sr.error?.[xi];
      const who = sr.label ? `${escapeHTML(sr.label)} · ` : "";
      const tip = `${who}<b>${escapeHTML(p.x[xi])}</b><br>${valueLine(p.y_label || "value", v, se)}`;
      points.push({ x: xi, y: v, se, series: si, xi, tip });
    });
  });
  const withError = points.flatMap((pt) => (finite(pt.se) ? [pt.y - pt.se, pt.y + pt.se] : [pt.y]));
  const yDomain = p.ylim ? p.ylim : extent(withError, (p.lines || []).map((l) => l.value));
  ctx.drawMarks = (g, pts, x, y) => {
    p.series.forEach((sr, si) => {
      const color = seriesColor(si, p.series.length);
      const mine = pts.filter((pt) => pt.series === si && finite(pt.y));
      const band = mine.filter((pt) => finite(pt.se));
      if (band.length > 1) {
        const upper = band.map((pt) => `${x(pt.x)},${y(pt.y + pt.se)}`);
        const lower = band.map((pt) => `${x(pt.x)},${y(pt.y - pt.se)}`).reverse();
        g.append(s("polygon", { points: [...upper, ...lower].join(" "), fill: color, "fill-opacity": 0.18 }));
      }
      g.append(s("polyline", { points: mine.map((pt) => pt.px.join(",")).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
      for (const pt of mine) g.append(s("circle", { cx: pt.px[0], cy: pt.px[1], r: 2.6, fill: color, class: "mark" }));
    });
  };
  return drawXY(p, ctx, {
    points,
    width,
    xTicks: categoricalTicks(p.x, width),
    xDomain: [-0.4, n - 0.6],
    yDomain,
    xLabel: p.x_label,
    hoverArgs: (pt) => ({ x: pt.xi }),
  });
}

function drawScatter(p, ctx) {
  const points = [];
  p.series.forEach((sr, si) => {
    sr.values.forEach((xy, i) => {
      if (!Array.isArray(xy)) return;
      const who = sr.label ? `<b>${escapeHTML(sr.label)}</b> · ` : "";
      const tip = `${who}point ${i}<br>${valueLine(p.x_label || "x", xy[0])}<br>${valueLine(p.y_label || "y", xy[1])}`;
      points.push({ x: xy[0], y: xy[1], series: si, point: i, tip });
    });
  });
  const lines = p.lines || [];
  const xDomain = extent(points.map((pt) => pt.x), lines.filter((l) => l.axis === "x").map((l) => l.value));
  const yDomain = extent(points.map((pt) => pt.y), lines.filter((l) => l.axis !== "x").map((l) => l.value));
  const width = 420;
  ctx.drawMarks = (g, pts) => {
    for (const pt of pts) {
      if (!finite(pt.x) || !finite(pt.y)) continue;
      g.append(s("circle", { cx: pt.px[0], cy: pt.px[1], r: 3.5, fill: seriesColor(pt.series, p.series.length), "fill-opacity": 0.85, class: "mark" }));
    }
  };
  const xTicks = { categorical: false, labels: niceTicks(xDomain[0], xDomain[1], 6).map((t) => ({ at: t, text: tick(t) })) };
  return drawXY(p, ctx, { points, width, xTicks, xDomain, yDomain, xLabel: p.x_label, hoverArgs: (pt) => ({ series: pt.series, point: pt.point }) });
}

// --- A − B ---------------------------------------------------------------------------------------------------------

const sameNames = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

// The difference panel of two heatmaps with identical rows and columns, or the reason there is none.
function differencePanel(a, b, note) {
  if (a.kind !== "heatmap" || b?.kind !== "heatmap") return { reason: "only heatmaps are subtracted" };
  if (!sameNames(a.rows, b.rows) || !sameNames(a.cols, b.cols)) return { reason: "the two heatmaps have different rows or columns" };
  const values = a.values.map((row, r) => row.map((v, c) => (finite(v) && finite(b.values[r]?.[c]) ? v - b.values[r][c] : null)));
  const bound = niceCeil(Math.max(0, ...values.flat().filter(finite).map(Math.abs)));
  const panel = {
    ...a,
    values,
    error: null,
    null: null,
    marked: null,
    vmin: -bound,
    vmax: bound,
    cmap: "diverging",
    colorbar: `A − B (${a.colorbar || "value"})`,
    title: `${a.title ? `${a.title}: ` : ""}A − B${note}`,
  };
  return { panel };
}

// --- history chart -------------------------------------------------------------------------------------------------

function drawHistory(histories, currentStep, head) {
  const width = 640;
  const height = 170;
  const [left, right, top, bottom] = [54, 240, 22, 34];
  const steps = histories.flatMap((hs) => hs.data.steps);
  const [s0, s1] = steps.length ? [Math.min(...steps), Math.max(...steps)] : [0, 1];
  const x = scale(s0, s1, 0, width);
  const values = histories.flatMap((hs) =>
    hs.data.series.flatMap((sr) => sr.values.flatMap((v, i) => [v, v + (sr.error?.[i] ?? 0), v - (sr.error?.[i] ?? 0)])),
  );
  const yDomain = extent(values, histories.flatMap((hs) => [...(hs.data.null || []), ...(hs.data.lines || []).map((l) => l.value)]));
  const y = scale(yDomain[0], yDomain[1], height, 0);
  const path = (pts) => pts.map(([st, v]) => `${x(st)},${y(v)}`).join(" ");
  const first = histories[0].data;
  const svg = s("svg", { width: left + width + right, height: top + height + bottom });
  svg.append(s("text", { x: left, y: 14, class: "title" }, `${first.label}: ${first.y_label || "value"} over steps`));
  const plot = s("g", { transform: `translate(${left},${top})` });
  svg.append(plot);
  plot.append(s("rect", { width, height, fill: "#fff", stroke: "#bdbdbd" }));
  for (const t of niceTicks(yDomain[0], yDomain[1], 4)) {
    plot.append(s("line", { x1: 0, x2: width, y1: y(t), y2: y(t), stroke: "#eeeeee" }));
    plot.append(s("text", { x: -6, y: y(t) + 4, "text-anchor": "end" }, tick(t)));
  }
  for (const t of niceTicks(s0, s1, 6).filter(Number.isInteger)) {
    plot.append(s("text", { x: x(t), y: height + 16, "text-anchor": "middle" }, String(t)));
  }
  plot.append(s("text", { x: width / 2, y: height + 30, "text-anchor": "middle" }, "step"));
  if (finite(currentStep)) {
    plot.append(s("line", { x1: x(currentStep), x2: x(currentStep), y1: 0, y2: height, stroke: "#ff1744", class: "current-step" }));
  }
  const legend = []; // [color, text, dash, marker]
  histories.forEach((hs, hi) => {
    const d = hs.data;
    const dashArray = hi === 0 ? null : "5 3"; // run B dashed
    const who = histories.length > 1 ? `${hs.name} ` : "";
    const nulls = d.steps.map((st, i) => [st, d.null?.[i]]).filter(([, v]) => finite(v));
    if (nulls.length) {
      plot.append(s("polyline", { points: path(nulls), fill: "none", stroke: "#9e9e9e", "stroke-dasharray": "2 3" }));
      legend.push(["#9e9e9e", `${who}null threshold`, "2 3"]);
    }
    if (hi === 0) {
      for (const line of d.lines || []) {
        if (!finite(line.value)) continue;
        plot.append(s("line", { x1: 0, x2: width, y1: y(line.value), y2: y(line.value), stroke: "#616161", "stroke-dasharray": dash[line.style] }));
        legend.push(["#616161", line.label, dash[line.style]]);
      }
    }
    const dots = d.kind === "dots" && head != null;
    d.series.forEach((sr, si) => {
      // dots: the pointed-at head stands out, the layer's other heads stay in grey for context
      const faint = dots && si !== head;
      // run B in the next colours, so that A and B differ by more than the dashes
      const n = d.series.length * histories.length;
      const color = dots ? (faint ? "#9e9e9e" : PALETTE[hi]) : seriesColor(si + hi * d.series.length, n);
      const opacity = faint ? 0.45 : 1;
      const pts = d.steps.map((st, i) => [st, sr.values[i], sr.error?.[i], d.marked?.[i]]).filter(([, v]) => finite(v));
      if (pts.some(([, , e]) => finite(e))) {
        const band = [...pts.map(([st, v, e]) => [st, v + (e ?? 0)]), ...pts.map(([st, v, e]) => [st, v - (e ?? 0)]).reverse()];
        plot.append(s("polygon", { points: path(band), fill: color, "fill-opacity": 0.15 }));
      }
      const line = { fill: "none", stroke: color, "stroke-width": faint ? 1 : 2, "stroke-opacity": opacity, "stroke-dasharray": dashArray };
      plot.append(s("polyline", { points: path(pts), ...line }));
      for (const [st, v, , marked] of pts) {
        const dot = { cx: x(st), cy: y(v), r: marked ? 3.5 : 2.5, stroke: color, "stroke-opacity": opacity };
        plot.append(s("circle", { ...dot, fill: marked ? "#fff" : color, "fill-opacity": opacity, class: "history-point" }));
      }
      if (!faint) legend.push([color, `${who}${sr.label || ""}`, dashArray]);
    });
    if (dots && d.series.length > 1) legend.push(["#9e9e9e", `${who}other heads`, dashArray]);
    if (hi === 0 && d.marked?.some(Boolean)) legend.push(["#616161", "indistinguishable from the null", null, true]);
  });
  legend.slice(0, 10).forEach(([color, text, dashArray, marker], i) => {
    const [lx, ly] = [left + width + 12, top + 8 + i * 16];
    if (marker) svg.append(s("circle", { cx: lx + 9, cy: ly, r: 3.5, fill: "#fff", stroke: color }));
    else svg.append(s("line", { x1: lx, x2: lx + 18, y1: ly, y2: ly, stroke: color, "stroke-width": 2, "stroke-dasharray": dashArray }));
    svg.append(s("text", { x: lx + 22, y: ly + 4 }, text));
  });
  return svg;
}

// --- the dashboard -------------------------------------------------------------------------------------------------

class Dashboard {
  constructor(root) {
    this.root = root;
    this.runs = [];
    this.samplesHint = null;
    this.runA = "";
    this.runB = "";
    this.tag = "";
    this.stepsA = [];
    this.stepsB = [];
    this.index = 0;
    this.zoom = 1;
    this.allowDifference = false;
    this.hover = null;
    this.figures = new Map(); // "run\ntag\nstep" -> figure response, a few dozen at most
    this.histories = new Map();
    this.token = 0;
    this.build();
  }

  build() {
    const el = (this.el = {});
    el.runA = h("select", { onchange: () => this.setRunA(el.runA.value), title: "run A" });
    el.runB = h("select", { onchange: () => this.setRunB(el.runB.value), title: "run B: shown beside A, with A − B" });
    el.tag = h("select", { onchange: () => this.setTag(el.tag.value), title: "figure" });
    el.play = h("button", { onclick: () => this.togglePlay(), title: "play through the steps" }, "▶");
    el.slider = h("input", { type: "range", min: 0, max: 0, value: 0, step: 1, oninput: () => this.setIndex(+el.slider.value) });
    el.step = h("span", { className: "step" }, "");
    el.zoom = h("select", { onchange: () => ((this.zoom = +el.zoom.value), this.draw()), title: "heatmap size" });
    for (const z of [1, 1.5, 2, 3, 4, 6]) el.zoom.append(h("option", { value: z }, `${z}×`));
    el.reload = h("button", { onclick: () => this.reload(), title: "reload runs and steps" }, "↻");
    el.bar = h(
      "div",
      { className: "bar" },
      h("label", {}, "Run", el.runA),
      h("label", {}, "vs", el.runB),
      h("label", {}, "Figure", el.tag),
      h("span", {}, el.play, " ", el.slider),
      el.step,
      h("label", {}, "Zoom", el.zoom),
      el.reload,
    );
    el.messages = h("div");
    el.main = h("div");
    el.history = h("div", { className: "history" });
    el.tooltip = h("div", { className: "tooltip" });
    el.footer = h("div", { className: "note" });
    this.root.append(h("style", {}, CSS), el.bar, el.messages, el.main, el.history, el.footer, el.tooltip);
    setInterval(() => this.poll(), POLL_MS);
    // only a new width changes the layout; screenshots and zooming the browser fire resize events without one
    window.addEventListener("resize", () => {
      clearTimeout(this.resizeTimer);
      this.resizeTimer = setTimeout(() => {
        if (document.body.clientWidth !== this.drawnWidth) this.draw();
      }, 200);
    });
  }

  status(value) {
    document.body.dataset.status = value; // for tests and screenshots: "loading", "ready", "empty" or "error"
  }

  showError(error) {
    this.el.messages.replaceChildren(h("div", { className: "error" }, String(error.message || error)));
    this.status("error");
  }

  async start() {
    try {
      await this.loadRuns();
    } catch (e) {
      this.showError(e);
    }
  }

  async loadRuns() {
    this.status("loading");
    const body = await getJSON("runs");
    this.runs = body.runs;
    this.samplesHint = body.samples_per_plugin;
    const skipped = body.skipped?.length ? ` ${body.skipped.length} figure series written by a newer lightning-cka were skipped.` : "";
    this.el.footer.textContent =
      (this.samplesHint == null
        ? "TensorBoard keeps a random sample of steps per figure (10 with --load_fast=false, 100 with the fast loader); " +
          "start it with --samples_per_plugin lightning_cka=0 to keep every probe."
        : this.samplesHint === 0
          ? "TensorBoard keeps every step of each figure (--samples_per_plugin lightning_cka=0)."
          : `TensorBoard keeps at most ${this.samplesHint} steps of each figure (--samples_per_plugin).`) + skipped;
    if (!this.runs.length) return this.showEmpty();
    const names = this.runs.map((r) => r.run);
    if (!names.includes(this.runA)) this.runA = names[0];
    if (!names.includes(this.runB)) this.runB = "";
    this.fillRunSelectors();
    await this.setRunA(this.runA, true);
  }

  showEmpty() {
    this.el.main.replaceChildren(
      h(
        "div",
        { className: "empty" },
        h("h2", {}, "No lightning-cka figures in this logdir yet"),
        h(
          "p",
          {},
          "The CKA tab shows the figures CKAMonitor writes as tensor summaries at every probe step. " +
            "Runs logged by older versions of lightning-cka hold only images and .npz arrays: rerun them, or convert them " +
            "(see the CLI docs). Press ↻ once a probe has run.",
        ),
      ),
    );
    this.el.history.replaceChildren();
    this.status("empty");
  }

  fillRunSelectors() {
    const options = (exclude) => this.runs.filter((r) => r.run !== exclude).map((r) => h("option", { value: r.run }, r.run));
    this.el.runA.replaceChildren(...options(null));
    this.el.runA.value = this.runA;
    this.el.runB.replaceChildren(h("option", { value: "" }, "— none —"), ...options(this.runA));
    this.el.runB.value = this.runB;
  }

  tagsOf(run) {
    return this.runs.find((r) => r.run === run)?.tags || [];
  }

  fillTagSelector() {
    const tags = this.tagsOf(this.runA);
    // figures grouped by the monitor that wrote them: "coarse/cka/intra" is cka/intra of the monitor named coarse
    const groups = new Map();
    for (const t of tags) {
      const parts = t.tag.split("/");
      const prefix = parts.length > 2 ? parts.slice(0, -2).join("/") : "";
      if (!groups.has(prefix)) groups.set(prefix, []);
      groups.get(prefix).push(t);
    }
    this.el.tag.replaceChildren(
      ...[...groups].map(([prefix, members]) =>
        h(
          "optgroup",
          { label: prefix ? `monitor “${prefix}”` : "monitor" },
          ...members.map((t) => h("option", { value: t.tag, title: t.title }, prefix ? t.tag.slice(prefix.length + 1) : t.tag)),
        ),
      ),
    );
    const known = tags.map((t) => t.tag);
    if (!known.includes(this.tag)) this.tag = known.includes("cka/intra") ? "cka/intra" : known[0] || "";
    this.el.tag.value = this.tag;
  }

  async setRunA(run, keepStep = false) {
    this.runA = run;
    if (this.runB === run) this.runB = "";
    this.fillRunSelectors();
    this.fillTagSelector();
    await this.loadSteps(keepStep);
  }

  async setRunB(run) {
    this.runB = run;
    await this.loadSteps(true);
  }

  async setTag(tag) {
    this.tag = tag;
    this.hover = null;
    this.el.history.replaceChildren();
    await this.loadSteps(true);
  }

  async loadSteps(keepStep) {
    const previous = this.stepsA[this.index];
    try {
      this.status("loading");
      this.stepsA = this.tag ? (await getJSON(query("steps", { run: this.runA, tag: this.tag }))).steps : [];
      const bHasTag = this.runB && this.tagsOf(this.runB).some((t) => t.tag === this.tag);
      this.stepsB = bHasTag ? (await getJSON(query("steps", { run: this.runB, tag: this.tag }))).steps : [];
    } catch (e) {
      return this.showError(e);
    }
    const kept = keepStep ? this.stepsA.indexOf(previous) : -1;
    this.index = kept >= 0 ? kept : Math.max(0, this.stepsA.length - 1);
    this.el.slider.max = Math.max(0, this.stepsA.length - 1);
    this.el.slider.value = this.index;
    await this.draw();
  }

  async reload() {
    this.figures.clear();
    this.histories.clear();
    try {
      await this.loadRuns();
    } catch (e) {
      this.showError(e);
    }
  }

  // New probes of a live run: follow them when the slider is at the last step.
  async poll() {
    if (!this.runA || !this.tag || this.timer) return;
    try {
      const steps = (await getJSON(query("steps", { run: this.runA, tag: this.tag }))).steps;
      if (steps.length === this.stepsA.length && steps.at(-1) === this.stepsA.at(-1)) return;
      const atEnd = this.index === this.stepsA.length - 1;
      this.histories.clear();
      await this.loadRuns();
      if (atEnd) this.setIndex(this.stepsA.length - 1);
    } catch {
      // a failed background poll says nothing new; the next explicit action reports errors
    }
  }

  setIndex(i) {
    this.index = Math.max(0, Math.min(i, this.stepsA.length - 1));
    this.el.slider.value = this.index;
    return this.draw();
  }

  togglePlay() {
    if (this.timer) {
      clearInterval(this.timer);
      this.timer = null;
      this.el.play.textContent = "▶";
      return;
    }
    if (this.index >= this.stepsA.length - 1) this.setIndex(0);
    this.el.play.textContent = "❚❚";
    this.timer = setInterval(() => {
      if (this.index >= this.stepsA.length - 1) return this.togglePlay();
      this.setIndex(this.index + 1);
    }, PLAY_MS);
  }

  async figure(run, step) {
    const key = `${run}\n${this.tag}\n${step}`;
    if (!this.figures.has(key)) {
      this.figures.set(key, getJSON(query("figure", { run, tag: this.tag, step })));
      if (this.figures.size > 48) this.figures.delete(this.figures.keys().next().value);
    }
    try {
      return await this.figures.get(key);
    } catch (e) {
      this.figures.delete(key);
      throw e;
    }
  }

  async draw() {
    const token = ++this.token;
    const stepA = this.stepsA[this.index];
    const stepB = nearest(this.stepsB, stepA);
    this.el.step.textContent = this.stepsA.length ? `step ${stepA} · ${this.index + 1}/${this.stepsA.length}` : "no steps";
    document.body.dataset.step = stepA ?? "";
    if (stepA == null) {
      this.el.main.replaceChildren(h("p", { className: "note" }, this.tag ? "This figure has no steps." : "This run has no figures."));
      return this.status("ready");
    }
    let a;
    let b = null;
    try {
      this.status("loading");
      [a, b] = await Promise.all([this.figure(this.runA, stepA), stepB == null ? null : this.figure(this.runB, stepB)]);
    } catch (e) {
      if (token === this.token) this.showError(e);
      return;
    }
    if (token !== this.token) return; // a later step was asked for meanwhile
    this.el.messages.replaceChildren();
    if (this.timer && this.index + 1 < this.stepsA.length) this.figure(this.runA, this.stepsA[this.index + 1]).catch(() => {});
    this.render(a, b, stepA);
    this.status("ready");
  }

  render(a, b, stepA) {
    this.el.tooltip.style.display = "none"; // its element is being replaced
    const fig = a.figure;
    const compare = Boolean(this.runB);
    const blocksPerRow = compare ? 3 : 1;
    this.drawnWidth = document.body.clientWidth;
    const available = Math.max(480, this.drawnWidth - 40);
    const panelsPerBlock = Math.max(1, fig.panels.filter((p) => p.kind === "heatmap").length);
    // a heatmap's labels and colour bar take about 190 px beside its cells
    const side = Math.max(120, Math.min(440, available / blocksPerRow / Math.min(panelsPerBlock, 4) - 190)) * this.zoom;
    const main = [h("h2", {}, fig.title || a.tag), fig.caption ? h("p", { className: "caption" }, fig.caption) : null];
    const blocks = h("div", { className: "blocks" });
    const hover = (element, html, event) => this.onHover(element, html, event);
    const panelsOf = (figure, tip) =>
      h(
        "div",
        { className: "panels" },
        ...figure.panels.map((p, index) => drawPanel(p, { index, cellSide: side, zoom: this.zoom, onHover: hover, tip: tip?.(index) })),
      );
    const header = (label, response) => h("h3", {}, `${label} · ${response.run} · step ${response.step}`);
    blocks.append(h("div", { className: "block" }, compare ? header("A", a) : null, panelsOf(fig)));
    if (compare && !b) {
      blocks.append(h("div", { className: "block" }, h("h3", {}, `B · ${this.runB}`), h("p", { className: "note" }, `no figure ${this.tag} in this run`)));
    }
    if (b) {
      const nearestNote = b.step !== stepA ? ` (nearest to ${stepA})` : "";
      blocks.append(h("div", { className: "block" }, h("h3", {}, `B · ${b.run} · step ${b.step}${nearestNote}`), panelsOf(b.figure)));
      const diff = this.differenceBlock(fig, b.figure, side);
      if (diff.block) blocks.append(diff.block);
      if (diff.message) main.push(diff.message);
    }
    main.push(blocks);
    this.el.main.replaceChildren(...main.filter(Boolean));
    this.drawHistory();
  }

  differenceBlock(figA, figB, side) {
    const probeA = figA.meta?.probe;
    const probeB = figB.meta?.probe;
    let note = "";
    let message = null;
    if (!probeA || !probeB || probeA !== probeB) {
      const why = !probeA || !probeB ? "a run does not record its probe images" : `the runs used different probe images (${probeA} vs ${probeB})`;
      const box = h("input", { type: "checkbox", checked: this.allowDifference, onchange: () => ((this.allowDifference = box.checked), this.draw()) });
      message = h(
        "div",
        { className: "refused" },
        h("span", { className: "reason" }, `A − B not shown: ${why}, so the cells are not comparable.`),
        h("label", {}, box, " show it anyway"),
      );
      if (!this.allowDifference) return { message };
      note = " (different probe images)";
    }
    const panels = [];
    const reasons = new Set();
    figA.panels.forEach((p, index) => {
      if (p.kind !== "heatmap") return;
      const { panel, reason } = differencePanel(p, figB.panels[index], note);
      if (reason) return reasons.add(reason);
      const tip = (r, c) => {
        const [va, vb] = [p.values[r]?.[c], figB.panels[index].values[r]?.[c]];
        const se = (q) => (finite(q) ? ` ± ${fmt(q)}` : "");
        return [
          `A <b>${fmt(va)}</b>${se(p.error?.[r]?.[c])}`,
          `B <b>${fmt(vb)}</b>${se(figB.panels[index].error?.[r]?.[c])}`,
          `A − B <b class="value">${fmt(panel.values[r][c])}</b>`,
        ];
      };
      panels.push(drawPanel(panel, { index, cellSide: side, zoom: this.zoom, onHover: (e, html, ev) => this.onHover(e, html, ev), tip }));
    });
    if (!panels.length) {
      const reason = reasons.size ? [...reasons].join("; ") : "this figure has no heatmap";
      return { message: message ?? h("div", { className: "refused" }, h("span", { className: "reason" }, `A − B not shown: ${reason}.`)) };
    }
    return { message, block: h("div", { className: "block difference" }, h("h3", {}, `A − B${note}`), h("div", { className: "panels" }, ...panels)) };
  }

  onHover(element, html, event) {
    const tip = this.el.tooltip;
    if (!element) {
      tip.style.display = "none";
      return;
    }
    tip.innerHTML = html;
    tip.style.display = "block";
    const [w, hgt] = [tip.offsetWidth, tip.offsetHeight];
    tip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - w - 4)}px`;
    tip.style.top = `${Math.min(event.clientY + 14, window.innerHeight - hgt - 4)}px`;
    const key = JSON.stringify(element);
    if (key === JSON.stringify(this.hover)) return;
    this.hover = element; // stays after the pointer leaves, so the history chart can be read
    clearTimeout(this.hoverTimer);
    this.hoverTimer = setTimeout(() => this.drawHistory(), 120);
  }

  async history(run, element) {
    const key = `${run}\n${this.tag}\n${element.panel}\n${JSON.stringify(element.args)}`; // one fetch for all heads
    if (!this.histories.has(key)) {
      this.histories.set(key, getJSON(query("history", { run, tag: this.tag, panel: element.panel, ...element.args })));
    }
    return this.histories.get(key);
  }

  async drawHistory() {
    const element = this.hover;
    if (!element) return;
    const runs = [["A", this.runA]];
    if (this.runB && this.stepsB.length) runs.push(["B", this.runB]);
    const token = (this.historyToken = (this.historyToken || 0) + 1);
    const results = await Promise.all(runs.map(([name, run]) => this.history(run, element).then((data) => ({ name, data }), (error) => ({ name, error }))));
    if (token !== this.historyToken) return;
    const ok = results.filter((r) => r.data);
    if (!ok.length) {
      this.el.history.replaceChildren(h("div", { className: "error" }, `history: ${results[0].error.message}`));
      return;
    }
    this.el.history.replaceChildren(drawHistory(ok, this.stepsA[this.index], element.head ?? null));
  }
}

function nearest(steps, step) {
  if (!steps.length || step == null) return null;
  return steps.reduce((best, s_) => (Math.abs(s_ - step) < Math.abs(best - step) ? s_ : best), steps[0]);
}

export async function render() {
  document.title = "CKA";
  await new Dashboard(document.body).start();
}

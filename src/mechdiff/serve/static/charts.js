// mechdiff explorer: DOM helpers and SVG charts (line charts with hover and drag-to-zoom on the
// x axis, grouped bar charts with hover). Every text goes in through textContent / attributes,
// never through innerHTML.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;      // CSSOM: allowed by the page's CSP, a style attribute is not
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "n/a";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : String(Number(v.toPrecision(4)));
  }
  if (Array.isArray(v)) return "[" + v.map(fmt).join(", ") + "]";
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => k + ": " + fmt(x)).join("; ");
  return String(v);
}

const tooltip = {
  show(ev, text) {
    const t = document.getElementById("tooltip");
    t.textContent = text;
    t.hidden = false;
    t.style.left = Math.min(ev.clientX + 14, window.innerWidth - 320) + "px";
    t.style.top = (ev.clientY + 14) + "px";
  },
  hide() { document.getElementById("tooltip").hidden = true; },
};

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function legend(items) {
  return el("div", {class: "legend"}, items.map(it => el("span", {},
    el("span", {class: "sw", style: `background:${it.color};opacity:${it.dash ? 0.6 : 1}`}), it.name)));
}

const W = 520, H = 250, M = {l: 56, r: 12, t: 10, b: 34};

// opts: {title, xlabel, ylabel, series: [{name, color, x, y, lo?, hi?, err?, dash?}],
//        vlines: [{x, label, color, dash}], hlines: [{y, label, color, dash}], hspan: {lo, hi, label},
//        vspans: [{x0, x1, color}], integerX}
function lineChart(opts) {
  const box = el("div", {class: "chart", "data-chart": opts.id || opts.title});
  const head = el("div", {class: "ctitle"}, opts.title);
  const reset = el("button", {type: "button", hidden: true}, "reset zoom");
  box.append(head);
  const root = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  box.append(root, el("div", {}, reset, el("span", {class: "note"}, " drag across the plot to zoom on layers; hover for values")),
             legend(opts.series.map(s => ({name: s.name, color: s.color, dash: s.dash}))));
  const allX = [...new Set(opts.series.flatMap(s => s.x.filter(v => v !== null)))].sort((a, b) => a - b);
  if (!allX.length) { box.append(el("p", {class: "note"}, "no data")); return box; }
  const full = [allX[0], allX[allX.length - 1]];
  let view = full.slice();
  function draw() {
    while (root.firstChild) root.removeChild(root.firstChild);
    let [x0, x1] = view;
    if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
    const xpad = (x1 - x0) * 0.03;
    const ys = [];
    for (const s of opts.series) s.x.forEach((x, i) => {
      if (x === null || x < x0 || x > x1 || s.y[i] === null) return;
      ys.push(s.y[i]);
      if (s.err && s.err[i] !== null) ys.push(s.y[i] - s.err[i], s.y[i] + s.err[i]);
      if (s.lo && s.lo[i] !== null) ys.push(s.lo[i]);
      if (s.hi && s.hi[i] !== null) ys.push(s.hi[i]);
    });
    for (const h of opts.hlines || []) if (h.y !== null && h.y !== undefined) ys.push(h.y);
    if (opts.hspan) ys.push(opts.hspan.lo, opts.hspan.hi);
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (!(y1 > y0)) { y0 -= 0.5; y1 += 0.5; }
    const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
    const X = x => M.l + (x - x0 + xpad) / (x1 - x0 + 2 * xpad) * (W - M.l - M.r);
    const Y = y => H - M.b - (y - y0) / (y1 - y0) * (H - M.t - M.b);
    const clipId = "c" + Math.random().toString(36).slice(2);
    const defs = svg("defs"); const cp = svg("clipPath", {id: clipId});
    cp.append(svg("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b})); defs.append(cp); root.append(defs);
    const g = svg("g", {"clip-path": `url(#${clipId})`});
    for (const v of niceTicks(y0, y1, 5)) {
      root.append(svg("line", {x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v), stroke: "#eee"}));
      root.append(svg("text", {x: M.l - 4, y: Y(v) + 3, "text-anchor": "end"}, fmt(v)));
    }
    const xt = opts.integerX ? niceTicks(x0, x1, 8).filter(Number.isInteger) : niceTicks(x0, x1, 8);
    for (const v of xt) root.append(svg("text", {x: X(v), y: H - M.b + 13, "text-anchor": "middle"}, fmt(v)));
    root.append(svg("text", {x: (W + M.l) / 2, y: H - 4, "text-anchor": "middle"}, opts.xlabel || ""));
    root.append(svg("text", {x: 12, y: (H - M.b) / 2, transform: `rotate(-90 12 ${(H - M.b) / 2})`, "text-anchor": "middle"}, opts.ylabel || ""));
    root.append(svg("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: "none", stroke: "#999"}));
    for (const s of opts.vspans || [])
      g.append(svg("rect", {x: X(s.x0), y: M.t, width: Math.max(1, X(s.x1) - X(s.x0)), height: H - M.t - M.b, fill: s.color || "gold", opacity: 0.2}));
    if (opts.hspan) g.append(svg("rect", {x: M.l, width: W - M.l - M.r, y: Y(opts.hspan.hi), height: Math.max(1, Y(opts.hspan.lo) - Y(opts.hspan.hi)), fill: "#2ca02c", opacity: 0.13}));
    for (const h of opts.hlines || []) if (h.y !== null && h.y !== undefined)
      g.append(svg("line", {x1: M.l, x2: W - M.r, y1: Y(h.y), y2: Y(h.y), stroke: h.color || "#555", "stroke-dasharray": h.dash || "2 3"}));
    for (const v of opts.vlines || []) if (v.x !== null && v.x !== undefined)
      g.append(svg("line", {x1: X(v.x), x2: X(v.x), y1: M.t, y2: H - M.b, stroke: v.color || "#555", "stroke-dasharray": v.dash || "5 3"}));
    for (const s of opts.series) {
      const pts = s.x.map((x, i) => [x, s.y[i], i]).filter(p => p[0] !== null && p[1] !== null);
      if (s.lo && s.hi) {
        const b = pts.filter(p => s.lo[p[2]] !== null && s.hi[p[2]] !== null);
        if (b.length) {
          const d = b.map((p, j) => (j ? "L" : "M") + X(p[0]) + " " + Y(s.hi[p[2]])).join(" ") + " " +
            b.slice().reverse().map(p => "L" + X(p[0]) + " " + Y(s.lo[p[2]])).join(" ") + " Z";
          g.append(svg("path", {d, fill: s.bandColor || s.color, opacity: 0.18, stroke: "none"}));
        }
      }
      if (s.bandOnly) continue;
      g.append(svg("path", {d: pts.map((p, j) => (j ? "L" : "M") + X(p[0]) + " " + Y(p[1])).join(" "), fill: "none",
                            stroke: s.color, "stroke-width": 1.6, "stroke-dasharray": s.dash ? "5 3" : null}));
      for (const p of pts.filter(q => q[0] >= x0 && q[0] <= x1)) {
        if (s.err && s.err[p[2]] !== null)
          g.append(svg("line", {x1: X(p[0]), x2: X(p[0]), y1: Y(p[1] - s.err[p[2]]), y2: Y(p[1] + s.err[p[2]]), stroke: s.color}));
        const big = (s.marked || []).includes(p[0]);
        g.append(svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: big ? 4.5 : 2.6, fill: big ? "#d62728" : s.color}));
      }
    }
    root.append(g);
    const guide = svg("line", {y1: M.t, y2: H - M.b, stroke: "#000", "stroke-width": 0.6, visibility: "hidden"});
    const brush = svg("rect", {y: M.t, height: H - M.t - M.b, fill: "#1f77b4", opacity: 0.15, visibility: "hidden"});
    root.append(guide, brush);
    const overlay = svg("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: "transparent", class: "overlay"});
    root.append(overlay);
    const toData = ev => { const r = root.getBoundingClientRect(); return x0 - xpad + (ev.clientX - r.left - M.l) / (W - M.l - M.r) * (x1 - x0 + 2 * xpad); };
    let dragFrom = null;
    overlay.addEventListener("mousedown", ev => { dragFrom = toData(ev); ev.preventDefault(); });
    overlay.addEventListener("mousemove", ev => {
      const xv = toData(ev);
      if (dragFrom !== null) {
        const a = Math.min(dragFrom, xv), b = Math.max(dragFrom, xv);
        brush.setAttribute("x", X(a)); brush.setAttribute("width", X(b) - X(a)); brush.setAttribute("visibility", "visible");
      }
      const vis = allX.filter(x => x >= x0 && x <= x1);
      if (!vis.length) return;
      const near = vis.reduce((a, b) => Math.abs(b - xv) < Math.abs(a - xv) ? b : a);
      guide.setAttribute("x1", X(near)); guide.setAttribute("x2", X(near)); guide.setAttribute("visibility", "visible");
      const lines = [(opts.xlabel || "x") + " " + fmt(near)];
      for (const s of opts.series) {
        const i = s.x.indexOf(near);
        if (i < 0 || s.y[i] === null || s.bandOnly) continue;
        let t = s.name + ": " + fmt(s.y[i]);
        if (s.err && s.err[i] !== null) t += " ± " + fmt(s.err[i]);
        if (s.lo && s.hi && s.lo[i] !== null) t += " [" + fmt(s.lo[i]) + ", " + fmt(s.hi[i]) + "]";
        lines.push(t);
      }
      tooltip.show(ev, lines.join("\n"));
    });
    overlay.addEventListener("mouseleave", () => { guide.setAttribute("visibility", "hidden"); tooltip.hide(); });
    const finish = ev => {
      if (dragFrom === null) return;
      const a = Math.min(dragFrom, toData(ev)), b = Math.max(dragFrom, toData(ev));
      dragFrom = null; brush.setAttribute("visibility", "hidden");
      const inside = allX.filter(x => x >= a && x <= b);
      if (inside.length >= 1 && b - a > (x1 - x0) / 100) { view = [inside[0], inside[inside.length - 1]]; reset.hidden = false; draw(); }
    };
    overlay.addEventListener("mouseup", finish);
    overlay.addEventListener("dblclick", () => { view = full.slice(); reset.hidden = true; draw(); });
  }
  reset.addEventListener("click", () => { view = full.slice(); reset.hidden = true; draw(); });
  box.zoom = (a, b) => { view = [a, b]; reset.hidden = false; draw(); };
  draw();
  return box;
}

// opts: {title, ylabel, labels, series: [{name, color, values, err?}], hlines}
function barChart(opts) {
  const box = el("div", {class: "chart", "data-chart": opts.id || opts.title}, el("div", {class: "ctitle"}, opts.title));
  const n = opts.labels.length, k = Math.max(1, opts.series.length);
  const h = H + 50, root = svg("svg", {width: W, height: h, viewBox: `0 0 ${W} ${h}`});
  box.append(root, legend(opts.series));
  if (!n) { box.append(el("p", {class: "note"}, "no data")); return box; }
  const ys = [0, ...opts.series.flatMap(s => s.values.map((v, i) => v === null ? 0 : v + (s.err && s.err[i] ? Math.sign(v || 1) * s.err[i] : 0)))];
  for (const l of opts.hlines || []) ys.push(l.y);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (!(y1 > y0)) y1 = y0 + 1;
  const pad = (y1 - y0) * 0.06; y1 += pad; if (y0 < 0) y0 -= pad;
  const bottom = h - M.b - 50;
  const Y = y => bottom - (y - y0) / (y1 - y0) * (bottom - M.t);
  const slot = (W - M.l - M.r) / n, bw = slot * 0.8 / k;
  for (const v of niceTicks(y0, y1, 5)) {
    root.append(svg("line", {x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v), stroke: "#eee"}));
    root.append(svg("text", {x: M.l - 4, y: Y(v) + 3, "text-anchor": "end"}, fmt(v)));
  }
  root.append(svg("line", {x1: M.l, x2: W - M.r, y1: Y(0), y2: Y(0), stroke: "#555"}));
  root.append(svg("text", {x: 12, y: bottom / 2, transform: `rotate(-90 12 ${bottom / 2})`, "text-anchor": "middle"}, opts.ylabel || ""));
  opts.labels.forEach((lab, i) => {
    const cx = M.l + slot * (i + 0.5), short = lab.length > 22 ? lab.slice(0, 21) + "…" : lab;
    const t = svg("text", {x: cx, y: bottom + 12, "text-anchor": "end", transform: `rotate(-25 ${cx} ${bottom + 12})`}, short);
    t.append(svg("title", {}, lab));
    root.append(t);
    opts.series.forEach((s, j) => {
      const v = s.values[i];
      if (v === null || v === undefined) return;
      const x = M.l + slot * i + slot * 0.1 + bw * j;
      const bar = svg("rect", {x, width: Math.max(1, bw - 1), y: Math.min(Y(v), Y(0)), height: Math.abs(Y(v) - Y(0)), fill: s.color, class: "bar"});
      const e = s.err ? s.err[i] : null;
      bar.addEventListener("mousemove", ev => tooltip.show(ev, lab + "\n" + s.name + ": " + fmt(v) + (e !== null && e !== undefined ? " ± " + fmt(e) : "")));
      bar.addEventListener("mouseleave", () => tooltip.hide());
      root.append(bar);
      if (e !== null && e !== undefined) root.append(svg("line", {x1: x + bw / 2, x2: x + bw / 2, y1: Y(v - e), y2: Y(v + e), stroke: "#222"}));
    });
  });
  for (const l of opts.hlines || []) root.append(svg("line", {x1: M.l, x2: W - M.r, y1: Y(l.y), y2: Y(l.y), stroke: l.color || "#555", "stroke-dasharray": "2 3"}));
  return box;
}

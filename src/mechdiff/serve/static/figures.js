// Figures A-D from the JSON the server sends (report.figures.figure_data per run); several runs overlay.
"use strict";

function colourOf(j, multi, i) { return PALETTE[(multi ? j : i) % PALETTE.length]; }

function figureA(runs) {
  const multi = runs.length > 1, cka = [], patch = [], vlines = [], hlines = [], vspans = [];
  let marked = [];
  runs.forEach((r, j) => {
    const c = colourOf(j, multi, 0), pre = multi ? r.label + ": " : "";
    if (r.cka) {
      const nm = r.cka.null_mean, ns = r.cka.null_sd;
      if (nm && !multi) cka.push({name: "independence null (rows shuffled) ± 2 sd", color: "#999", bandOnly: true, x: r.cka.layers,
        y: nm, lo: nm.map((m, i) => m === null ? null : m - 2 * (ns[i] || 0)), hi: nm.map((m, i) => m === null ? null : m + 2 * (ns[i] || 0))});
      cka.push({name: pre + "debiased CKA (95% CI)", color: c, x: r.cka.layers, y: r.cka.debiased, lo: r.cka.ci_low, hi: r.cka.ci_high});
    }
    if (r.patch) {
      patch.push({name: pre + "patch KL (mean ± SE)", color: c, x: r.patch.layers, y: r.patch.mean, err: r.patch.se,
                  marked: multi ? [] : (r.chosen || [])});
      if (r.patch.floor !== null && r.patch.floor !== undefined) hlines.push({y: r.patch.floor, color: multi ? c : "#333"});
    }
    if (r.entry !== null && r.entry !== undefined) vlines.push({x: r.entry, color: c});
    if (!multi && r.control !== null && r.control !== undefined) vlines.push({x: r.control, color: "#888", dash: "2 2"});
    if (!multi) for (const l of r.planted || []) vspans.push({x0: l - 0.5, x1: l + 0.5});
  });
  const out = [];
  if (cka.length) out.push(lineChart({id: "A-cka", title: "Figure A (top) — debiased CKA per layer", xlabel: "layer",
    ylabel: "debiased CKA", series: cka, vlines, vspans, integerX: true}));
  if (patch.length) out.push(lineChart({id: "A-patch", title: "Figure A (bottom) — cross-model patch KL per layer", xlabel: "layer",
    ylabel: "patch KL (nats)", series: patch, vlines, hlines, vspans, integerX: true}));
  return [out, "dashed: entry layer; dotted grey: control layer; red points: chosen layers; dotted horizontal: self-patch floor; shaded: planted layers."];
}

function figureB(runs) {
  const multi = runs.length > 1, pre = (r, s) => multi ? r.label + ": " + s : s;
  const maps = runs.flatMap(r => (r.maps || []).map(m => [pre(r, m.label), m]));
  const patch = runs.flatMap(r => (r.patch || []).map(p => [pre(r, p.label), p]));
  const out = [];
  if (maps.length) out.push(barChart({id: "B-maps", title: "Figure B (left) — map quality on held-out prompts", ylabel: "score (1 = perfect)",
    labels: maps.map(m => m[0]), series: [["R² (val)", "r2"], ["CKA(mapped, tuned)", "cka"], ["R² identity map", "identity_r2"],
      ["R² shuffled-target map", "shuffle_r2"]].map(([name, key], i) => ({name, color: PALETTE[i], values: maps.map(m => m[1][key] ?? null)}))}));
  if (patch.length) out.push(barChart({id: "B-patch", title: "Figure B (right) — mapped vs raw patch KL", ylabel: "KL (nats)",
    labels: patch.map(p => p[0]), series: [
      {name: "raw base state", color: PALETTE[0], values: patch.map(p => p[1].raw ?? null), err: patch.map(p => p[1].raw_se ?? null)},
      {name: "mapped state", color: PALETTE[1], values: patch.map(p => p[1].mapped ?? null), err: patch.map(p => p[1].mapped_se ?? null)}]}));
  return [out, "controls (bogus / shuffled maps) have no raw bar; error bars: ± 1 SE over prompts."];
}

function histogram(values, lo, hi, nb) {
  const c = new Array(nb).fill(0);
  for (const v of values) if (v !== null) c[Math.min(nb - 1, Math.floor((v - lo) / ((hi - lo) || 1e-9) * nb))]++;
  return c;
}

function figureC(runs) {
  const multi = runs.length > 1, share = [], side = [];
  let threshold = null, maxSide = null;
  runs.forEach((r, j) => {
    Object.entries(r.curves || {}).forEach(([name, cur], i) => {
      const c = colourOf(j, multi, Math.floor(i / 2)), dash = name.includes("random");
      const lab = multi ? r.label + ": " + name : name;
      share.push({name: lab, color: c, dash, x: cur.k, y: cur.share.map(v => v === null ? null : 100 * v)});
      if (!dash && cur.side) side.push({name: lab, color: c, x: cur.k, y: cur.side});
    });
    if (j === 0) { threshold = r.threshold; maxSide = r.max_side; }
  });
  const out = [];
  if (share.length) out.push(lineChart({id: "C-share", title: "Figure C — share of the base-tuned gap closed vs k", xlabel: "rank k",
    ylabel: "gap closed (%)", series: share, integerX: true,
    hlines: threshold === null || threshold === undefined ? [] : [{y: 100 * threshold}]}));
  if (side.length) out.push(lineChart({id: "C-side", title: "Figure C — neutral perplexity change vs k", xlabel: "rank k",
    ylabel: "perplexity change (%)", series: side, integerX: true,
    hspan: maxSide === null || maxSide === undefined ? null : {lo: -maxSide, hi: maxSide}}));
  const hs = runs.filter(r => r.heads);
  const vals = hs.flatMap(r => [...(r.heads.base || []), ...(r.heads.tuned || [])]).filter(v => v !== null);
  if (vals.length) {
    const lo = Math.min(...vals), hi = Math.max(...vals), nb = 16;
    const labels = Array.from({length: nb}, (_, i) => fmt(lo + (hi - lo) * (i + 0.5) / nb));
    const series = hs.flatMap((r, j) => ["base", "tuned"].map((s, i) => ({name: (multi ? r.label + ": " : "") + s,
      color: PALETTE[(2 * j + i) % PALETTE.length], values: histogram(r.heads[s] || [], lo, hi, nb)})));
    out.push(barChart({id: "C-heads", title: "Figure C — head importance (heads per bin): " + (hs[0].heads.xlabel || ""),
      ylabel: "heads", labels, series}));
  }
  return [out, "dashed: random bases of the same k; dotted: the target threshold; green band: the allowed side effect."];
}

function figureD(runs) {
  const multi = runs.length > 1, out = [];
  const measures = [...new Set(runs.flatMap(r => Object.keys(r.churn || {})))];
  if (measures.length) out.push(barChart({id: "D-churn", title: "Figure D — head churn per measurement", ylabel: "% of heads",
    labels: measures, series: runs.map((r, j) => ({name: r.label, color: PALETTE[j % PALETTE.length],
      values: measures.map(m => (r.churn || {})[m] === undefined || (r.churn || {})[m] === null ? null : 100 * r.churn[m])}))}));
  const cum = [];
  runs.forEach((r, j) => Object.entries(r.cumulative || {}).forEach(([name, cur], i) => {
    if (!cur.mean) return;
    const sd = cur.sd || cur.mean.map(() => null);
    cum.push({name: (multi ? r.label + ": " : "") + name, color: colourOf(j, multi, i), dash: multi && i > 0, x: cur.k, y: cur.mean,
              lo: cur.mean.map((m, t) => m === null || sd[t] === null ? null : m - sd[t]),
              hi: cur.mean.map((m, t) => m === null || sd[t] === null ? null : m + sd[t])});
  }));
  if (cum.length) out.push(lineChart({id: "D-cum", title: "Figure D — cumulative effect of the top-k heads (± 1 sd)",
    xlabel: "k (heads, by rank)", ylabel: "effect on the readout (" + (runs[0].unit || "readout units") + ")", series: cum, integerX: true}));
  return [out, ""];
}

// figs: [{A, B, C, D} per run] -> a section per figure (runs whose stage did not run are left out)
function figureSections(figs) {
  const parts = [];
  for (const [key, fn] of [["A", figureA], ["B", figureB], ["C", figureC], ["D", figureD]]) {
    const data = figs.map(f => f[key]).filter(Boolean);
    parts.push(el("h2", {id: "figure-" + key.toLowerCase()}, "Figure " + key));
    if (!data.length) { parts.push(el("p", {class: "note"}, "Figure " + key + ": its stage has not run here.")); continue; }
    const [charts, note] = fn(data);
    parts.push(el("div", {class: "figures"}, charts));
    if (note) parts.push(el("p", {class: "note"}, note));
  }
  return parts;
}

// mechdiff explorer: the router, the run selector, the Overview and Compare pages.
"use strict";

const state = {runs: [], run: 0};

async function api(path, init) {
  const r = await fetch(path, init);
  let body = null;
  try { body = await r.json(); } catch (e) { body = {error: "the server sent no JSON (" + r.status + ")"}; }
  if (!r.ok) throw new Error(body && body.error ? body.error : "request failed: " + r.status);
  return body;
}

function view() { return document.getElementById("view"); }

function show(...nodes) { view().replaceChildren(...nodes); }

function table(head, rows, opts) {
  const o = opts || {};
  return el("table", {id: o.id}, el("thead", {}, el("tr", {}, head.map(h => el("th", {}, h)))),
            el("tbody", {}, rows.map(r => el("tr", {}, r.map((c, i) => el("td", {class: typeof c === "number" || (i > 0 && o.numeric) ? "num" : null}, fmt(c)))))));
}

function headlineTables(headlines) {
  if (!headlines.length) return [el("p", {class: "note"}, "No stage has written a headline in this run yet.")];
  return headlines.map(h => el("div", {class: "headline", "data-stage": h.stage},
    el("h3", {}, h.title + " (" + h.stage + ".json)"),
    table(["quantity", "value (as written, with its interval)"], Object.entries(h.headline))));
}

async function overviewPage() {
  const run = state.runs[state.run];
  const d = await api(`/api/runs/${state.run}/overview`);
  const parts = [el("h2", {id: "run-title"}, "Overview — " + run.label),
    el("p", {class: "note"}, "pair " + fmt(run.pair) + " (" + fmt(run.domain) + "): base " + fmt(run.base) + ", tuned " + fmt(run.tuned) + " — " + run.path),
    run.has_report ? el("p", {}, el("a", {href: `/api/runs/${state.run}/file/report.html`, target: "_blank", rel: "noopener", id: "report-link"},
                                    "the static report (report.html) →")) : null,
    el("h2", {}, "Headline numbers"), ...headlineTables(d.headlines)].filter(Boolean);
  if (d.sentences.length) parts.push(el("h2", {}, "Executive summary"), el("ul", {}, d.sentences.map(([t, s]) => el("li", {}, el("b", {}, t + ": "), s))));
  if (state.runs.length > 1) {
    const c = await api("/api/compare");
    parts.push(el("h2", {id: "verdicts"}, "Verdicts across the " + state.runs.length + " open runs"), ...verdictParts(c),
               el("p", {}, el("a", {href: "#compare"}, "all runs side by side →")));
  }
  parts.push(...figureSections([d.figures]));
  show(...parts);
}

function verdictParts(c) {
  const out = [];
  const est = e => !e ? "n/a" : fmt(e.value) + (e.lo !== null && e.lo !== undefined ? " [" + fmt(e.lo) + ", " + fmt(e.hi) + "]" : "") + (e.note ? " (" + e.note + ")" : "");
  if (c.verdicts.length) out.push(table(["criterion", "predicted", "cultural", "cognitive", "difference", "verdict"],
    c.verdicts.map(v => [v.criterion, v.predicted, est(v.cultural), est(v.cognitive), est(v.difference), v.verdict]), {id: "verdict-table"}));
  else out.push(el("p", {class: "note", id: "no-verdict"}, "No verdict table: it needs one cultural and one cognitive run (manifest pair domains); the contrasts:"));
  out.push(c.contrasts.length ? el("ul", {id: "contrasts"}, c.contrasts.map(s => el("li", {}, s)))
                              : el("p", {class: "note"}, "No quantity was measured in two or more runs."));
  return out;
}

async function comparePage() {
  const c = await api("/api/compare");
  const parts = [el("h2", {}, "Runs side by side — " + c.labels.join(" vs ")), ...verdictParts(c),
    el("h2", {}, "Headline numbers (the comparison's rows)"),
    el("table", {id: "compare-table"}, el("thead", {}, el("tr", {}, ["quantity", ...c.labels].map(h => el("th", {}, h)))),
       el("tbody", {}, c.table.map(r => el("tr", {}, el("td", {class: r.indent ? "indent" : null}, r.quantity),
                                               r.values.map(v => el("td", {class: "num"}, v)))))),
    el("h2", {}, "Each stage's headline, aligned"),
    table(["stage", "quantity", ...c.labels], c.headlines.map(h => [h.stage, h.key, ...h.values]), {id: "stage-table"})];
  if (c.labels.length < 2) parts.splice(1, 0, el("p", {class: "note"}, "One run is open: start mechdiff serve with two or more run directories to overlay them."));
  parts.push(...figureSections(c.figures));
  show(...parts);
}

const PAGES = {overview: overviewPage, texts: textsPage, live: livePage, compare: comparePage};

async function route() {
  const name = (location.hash || "#overview").slice(1).split("/")[0];
  const page = PAGES[name] || overviewPage;
  for (const k of Object.keys(PAGES)) document.getElementById("nav-" + k).classList.toggle("active", k === name);
  document.getElementById("run").disabled = name === "compare";
  show(el("p", {class: "status"}, "loading ..."));
  try { await page(); } catch (e) { show(el("p", {class: "error"}, "error: " + e.message)); }
}

async function start() {
  state.runs = await api("/api/runs");
  const sel = document.getElementById("run");
  state.runs.forEach((r, i) => sel.append(el("option", {value: i}, r.label)));
  sel.addEventListener("change", () => { state.run = Number(sel.value); route(); });
  window.addEventListener("hashchange", route);
  await route();
}

document.addEventListener("DOMContentLoaded", start);

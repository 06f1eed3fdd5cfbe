// mechdiff explorer: the Texts page (the tokens stage's per-token divergence) and the Live page.
"use strict";

const COLS = [["idx", "#"], ["id", "id"], ["set", "set"], ["responder", "responder"], ["topic", "topic"], ["lang", "lang"],
              ["category", "category"], ["unit", "unit"], ["n_rows", "rows"], ["mean_kl_bt", "mean KL(base‖tuned)"],
              ["mean_kl_tb", "mean KL(tuned‖base)"], ["coverage", "coverage"]];

const MAX_ROWS = 500;

async function textsPage() {
  const run = state.runs[state.run];
  if (!run.has_texts) {
    show(el("h2", {}, "Texts — " + run.label), el("p", {class: "note", id: "no-texts"},
      "This run has no tokens stage (tokens.json); run `mechdiff tokens --out " + run.path + "` to add it."));
    return;
  }
  const texts = await api(`/api/runs/${state.run}/texts`);
  const sort = {key: "mean_kl_bt", desc: true};
  const uniq = k => [...new Set(texts.map(t => t[k]))].sort();
  const select = (id, label, vals) => el("label", {}, label, el("select", {id}, el("option", {value: ""}, "all"), vals.map(v => el("option", {value: v}, v))));
  const controls = el("div", {class: "controls"},
    el("label", {}, "search", el("input", {id: "f-search", type: "search", placeholder: "id or text"})),
    select("f-topic", "topic", uniq("topic")), select("f-lang", "language", uniq("lang")), select("f-set", "set", uniq("set")),
    el("label", {}, "min mean KL(base‖tuned)", el("input", {id: "f-min", type: "number", step: "any", min: 0})));
  const tbody = el("tbody", {id: "texts-body"});
  const heads = COLS.map(([k, lab]) => el("th", {class: "sortable", "data-key": k, onclick: () => {
    sort.desc = sort.key === k ? !sort.desc : true; sort.key = k; render(); }}, lab));
  const detail = el("div", {id: "text-view"});
  const count = el("p", {class: "note", id: "texts-count"});
  function render() {
    const q = document.getElementById("f-search").value.toLowerCase(), topic = document.getElementById("f-topic").value;
    const lang = document.getElementById("f-lang").value, set = document.getElementById("f-set").value;
    const min = parseFloat(document.getElementById("f-min").value);
    const rows = texts.filter(t => (!q || t.id.toLowerCase().includes(q) || t.text.toLowerCase().includes(q)) &&
      (!topic || t.topic === topic) && (!lang || t.lang === lang) && (!set || t.set === set) && (isNaN(min) || (t.mean_kl_bt ?? -1) >= min));
    rows.sort((a, b) => {
      const x = a[sort.key], y = b[sort.key];
      const c = x === y ? 0 : x === null ? 1 : y === null ? -1 : x < y ? -1 : 1;
      return sort.desc ? -c : c;
    });
    heads.forEach(h => h.textContent = COLS.find(c => c[0] === h.dataset.key)[1] + (h.dataset.key === sort.key ? (sort.desc ? " ▼" : " ▲") : ""));
    const shown = rows.slice(0, MAX_ROWS);
    tbody.replaceChildren(...shown.map(t => el("tr", {class: "clickable", "data-idx": t.idx, onclick: ev => {
      tbody.querySelectorAll("tr.selected").forEach(r => r.classList.remove("selected"));
      ev.currentTarget.classList.add("selected"); openText(t.idx, detail); }},
      COLS.map(([k]) => el("td", {class: typeof t[k] === "number" ? "num" : null}, fmt(t[k]))))));
    count.textContent = rows.length + " of " + texts.length + " texts" + (rows.length > MAX_ROWS ? " (the first " + MAX_ROWS +
      " shown: filter to narrow)" : "") + "; click a column to sort, a row to read it";
  }
  show(el("h2", {}, "Texts — " + run.label), controls, count,
       el("table", {id: "texts-table"}, el("thead", {}, el("tr", {}, heads)), tbody), detail);
  controls.addEventListener("input", render);
  render();
}

function shade(kl, max) {
  const a = max > 0 && kl !== null ? Math.min(1, kl / max) : 0;
  return `rgba(214, 39, 40, ${(0.85 * a).toFixed(3)})`;
}

async function openText(idx, box) {
  box.replaceChildren(el("p", {class: "status"}, "loading text " + idx + " ..."));
  const d = await api(`/api/runs/${state.run}/texts/${idx}`);
  const s = d.summary, rows = d.rows;
  const parts = [el("h2", {id: "text-title"}, "Text " + s.idx + ": " + s.id),
    el("p", {class: "note"}, `set ${s.set}, responder ${fmt(s.responder)}, topic ${s.topic}, language ${s.lang}, category ${s.category}; unit: ${s.unit}` +
      (s.unit === "span" ? ` (the two tokenizers differ: each boxed piece is one span whose boundaries both tokenizations share; ${fmt(100 * s.coverage)}% of the characters lie inside aligned boundaries)` : " (one row per token of the shared tokenization)"))];
  const top = Math.max(0, ...rows.flatMap(r => [r.kl_bt ?? 0, r.kl_tb ?? 0]));
  const scale = el("input", {id: "kl-scale", type: "number", step: "any", min: 0, value: Number(top.toPrecision(3))});
  parts.push(el("div", {class: "controls"}, el("label", {}, "full red at KL (nats; both directions share the scale)", scale)));
  const strips = el("div", {});
  const drawStrips = () => strips.replaceChildren(...textStrips(s, rows, parseFloat(scale.value) || top));
  scale.addEventListener("input", drawStrips);
  drawStrips();
  parts.push(strips);
  const big = rows.map((r, i) => [i, r]).sort((a, b) => (b[1].kl_bt ?? 0) - (a[1].kl_bt ?? 0)).slice(0, 8);
  parts.push(el("h3", {}, "Largest divergences"), table(["row", "text", "KL(base‖tuned)", "KL(tuned‖base)", "rank base", "rank tuned"],
    big.map(([i, r]) => [i, JSON.stringify(r.text), r.kl_bt, r.kl_tb, r.rank_in_base, r.rank_in_tuned]), {id: "top-rows"}));
  box.replaceChildren(...parts);
}

// the text twice, each row shaded by one direction's KL (rows: tokens, or aligned spans drawn as boxes)
function textStrips(s, rows, max) {
  const parts = [];
  for (const [key, title] of [["kl_bt", "KL(base ‖ tuned)"], ["kl_tb", "KL(tuned ‖ base)"]]) {
    const strip = el("div", {class: "strip", "data-kl": key});
    let pos = 0;
    const plain = (a, b) => { if (b > a) strip.append(el("span", {class: "untok"}, s.text.slice(a, b))); };
    if (s.response_start > 0 && (!rows.length || rows[0].start >= s.response_start)) { plain(0, s.response_start); pos = s.response_start; }
    for (const r of rows) {
      if (r.start < pos) continue;
      if (pos <= s.response_start && s.response_start <= r.start && s.response_start > 0) {
        plain(pos, s.response_start); pos = s.response_start; strip.append(el("span", {class: "resp"}, "▸"));
      }
      plain(pos, r.start);
      const tip = `${JSON.stringify(r.text)}\nKL(base‖tuned) ${fmt(r.kl_bt)}   KL(tuned‖base) ${fmt(r.kl_tb)}\n` +
        `unmasked: ${fmt(r.kl_bt_full)} / ${fmt(r.kl_tb_full)}   mass dropped: ${fmt(r.dropped_base)} / ${fmt(r.dropped_tuned)}\n` +
        `log p base ${fmt(r.logp_base)}, tuned ${fmt(r.logp_tuned)}   rank base ${r.rank_in_base}, tuned ${r.rank_in_tuned}`;
      const span = el("span", {class: "tok" + (s.unit === "span" ? " span" : ""), style: "background:" + shade(r[key], max)}, s.text.slice(r.start, r.end));
      span.addEventListener("mousemove", ev => tooltip.show(ev, tip));
      span.addEventListener("mouseleave", () => tooltip.hide());
      strip.append(span);
      pos = r.end;
    }
    plain(pos, s.text.length);
    parts.push(el("h3", {}, title + " (▸: the response begins; hover a token for its numbers)"), strip);
  }
  return parts;
}

async function livePage() {
  const run = state.runs[state.run];
  const input = (id, attrs) => el("input", {id, ...attrs});
  const handleSel = el("select", {id: "l-handle"}, el("option", {value: ""}, "none"),
    run.handles.map(h => el("option", {value: h.name}, `${h.name} (${h.site} L${h.layer}, k=${h.k}, ${h.mode}, strength ${fmt(h.alpha)})`)));
  handleSel.addEventListener("change", () => {      // the handle's own values as the blanks' placeholders
    const h = run.handles.find(x => x.name === handleSel.value) || {};
    for (const [id, key] of [["l-layer", "layer"], ["l-k", "k"], ["l-alpha", "alpha"]])
      document.getElementById(id).placeholder = h[key] === undefined ? "" : fmt(h[key]);
  });
  const form = el("form", {id: "live-form"},
    el("label", {}, "prompt (at most 2000 characters)", el("textarea", {id: "l-prompt", rows: 3, maxlength: 2000, required: true})),
    el("div", {class: "controls"},
      el("label", {}, "new tokens", input("l-new", {type: "number", min: 0, max: 64, value: 16})),
      el("label", {}, "top tokens", input("l-top", {type: "number", min: 1, max: 20, value: 8})),
      el("label", {}, "chat template", input("l-chat", {type: "checkbox", checked: true})),
      el("label", {}, "RQ3 handle", handleSel),
      el("label", {}, "layer (blank: the handle's)", input("l-layer", {type: "number", min: 0})),
      el("label", {}, "k (blank: all)", input("l-k", {type: "number", min: 1})),
      el("label", {}, "strength (blank: the handle's)", input("l-alpha", {type: "number", step: "any"})),
      el("label", {}, "mode", el("select", {id: "l-mode"}, ["", "steer", "add", "ablate"].map(m => el("option", {value: m}, m || "the handle's")))),
      el("label", {}, "apply to", el("select", {id: "l-side"}, ["", "base", "tuned"].map(m => el("option", {value: m}, m || "by mode")))),
      el("button", {type: "submit", id: "l-run"}, "Run")));
  const status = el("p", {class: "status", id: "live-status"});
  const result = el("div", {id: "live-result"});
  const num = id => { const v = document.getElementById(id).value; return v === "" ? null : Number(v); };
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const body = {prompt: document.getElementById("l-prompt").value, new_tokens: num("l-new"), top: num("l-top"),
      chat: document.getElementById("l-chat").checked, handle: handleSel.value || null, layer: num("l-layer"), k: num("l-k"),
      alpha: num("l-alpha"), mode: document.getElementById("l-mode").value || null, side: document.getElementById("l-side").value || null};
    document.getElementById("l-run").disabled = true;
    let polling = true;
    const poll = async () => {
      while (polling) {
        try { const s = await api(`/api/live/${state.run}/status`); if (polling) status.textContent = s.message; } catch (e) { /* next tick */ }
        await new Promise(r => setTimeout(r, 400));
      }
    };
    status.textContent = "running ...";
    poll();
    try {
      const d = await api(`/api/live/${state.run}`, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      polling = false;
      status.textContent = "done";
      result.replaceChildren(...liveResult(d));
    } catch (e) {
      polling = false;
      status.textContent = "";
      result.replaceChildren(el("p", {class: "error", id: "live-error"}, "error: " + e.message));
    } finally { document.getElementById("l-run").disabled = false; }
  });
  const st = await api(`/api/live/${state.run}/status`);
  status.textContent = st.message;
  show(el("h2", {}, "Live — " + fmt(run.pair) + ": " + fmt(run.base) + " vs " + fmt(run.tuned)),
       el("p", {class: "note"}, "Both models load once, on the first prompt; one prompt runs at a time. The prompt is shown back as text, never as markup."),
       form, status, result);
}

function liveResult(d) {
  const kl = d.kl;
  const out = [el("p", {id: "live-kl"}, `next token: KL(base ‖ tuned) = ${fmt(kl.bt)} nats, KL(tuned ‖ base) = ${fmt(kl.tb)} nats (${kl.vocab} vocabulary)`),
               el("p", {class: "note"}, "prompt: ", el("span", {id: "live-prompt"}, d.prompt))];
  out.push(el("div", {class: "cols"}, d.columns.map((c, i) => el("div", {class: "col", "data-col": i},
    el("h3", {}, c.label), el("p", {class: "note"}, c.model + " — " + c.n_prompt_tokens + " prompt tokens"),
    c.kl_to_other ? el("p", {class: "note"}, `vs the other model: KL(base‖tuned) ${fmt(c.kl_to_other.bt)}, KL(tuned‖base) ${fmt(c.kl_to_other.tb)}; ` +
                                             `KL(unedited ‖ edited) ${fmt(c.kl_to_self.bt)}`) : null,
    table(["next token", "p"], c.top.map(t => [JSON.stringify(t.token), t.p])),
    el("h3", {}, "greedy continuation"), el("pre", {class: "continuation"}, c.continuation)))));
  return out;
}

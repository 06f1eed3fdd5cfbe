"""The report's view of the ``tokens`` stage: the most divergent texts with each token shaded by its
KL(base || tuned) (every string escaped; no scripts), read through :func:`mechdiff.texts.result.load_texts`."""
from __future__ import annotations

import html
import math
from pathlib import Path

from mechdiff.report.render import Section, md_code
from mechdiff.texts.result import TextDivergence, load_texts

__all__ = ["tokens_section", "shaded_html"]


def _alpha(v: float, vmax: float) -> float:
    if not (isinstance(v, float) and math.isfinite(v)) or vmax <= 0:
        return 0.0
    return round(min(1.0, max(0.0, v / vmax)), 3)


def shaded_html(t: TextDivergence, vmax: float) -> str:
    """``t``'s text as HTML, each row's characters on a red background whose opacity is its KL over
    ``vmax`` (a tooltip gives the numbers); characters outside rows plain. Everything escaped."""
    s, out, pos = t.summary.text, [], 0
    for r in sorted(t.rows, key=lambda r: r.start):
        if r.start < pos or r.end <= r.start:
            continue
        out.append(html.escape(s[pos:r.start]))
        tip = (f"KL(b||t)={r.kl_bt:.3g} KL(t||b)={r.kl_tb:.3g} logp base={r.logp_base:.3g} "
               f"tuned={r.logp_tuned:.3g}")
        out.append(f'<span style="background: rgba(220,40,40,{_alpha(r.kl_bt, vmax)})" '
                   f'title="{html.escape(tip)}">{html.escape(s[r.start:r.end])}</span>')
        pos = r.end
    out.append(html.escape(s[pos:]))
    return "".join(out)


def tokens_section(sec: Section, run_dir: Path, n_texts: int = 5) -> None:
    """The ``n_texts`` prompt texts with the highest mean response KL, tokens shaded (nothing when the
    stage did not run)."""
    texts = load_texts(run_dir)
    if not texts:
        return
    ranked = sorted((t for t in texts if math.isfinite(t.summary.mean_kl_bt)),
                    key=lambda t: -t.summary.mean_kl_bt)[:n_texts]
    if not ranked:
        return
    vals = [r.kl_bt for t in ranked for r in t.rows if math.isfinite(r.kl_bt)]
    vmax = sorted(vals)[int(0.95 * (len(vals) - 1))] if vals else 1.0
    sec.heading("Most divergent texts, token by token", 2, "tokens")
    sec.para(f"Each token (aligned span across tokenizers) shaded by KL(base || tuned) over the shared vocabulary; "
             f"full colour at {vmax:.3g} nats (the 95th percentile of these rows). Hover for the numbers.", "note")
    for t in ranked:
        s = t.summary
        sec.heading(f"{s.id} — {s.set}, {s.responder or 'no'} response, mean response KL {s.mean_kl_bt:.3g}", 3)
        sec.html.append(f'<pre style="white-space: pre-wrap">{shaded_html(t, vmax)}</pre>')
        top = sorted((r for r in t.rows if math.isfinite(r.kl_bt)), key=lambda r: -r.kl_bt)[:8]
        sec.md.append(md_code("\n".join(f"{r.kl_bt:8.3f}  {r.text!r}" for r in top)))

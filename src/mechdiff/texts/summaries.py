"""Summaries of per-token divergence rows: the curve along the response, the most divergent tokens,
per-prompt and per-group means with cluster standard errors.

Input everywhere: a list of :class:`mechdiff.texts.result.TextDivergence` (what ``load_texts``
returns). A text's value is the mean over its response rows (all rows for a neutral text) of one
field, NaN rows left out. Uncertainty: the cluster-robust standard error of a mean over texts
(clusters = topics; within one topic, prompts), ``SE = sqrt(G/(G-1) * sum_g (sum_{i in g}(x_i - m))^2) / n``;
NaN with fewer than two clusters (said in the output, never hidden).
"""
from __future__ import annotations

import math
from typing import Sequence

from mechdiff.texts.result import TextDivergence

__all__ = ["response_rows", "text_mean", "cluster_mean", "curve", "top_tokens", "by_group", "per_prompt"]

Z95 = 1.959963984540054


def response_rows(t: TextDivergence) -> list:
    """The rows a text's summary is over: the response for a prompt, everything for a neutral text."""
    rs = t.summary.response_start
    return [r for r in t.rows if r.start >= rs] if t.summary.responder else list(t.rows)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def text_mean(t: TextDivergence, key: str = "kl_bt") -> float:
    vals = [getattr(r, key) for r in response_rows(t) if _finite(getattr(r, key))]
    return sum(vals) / len(vals) if vals else math.nan


def cluster_mean(values: Sequence[float], clusters: Sequence[str]) -> dict:
    """``{mean, se, ci_low, ci_high, n, n_clusters}`` of the finite ``values`` with cluster-robust SE."""
    pairs = [(v, c) for v, c in zip(values, clusters) if _finite(v)]
    n = len(pairs)
    if n == 0:
        return {"mean": None, "se": None, "ci_low": None, "ci_high": None, "n": 0, "n_clusters": 0}
    m = sum(v for v, _ in pairs) / n
    sums: dict[str, float] = {}
    for v, c in pairs:
        sums[c] = sums.get(c, 0.0) + (v - m)
    g = len(sums)
    se = math.sqrt(g / (g - 1) * sum(s * s for s in sums.values())) / n if g > 1 else math.nan
    out = {"mean": m, "se": se if math.isfinite(se) else None, "n": n, "n_clusters": g}
    out["ci_low"] = m - Z95 * se if math.isfinite(se) else None
    out["ci_high"] = m + Z95 * se if math.isfinite(se) else None
    if g < 2:
        out["note"] = "one cluster: no standard error"
    return out


def _cluster(t: TextDivergence) -> str:
    return t.summary.topic or t.summary.id


def curve(texts: Sequence[TextDivergence], key: str = "kl_bt", max_len: int | None = None) -> dict:
    """Per responder, the mean of ``key`` at the k-th response row over the texts that reach it, with
    a 95% band from the cluster SE: ``{responder: {"pos", "mean", "lo", "hi", "n"}}``."""
    out: dict[str, dict] = {}
    for who in sorted({t.summary.responder for t in texts if t.summary.responder}):
        rows = [(response_rows(t), _cluster(t)) for t in texts if t.summary.responder == who]
        k_max = max((len(r) for r, _ in rows), default=0)
        if max_len is not None:
            k_max = min(k_max, max_len)
        c = {"pos": [], "mean": [], "lo": [], "hi": [], "n": []}
        for k in range(k_max):
            s = cluster_mean([getattr(r[k], key) for r, _ in rows if len(r) > k],
                             [g for r, g in rows if len(r) > k])
            if s["mean"] is None:
                continue
            c["pos"].append(k)
            c["mean"].append(s["mean"])
            c["lo"].append(s["ci_low"] if s["ci_low"] is not None else s["mean"])
            c["hi"].append(s["ci_high"] if s["ci_high"] is not None else s["mean"])
            c["n"].append(s["n"])
        out[who] = c
    return out


def top_tokens(texts: Sequence[TextDivergence], n: int = 20, key: str = "kl_bt", context: int = 40) -> list[dict]:
    """The ``n`` rows with the largest ``key`` over the response rows (neutral texts: all rows), each
    with ``context`` characters before and after."""
    cand = []
    for t in texts:
        for r in response_rows(t):
            v = getattr(r, key)
            if _finite(v):
                cand.append((v, t, r))
    cand.sort(key=lambda x: -x[0])
    out = []
    for v, t, r in cand[:n]:
        s = t.summary
        out.append({"text_idx": s.idx, "id": s.id, "set": s.set, "responder": s.responder, "token": r.text,
                    "before": s.text[max(0, r.start - context):r.start], "after": s.text[r.end:r.end + context],
                    key: v, "kl_tb": r.kl_tb, "logp_base": r.logp_base, "logp_tuned": r.logp_tuned,
                    "dropped_tuned": r.dropped_tuned, "category": s.category, "lang": s.lang, "topic": s.topic})
    return out


def by_group(texts: Sequence[TextDivergence], field: str, key: str = "kl_bt") -> list[dict]:
    """Mean per-text ``key`` for each value of ``field`` (category | lang | topic) and set/responder,
    with the cluster SE (clusters: topics; prompts when grouping by topic)."""
    groups: dict[tuple, list[TextDivergence]] = {}
    for t in texts:
        s = t.summary
        groups.setdefault((s.set, s.responder or "-", getattr(s, field)), []).append(t)
    rows = []
    for (st, who, val), ts in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        cl = [t.summary.id if field == "topic" else _cluster(t) for t in ts]
        s = cluster_mean([text_mean(t, key) for t in ts], cl)
        rows.append({"set": st, "responder": who, field: val, f"mean_{key}": s["mean"], "se": s["se"],
                     "ci_low": s["ci_low"], "ci_high": s["ci_high"], "n_texts": s["n"], "n_clusters": s["n_clusters"]})
    return rows


def per_prompt(texts: Sequence[TextDivergence]) -> list[dict]:
    """One row per prompt: the mean response KL (both directions) after each model's own response."""
    out: dict[str, dict] = {}
    for t in texts:
        s = t.summary
        if not s.responder:
            continue
        row = out.setdefault(s.id, {"id": s.id, "category": s.category, "lang": s.lang, "topic": s.topic})
        row[f"kl_bt_{s.responder}_response"] = s.mean_kl_bt
        row[f"kl_tb_{s.responder}_response"] = s.mean_kl_tb
        row[f"n_rows_{s.responder}_response"] = len(response_rows(t))
    return list(out.values())

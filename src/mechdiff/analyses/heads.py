"""Head importance, churn and overlap (pure math on ``[L, H]`` score tables; no models).

A score table ``s [L, H]`` holds one number per head (rows: the analysed layers, in order), e.g. the
mean zero-ablation effect of each head on the target readout. Conventions:

- **important**: ``|s| > floor`` and (``z >= z_threshold`` or ``|s| >= abs_threshold``), where z is
  the z-score of ``|s|`` within its layer (population sd; a layer whose heads are all equal has
  z = 0) and ``floor`` is the numerical noise floor (effects at or below it count as zero);
- **churn** (:func:`churn`): the share of heads whose important/not-important label differs
  between base and tuned;
- **changed** heads (:func:`changed`): the same thresholds applied to a per-head *change* score
  (e.g. the effect of swapping in the other model's head, or ``|s_tuned - s_base|``); kept as
  ``share_zcut`` beside the count that :func:`summarise_heads` reports for a cross-model patch
  (swap / own): a per-head test above the noise floor with Benjamini-Hochberg FDR control and
  Storey's share (:mod:`mechdiff.analyses.head_counts`), with cluster-bootstrap intervals;
- **top-k**: the k heads of largest ``|s|`` (ties broken by position); overlap as Jaccard;
- **chance** (:func:`overlap_chance`): hypergeometric expectation and upper tail of the overlap
  between k heads drawn at random among N and a planted set of m.

:func:`patches` turns recorded head states into the patch variants of a head ablation or a
cross-model head patch (records only; the patching engine runs them).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from mechdiff.analyses import head_counts as HC
from mechdiff.analyses.intervals import bootstrap
from mechdiff.errors import ConfigError

Head = tuple[int, int]   # (layer, head), the layer being the model's layer index


def _table(s) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float64)
    if s.dim() != 2 or s.numel() == 0:
        raise ConfigError(f"a head score table must be [layers, heads] and non-empty, got {tuple(s.shape)}")
    return s


def zscores(s) -> torch.Tensor:
    """``[L, H]`` z-score of ``|s|`` within each layer (0 where a layer has no spread)."""
    a = _table(s).abs()
    mu, sd = a.mean(1, keepdim=True), a.std(1, unbiased=False, keepdim=True)
    return torch.where(sd > 0, (a - mu) / sd.clamp_min(1e-300), torch.zeros_like(a))


def important(s, z_threshold: float = 2.0, abs_threshold: float | None = None, floor: float = 0.0
              ) -> torch.Tensor:
    """``[L, H]`` bool: ``|s| > floor`` and (z within the layer >= z_threshold or |s| >= abs_threshold)."""
    a = _table(s).abs()
    hit = zscores(a) >= z_threshold
    if abs_threshold is not None:
        hit = hit | (a >= abs_threshold)
    return hit & (a > floor)


changed = important   # the same rule, applied to a change score


def churn(imp_base, imp_tuned) -> float:
    """Share of heads whose importance label differs between the two models."""
    a, b = torch.as_tensor(imp_base, dtype=torch.bool), torch.as_tensor(imp_tuned, dtype=torch.bool)
    if a.shape != b.shape or a.numel() == 0:
        raise ConfigError(f"importance tables differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a ^ b).double().mean())


def heads_of(mask, layers: Sequence[int]) -> list[Head]:
    """``[(layer, head), ...]`` where ``mask [L, H]`` is True (layers: the rows' layer indices)."""
    m = torch.as_tensor(mask, dtype=torch.bool)
    return [(int(layers[i]), int(h)) for i, h in m.nonzero().tolist()]


def rank(s, layers: Sequence[int]) -> list[Head]:
    """All heads by decreasing ``|s|`` (stable: ties keep table order)."""
    a = _table(s).abs().flatten()
    H = _table(s).shape[1]
    order = sorted(range(a.numel()), key=lambda i: (-float(a[i]), i))
    return [(int(layers[i // H]), i % H) for i in order]


def topk(s, layers: Sequence[int], k: int) -> list[Head]:
    """The ``k`` heads of largest ``|s|``."""
    if k < 1:
        raise ConfigError(f"top-k needs k >= 1, got {k}")
    return rank(s, layers)[:k]


def jaccard(a: Iterable, b: Iterable) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return 1.0 if not a | b else len(a & b) / len(a | b)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), 0-based."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    r = torch.empty_like(x)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(a, b) -> float:
    """Spearman rank correlation over all heads (average ranks for ties); NaN if one side is constant."""
    x, y = _table(a).flatten(), _table(b).flatten()
    if x.shape != y.shape:
        raise ConfigError(f"score tables differ in shape: {tuple(_table(a).shape)} vs {tuple(_table(b).shape)}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def overlap_chance(n_total: int, n_planted: int, k: int, observed: int | None = None) -> dict:
    """Overlap X of k heads drawn at random among ``n_total`` with a planted set of ``n_planted`` (X is
    hypergeometric): ``{"expected": E[X] = k m / N, "expected_jaccard": E[X / (k + m - X)],
    "p_value": P(X >= observed)}`` (p_value only when ``observed`` is given)."""
    N, m = int(n_total), int(n_planted)
    k = min(int(k), N)
    if not (0 <= m <= N and k >= 0):
        raise ConfigError(f"overlap_chance: need 0 <= planted ({m}) <= total ({N})")
    pmf = [math.comb(m, x) * math.comb(N - m, k - x) / math.comb(N, k) for x in range(0, min(k, m) + 1)]
    out = {"n_total": N, "n_planted": m, "k": k, "expected": k * m / N if N else 0.0,
           "expected_jaccard": sum(p * (x / (k + m - x) if k + m - x else 1.0) for x, p in enumerate(pmf))}
    if observed is not None:
        out["observed"] = int(observed)
        out["p_value"] = float(min(1.0, sum(pmf[int(observed):])))
    return out


def recovery(score, layers: Sequence[int], planted: Iterable[Head], k: int | None = None) -> dict:
    """How many of the planted heads (within ``layers``) are among the top-k of ``score`` (default k =
    number of planted heads there), with the chance level beside it."""
    layer_set = set(int(l) for l in layers)
    truth = {tuple(map(int, h)) for h in planted if int(h[0]) in layer_set}
    L, H = _table(score).shape
    k = k or max(1, len(truth))
    top = topk(score, layers, k)
    hit = len(set(top) & truth)
    return {**overlap_chance(L * H, len(truth), k, hit), "jaccard": jaccard(top, truth),
            "top": [list(h) for h in top], "planted": sorted(list(h) for h in truth)}


def cumulative_order(s, layers: Sequence[int], K: int) -> list[list[Head]]:
    """``[[h1], [h1, h2], ..., [h1..hK]]``: the top-k head sets for k = 1..K (by ``|s|``)."""
    top = topk(s, layers, K)
    return [top[:k] for k in range(1, len(top) + 1)]


def compare(base, tuned, layers: Sequence[int], *, z_threshold: float = 2.0, abs_threshold: float | None = None,
            floor: float = 0.0, k: int = 10) -> dict:
    """Base vs tuned importance tables ``[L, H]`` (one measurement): churn (overall and per layer),
    share of important heads per model, top-k Jaccard, Spearman over all heads, important heads."""
    b, t = _table(base), _table(tuned)
    ib = important(b, z_threshold, abs_threshold, floor)
    it = important(t, z_threshold, abs_threshold, floor)
    k = min(k, b.numel())
    return {"churn": churn(ib, it), "churn_per_layer": [churn(ib[i:i + 1], it[i:i + 1]) for i in range(len(b))],
            "share_important_base": float(ib.double().mean()), "share_important_tuned": float(it.double().mean()),
            "topk_jaccard": jaccard(topk(b, layers, k), topk(t, layers, k)), "k": k, "spearman": spearman(b, t),
            "important_base": [list(h) for h in heads_of(ib, layers)],
            "important_tuned": [list(h) for h in heads_of(it, layers)]}


def changed_share(change, layers: Sequence[int], *, z_threshold: float = 2.0, abs_threshold: float | None = None,
                  floor: float = 0.0) -> dict:
    """Heads whose change score ``[L, H]`` (>= 0, e.g. |effect of swapping in the other model's head|)
    passes the importance rule: ``{"share", "share_per_layer", "heads"}``, and ``share_nonzero``: the
    share whose change score exceeds ``floor`` at all."""
    c = changed(change, z_threshold, abs_threshold, floor)
    return {"share": float(c.double().mean()), "share_per_layer": [float(r.double().mean()) for r in c],
            "heads": [list(h) for h in heads_of(c, layers)],
            "share_nonzero": float((_table(change).abs() > floor).double().mean())}


SWAP_MEASURES = ("swap", "own")


def change_score(per: dict, measure: str) -> torch.Tensor:
    """``[L, H]`` how much each head changed, from per-prompt scores ``{"base", "tuned": [L, H, N]}``:
    for a cross-model patch (swap / own) the mean |effect| (both directions averaged), for an
    importance measure ``|mean tuned - mean base|``."""
    if measure in SWAP_MEASURES:
        return (per["base"].abs().mean(-1) + per["tuned"].abs().mean(-1)) / 2
    return (per["tuned"].mean(-1) - per["base"].mean(-1)).abs()


def _per_prompt_change(t: dict) -> torch.Tensor:
    """``[L*H, N]`` per-prompt change of a cross-model patch, both directions: ``(|e_base| + |e_tuned|) / 2``."""
    return ((t["base"].abs() + t["tuned"].abs()) / 2).reshape(-1, t["base"].shape[-1]).double()


def counted(t: dict, layers: Sequence[int], groups=None, *, floor: float = 0.0, q: float = 0.05,
            p0: float | None = None, n_boot: int = 200) -> dict:
    """Changed heads of a cross-model patch (``{"base", "tuned": [L, H, N]}``): per-head test above
    ``floor`` over prompts (exceedance vs Binomial(N, p0) with ``p0``, else a t test over topic
    groups), BH at FDR ``q``, Storey's share; intervals (:func:`mechdiff.analyses.head_counts.count_changed`)."""
    r = HC.count_changed(_per_prompt_change(t), groups, floor=floor, q=q, p0=p0, n_boot=n_boot)
    mask = torch.tensor(r["changed"]).reshape(t["base"].shape[:2])
    return {"share": r["share"], "n_changed": r["n_changed"], "n_heads": r["n_units"], "q": q,
            "share_interval": r["share_interval"], "share_storey": r["share_storey"],
            "storey_interval": r["storey_interval"], "test": r["test"], "floor": floor,
            "share_per_layer": [float(row.double().mean()) for row in mask],
            "heads": [list(h) for h in heads_of(mask, layers)], "p": r["p"]}


def _intervals(t: dict, layers, groups, rule: dict, floor: float, k: int, n_boot: int) -> dict:
    """Cluster-bootstrap intervals (prompts by topic group) of churn, top-k Jaccard and Spearman."""
    n = t["base"].shape[-1]
    out = {}
    for key in ("churn", "topk_jaccard", "spearman"):
        out[key] = bootstrap(lambda rows: compare(t["base"][..., rows].mean(-1), t["tuned"][..., rows].mean(-1),
                                                  layers, floor=floor, k=k, **rule)[key], n, groups, n_boot=n_boot)
    return out


def summarise_heads(per: dict, layers: Sequence[int], *, z_threshold: float = 2.0,
                    abs_threshold: float | None = None, floors: dict | None = None, k: int = 10,
                    planted: Iterable[Head] | None = None, groups=None, q: float = 0.05, n_boot: int = 200,
                    p0: float | None = None) -> dict:
    """Every measurement at once. ``per``: ``{measure: {"base", "tuned": [L, H, N]}}``; ``floors``:
    ``{measure: noise floor}``; ``groups``: the prompts' topic groups ``[N]`` (intervals resample
    them whole); ``p0``: the chance that noise passes the floor on one prompt (the exceedance test
    of the changed-head count; None: a t test). Models with different head counts get per-model rows only (no churn).
    Returns ``{"heads": one row per head (mean, sd per model, change),
    "churn": {measure: counted(...) (swap / own: ``share`` the BH count, ``share_zcut`` the old
    within-layer cut) | compare(...) + "intervals"}, "planted": {measure: recovery(...) + AUROC,
    precision at the true count, estimated vs true share}, "table": one row per measurement}``."""
    rule = dict(z_threshold=z_threshold, abs_threshold=abs_threshold)
    truth = {tuple(map(int, h)) for h in planted} if planted else None
    churn, rec, change = {}, {}, {}
    for m, t in per.items():
        if t["base"].shape[:2] != t["tuned"].shape[:2]:     # different head counts: per model only
            continue
        floor = (floors or {}).get(m, 0.0)
        change[m] = change_score(t, m)
        n = t["base"].shape[-1]
        if m in SWAP_MEASURES:
            zcut = changed_share(change[m], layers, floor=floor, **rule)
            churn[m] = {**(counted(t, layers, groups, floor=floor, q=q, p0=p0, n_boot=n_boot) if n >= 2 else zcut),
                        "share_zcut": zcut["share"], "share_nonzero": zcut["share_nonzero"]}
        else:
            churn[m] = compare(t["base"].mean(-1), t["tuned"].mean(-1), layers, floor=floor, k=k, **rule)
            if n >= 2 and len(set(torch.as_tensor(groups).tolist() if groups is not None else range(n))) >= 2:
                churn[m]["intervals"] = _intervals(t, layers, groups, rule, floor, min(k, change[m].numel()), n_boot)
        if truth:
            rec[m] = recovery(change[m], layers, truth)
            mask = torch.tensor([[(int(l), h) in truth for h in range(change[m].shape[1])] for l in layers])
            calls = torch.zeros_like(mask)
            for l, h in churn[m].get("heads", []) if m in SWAP_MEASURES else []:
                calls[list(layers).index(l), h] = True
            rec[m].update(HC.recovery_vs_truth(change[m].flatten(), mask.flatten(),
                                               calls.flatten() if m in SWAP_MEASURES else None))
    rows = []
    H = max(v.shape[1] for t in per.values() for v in t.values())
    for i, l in enumerate(layers):
        for h in range(H):
            row = {"layer": int(l), "head": h, **({"planted": (int(l), h) in truth} if truth else {})}
            for m, t in per.items():
                for s, v in t.items():
                    if h < v.shape[1]:
                        row[f"{m}_{s}"] = float(v[i, h].mean())
                        row[f"{m}_{s}_sd"] = float(v[i, h].std()) if v.shape[-1] > 1 else 0.0
                if m in change:
                    row[f"{m}_change"] = float(change[m][i, h])
            rows.append(row)
    table = [{"measurement": m, "churn / changed share": r.get("churn", r.get("share")),
              "interval": _iv(r.get("share_interval") or (r.get("intervals") or {}).get("churn")),
              "top-k Jaccard": r.get("topk_jaccard"), "spearman": r.get("spearman"),
              "important base": r.get("share_important_base"), "important tuned": r.get("share_important_tuned")}
             for m, r in churn.items()]
    return {"heads": rows, "churn": churn, "planted": rec, "table": table}


def _iv(iv: dict | None) -> str | None:
    return None if not iv else f"[{iv['ci_low']:.3g}, {iv['ci_high']:.3g}]"


def cumulative_curves(effects: dict, orders: dict) -> dict:
    """``{key: {"heads", "mean", "sd"[, "all_heads"]}}`` from ``effects[key]`` ``[K (+1), N]`` and the
    head order of each key (a row past the K ranked ones is the every-head reference)."""
    out = {}
    for key, v in effects.items():
        K = len(orders[key])
        out[key] = {"heads": orders[key], "mean": v[:K].mean(-1).tolist(),
                    "sd": (v[:K].std(-1) if v.shape[-1] > 1 else torch.zeros(K)).tolist(),
                    **({"all_heads": float(v[K:].mean())} if v.shape[0] > K else {})}
    return out


# ---- head variants for the patching engine (tensors in, Patch records out) --------------------

def _block(H: int, hd: int, heads) -> torch.Tensor:
    """``[H*hd, len(heads)*hd]`` orthonormal basis of the heads' slices of head_z."""
    eye = torch.eye(H * hd)
    return torch.cat([eye[:, h * hd:(h + 1) * hd] for h in heads], 1)


def _pad(v: torch.Tensor, H: int, h: int) -> torch.Tensor:
    """``v [..., hd]`` written into head h's slice of a zero ``[..., H*hd]``."""
    hd = v.shape[-1]
    out = torch.zeros(*v.shape[:-1], H * hd)
    out[..., h * hd:(h + 1) * hd] = v
    return out


def patches(states: dict, side: str, layer: int, heads: Sequence[int], kind: str) -> list:
    """One variant for :class:`mechdiff.patching.PatchEngine`: ``heads`` of ``layer`` zeroed / set to
    their mean (``zero`` | ``mean``: head_z slices), or given the other model's output (``swap``) or
    the other model's head on this input (``own``). ``states``: ``{side}.head_z.L`` [N, H, hd],
    ``{side}.head_out.L`` [N, H, d], ``{side}.additive.L``, ``{side}.own_z.L`` / ``own_out.L``. Where
    the heads add up to attn_out the contribution difference is added there, else the slices swapped."""
    from mechdiff.patching import Patch
    z = states[f"{side}.head_z.{layer}"]
    N, H, hd = z.shape
    site = f"head_z.{layer}"
    if kind in ("zero", "mean"):
        mean = sum(_pad(z.mean(0)[h], H, h) for h in heads) if kind == "mean" else None
        return [Patch(site, mean, mode="ablate", basis=_block(H, hd, heads))]
    other = "tuned" if side == "base" else "base"
    src_z, src_out = ((f"{other}.head_z.{layer}", f"{other}.head_out.{layer}") if kind == "swap"
                      else (f"{side}.own_z.{layer}", f"{side}.own_out.{layer}"))
    if bool(states[f"{side}.additive.{layer}"]):
        delta = (states[src_out][:, heads] - states[f"{side}.head_out.{layer}"][:, heads]).sum(1)
        return [Patch(f"attn_out.{layer}", delta, mode="add")]
    return [Patch(site, sum(_pad(states[src_z][:, h], H, h) for h in heads), mode="ablate", basis=_block(H, hd, heads))]

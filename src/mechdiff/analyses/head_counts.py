"""How many heads changed: a per-head test with false-discovery control and an estimate of the share
of changed heads from the whole p-value distribution, and recovery against a known truth (pure math;
see /work/shared/MATH.md "Counting changed units among many").

Input: per-prompt change effects ``e [U, N]`` (one row per head, flattened ``[L, H]``; e.g. the
readout change from the other model's head on this input, ``own``, both directions averaged as
``(|e_base| + |e_tuned|) / 2``). Per head the statistic is ``m = mean_n |e|``; its null is "no change
beyond the noise level ``floor``" (a head whose weights did not change gives ``e = 0`` up to
rounding). p-value, exceedance test (``p0`` given): the number of prompts where ``|e| > floor``
against Binomial(N, p0), p0 = the chance noise alone passes the floor on a prompt. Else: one-sided Student t of ``(m - floor) / se`` with ``se`` the cluster-robust
standard error over topic groups (df = groups - 1); a head with no spread gets p = 0 above the
floor and 1 at or below it (for Storey's estimate, which needs p-values uniform under the null,
such units get evenly spread p-values ``p_uniform`` instead; BH uses the conservative 1). Units with
spread but a mean below the floor get p-values above uniform (the null is "at most the floor"), so
Storey's share is then conservative. With ``null`` (the same statistic on units known not to differ, e.g. a
self-diff or resampled prompts), empirical p-values ``(1 + #{null >= m}) / (1 + M)`` instead.

- :func:`bh`: Benjamini-Hochberg discoveries at false-discovery rate ``q``;
- :func:`storey_pi0`: Storey's estimate of the share of null units, ``#{p > lambda} / ((1 - lambda) U)``
  (so ``1 - pi0`` estimates the share of changed units without a cut);
- :func:`count_changed`: both, with a cluster-bootstrap interval over topic groups for the share;
- :func:`auroc`, :func:`recovery_vs_truth`: AUROC and precision at the true count, with chance.
"""
from __future__ import annotations

import math

import torch

from mechdiff.analyses.intervals import bootstrap, pack, units
from mechdiff.errors import ConfigError, DataError

__all__ = ["t_sf", "binom_sf", "head_pvalues", "empirical_pvalues", "bh", "storey_pi0", "count_changed", "auroc",
           "recovery_vs_truth"]


def _t_quantile(p: torch.Tensor, df: float) -> torch.Tensor:
    """Tensor version of :func:`mechdiff.analyses.resample.t_quantile` (Cornish-Fisher)."""
    z = torch.special.ndtri(p)
    if not math.isfinite(df) or df > 1e6:
        return z
    v = float(df)
    q = z * z
    return z * (1 + (q + 1) / (4 * v) + ((5 * q + 16) * q + 3) / (96 * v**2)
                + (((3 * q + 19) * q + 17) * q - 15) / (384 * v**3)
                + ((((79 * q + 776) * q + 1482) * q - 1920) * q - 945) / (92160 * v**4))


def t_sf(z, df: float):
    """Upper tail ``P(T > z)`` of Student t with ``df`` degrees of freedom, elementwise (bisection in
    log p on the Cornish-Fisher quantile; normal for df = inf). A float in, a float out."""
    scalar = not torch.is_tensor(z)
    z = torch.as_tensor(z, dtype=torch.float64)
    if not math.isfinite(df):
        out = 0.5 * torch.special.erfc(z / math.sqrt(2))
    else:
        lo = torch.full_like(z, math.log(1e-300))       # log p with t_quantile(1 - p) = z
        hi = torch.full_like(z, math.log(1 - 1e-16))
        for _ in range(45):
            mid = (lo + hi) / 2
            above = -_t_quantile(mid.exp(), df) > z    # the (1 - p) quantile above z: p too small
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        out = hi.exp()
        out = torch.where(z >= -_t_quantile(torch.tensor(1e-300, dtype=torch.float64), df), 0.0, out)
        out = torch.where(z <= _t_quantile(torch.tensor(1e-15, dtype=torch.float64), df), 1.0, out)
    out = torch.where(torch.isnan(z), 1.0, out)
    return float(out) if scalar else out


def _cluster_se(x: torch.Tensor, uid: torch.Tensor, G: int) -> torch.Tensor:
    """``[U]`` cluster-robust SE of the row means of ``x [U, N]`` (groups ``uid [N]``)."""
    N = x.shape[1]
    sums = torch.zeros(x.shape[0], G, dtype=torch.float64).index_add_(1, uid, x)
    cnt = torch.zeros(G, dtype=torch.float64).index_add_(0, uid, torch.ones(N, dtype=torch.float64))
    resid = sums - x.mean(1, keepdim=True) * cnt[None]              # sum over each group of (x - mean)
    return (resid.pow(2).sum(1) * G / max(G - 1, 1)).sqrt() / N


def binom_sf(k: torch.Tensor, n: int, p0: float) -> torch.Tensor:
    """``P(X >= k)`` for ``X ~ Binomial(n, p0)``, elementwise over integer ``k [U]`` (exact sums in log space)."""
    x = torch.arange(n + 1, dtype=torch.float64)
    lg = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
    logpmf = lg + x * math.log(max(p0, 1e-300)) + (n - x) * math.log1p(-min(p0, 1 - 1e-16))
    tail = torch.logcumsumexp(logpmf.flip(0), 0).flip(0).exp().clamp(max=1.0)     # tail[j] = P(X >= j)
    return tail[k.long().clamp(0, n)]


def head_pvalues(e, groups=None, floor: float = 0.0, p0: float | None = None) -> dict:
    """``{"stat" [U] = mean |e|, "se" [U], "p" [U], "p_uniform" [U], "df"}`` for per-prompt effects
    ``e [U, N]``. ``p0``: the exceedance test instead of the t test: the number of prompts on which
    ``|e| > floor`` against Binomial(N, p0), ``p0`` the chance that noise alone exceeds the floor on
    one prompt (e.g. ``(1 + #noise draws above the floor) / (1 + #noise draws)``); prompts are taken
    as independent, so topic groups play no part in this test."""
    e = torch.as_tensor(e, dtype=torch.float64)
    if e.dim() != 2 or e.shape[1] < 2:
        raise DataError(f"head tests need per-prompt effects [units, N >= 2], got {tuple(e.shape)}")
    uid, G, _ = units(e.shape[1], groups)
    a = e.abs()
    m, se = a.mean(1), _cluster_se(a, uid, G)
    if p0 is not None:
        hits = (a > floor).sum(1)
        p = binom_sf(hits, a.shape[1], float(p0))
        flat = torch.nonzero(hits == 0).reshape(-1)
        p[flat] = 1.0
    else:
        ok = (se > 0) & torch.isfinite(se)
        p = torch.where(ok, t_sf((m - floor) / torch.where(ok, se, 1.0), G - 1), (m <= floor).double())
        flat = torch.nonzero(~ok & (m <= floor)).reshape(-1)
    spread = p.clone()        # units with no evidence at all: a p-value uniform under the null (grid)
    spread[flat] = (torch.arange(flat.numel(), dtype=torch.float64) + 0.5) / max(flat.numel(), 1)
    return {"stat": m, "se": se, "p": p, "p_uniform": spread, "df": G - 1}


def empirical_pvalues(stat, null) -> torch.Tensor:
    """``(1 + #{null >= s}) / (1 + M)`` for each ``s`` in ``stat [U]`` against null statistics ``[M]``."""
    s, n0 = torch.as_tensor(stat, dtype=torch.float64).reshape(-1), torch.as_tensor(null, dtype=torch.float64).reshape(-1)
    if n0.numel() == 0:
        raise DataError("an empirical p-value needs at least one null statistic")
    return (1 + (n0[None, :] >= s[:, None]).sum(1).double()) / (1 + n0.numel())


def bh(p, q: float = 0.05) -> torch.Tensor:
    """``[U]`` bool: Benjamini-Hochberg discoveries at false-discovery rate ``q``."""
    if not 0 < q < 1:
        raise ConfigError(f"FDR level q must be in (0, 1), got {q}")
    p = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
    U = p.numel()
    order = torch.argsort(p, stable=True)
    ok = p[order] <= q * torch.arange(1, U + 1, dtype=torch.float64) / U
    out = torch.zeros(U, dtype=torch.bool)
    if ok.any():
        last = int(torch.nonzero(ok).max())
        out[order[:last + 1]] = True
    return out


def storey_pi0(p, lam: float = 0.5) -> float:
    """Storey's share of null units, ``min(1, #{p > lam} / ((1 - lam) U))``."""
    p = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
    if not 0 < lam < 1 or p.numel() == 0:
        raise ConfigError(f"storey_pi0 needs 0 < lambda < 1 and p-values, got lambda={lam}, {p.numel()} p-values")
    return min(1.0, float((p > lam).double().sum()) / ((1 - lam) * p.numel()))


def count_changed(e, groups=None, *, floor: float = 0.0, q: float = 0.05, lam: float = 0.5, null=None,
                  p0: float | None = None, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """Changed units among ``e [U, N]``: ``{"share" (BH discoveries / U), "n_changed", "changed" [U]
    bool, "share_storey" (1 - pi0), "p" [U], "stat" [U], "q", "share_interval", "storey_interval"}``
    (intervals: cluster bootstrap over topic groups, p-values recomputed on each draw of prompts)."""
    e = torch.as_tensor(e, dtype=torch.float64)

    def pv(cols):
        r = head_pvalues(e[:, cols], None if groups is None else torch.as_tensor(groups).reshape(-1)[cols], floor, p0)
        if null is not None:
            p = empirical_pvalues(r["stat"], null)
            r = {**r, "p": p, "p_uniform": p}
        return r
    full = pv(torch.arange(e.shape[1]))
    disc = bh(full["p"], q)
    U = e.shape[0]
    kw = dict(n_boot=n_boot, level=level, seed=seed)
    storey: list[float] = []

    def stat(cols):                     # one set of p-values per draw, for both shares
        r = pv(cols)
        storey.append(1 - storey_pi0(r["p_uniform"], lam))
        return float(bh(r["p"], q).double().mean())
    share_iv = bootstrap(stat, e.shape[1], groups, **kw)
    storey_iv = pack(storey[-1], torch.tensor(storey[:-1], dtype=torch.float64), level, share_iv["n_groups"], n_boot,
                     share_iv["method"])
    return {"share": float(disc.double().mean()), "n_changed": int(disc.sum()), "n_units": U,
            "changed": disc.tolist(), "share_storey": 1 - storey_pi0(full["p_uniform"], lam), "p": full["p"].tolist(),
            "stat": full["stat"].tolist(), "q": q, "lambda": lam, "floor": floor,
            "test": "empirical p-values against the null statistics" if null is not None else
            f"prompts with |effect| above the floor vs Binomial(N, {p0:.3g}) (noise above the floor)" if p0 is not None
            else "one-sided t of mean |effect| above the floor, cluster-robust SE over topic groups",
            "share_interval": {**share_iv, "estimate": float(disc.double().mean())},
            "storey_interval": {**storey_iv, "estimate": 1 - storey_pi0(full["p_uniform"], lam)}}


def auroc(score, truth) -> float:
    """Area under the ROC curve of ``score [U]`` for ``truth [U]`` (bool): P(score of a true unit >
    score of a null unit), ties counting 1/2. NaN when one class is empty."""
    s = torch.as_tensor(score, dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(truth, dtype=torch.bool).reshape(-1)
    pos, neg = s[t], s[~t]
    if pos.numel() == 0 or neg.numel() == 0:
        return math.nan
    gt = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(gt / (pos.numel() * neg.numel()))


def recovery_vs_truth(score, truth, changed=None) -> dict:
    """Against a known truth: AUROC (chance 0.5), precision at the true count m (the m top-scoring
    units; chance m / U), and with ``changed`` (the test's calls) the false-discovery proportion,
    the recall and the estimated vs true share."""
    s = torch.as_tensor(score, dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(truth, dtype=torch.bool).reshape(-1)
    U, m = t.numel(), int(t.sum())
    top = torch.argsort(-s, stable=True)[:m]
    out = {"auroc": auroc(s, t), "auroc_chance": 0.5, "n_true": m, "n_units": U, "true_share": m / U,
           "precision_at_true_count": float(t[top].double().mean()) if m else math.nan,
           "precision_chance": m / U}
    if changed is not None:
        c = torch.as_tensor(changed, dtype=torch.bool).reshape(-1)
        out.update(estimated_share=float(c.double().mean()), recall=float((c & t).sum()) / m if m else math.nan,
                   false_discovery_proportion=float((c & ~t).sum()) / max(int(c.sum()), 1))
    return out

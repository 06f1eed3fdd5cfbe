"""Cluster-bootstrap intervals for headline numbers (resampling whole topic groups with replacement).

Every interval is a dict ``{"estimate", "ci_low", "ci_high", "se", "level", "n_groups", "n_boot",
"method"}`` (percentile interval of the bootstrap replicates; ``se`` their sd). Groups: one id per
row (prompt), e.g. ``experiments.steps.group_ids``; rows of one group are drawn together. Prompts
in fewer than ``MIN_GROUPS`` (5) groups are resampled one by one, and ``method`` says so.

- :func:`bootstrap`: any statistic ``stat(rows [n] long) -> float`` (rank estimate, Jaccard, ...).
- :func:`ratio_of_means`: ``mean(num) / mean(den)`` with numerator and denominator resampled
  together (the same groups in both); ``undefined`` when the denominator's interval contains 0.
- :func:`share_closed`: ``1 - mean(kl) / mean(gap)`` (RQ3's share of the gap closed; RQ2's drop).
- :func:`mean`: the mean of per-row values.
(The difference between two runs and its interval: :func:`mechdiff.verdict.difference`.)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from mechdiff.analyses.resample import unit_ids
from mechdiff.errors import ConfigError, DataError

__all__ = ["pack", "bootstrap", "ratio_of_means", "share_closed", "mean", "covers", "fmt"]

METHOD = "cluster bootstrap over topic groups (percentile)"
METHOD_ROWS = "bootstrap over prompts (percentile; only {g} topic group(s), too few to resample: the interval " \
    "ignores the topic clustering)"
MIN_GROUPS = 5


def units(n: int, groups=None) -> tuple[torch.Tensor, int, str]:
    """``(uid [n], n_units, method)``: the topic groups, or the rows themselves where ``groups`` is
    None or holds fewer than ``MIN_GROUPS`` groups (a bootstrap over 2-4 clusters has no meaningful
    percentiles; the method says so)."""
    uid, n_units = unit_ids(n, groups)
    if groups is None:
        return uid, n_units, "bootstrap over prompts (percentile)"
    if n_units < MIN_GROUPS and n > n_units:
        rows, n_rows = unit_ids(n, None)
        return rows, n_rows, METHOD_ROWS.format(g=n_units)
    return uid, n_units, METHOD


def _draws(uid: torch.Tensor, n_units: int, n_boot: int, seed: int) -> torch.Tensor:
    """``[n_boot, n_units]`` counts: how often each group is drawn (n_units draws with replacement)."""
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randint(0, n_units, (int(n_boot), n_units), generator=g)
    return torch.zeros(int(n_boot), n_units, dtype=torch.float64).scatter_add_(
        1, pick, torch.ones_like(pick, dtype=torch.float64))


def pack(estimate: float, reps: torch.Tensor, level: float, n_units: int, n_boot: int, method: str = METHOD,
         **extra) -> dict:
    """The interval dict of ``estimate`` from bootstrap replicates ``reps [B]`` (non-finite ones dropped)."""
    r = reps[torch.isfinite(reps)]
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    if r.numel() >= 2:
        lo, hi = (float(torch.quantile(r, q)) for q in (lo_q, hi_q))
        se = float(r.std())
    else:
        lo = hi = se = math.nan
    return {"estimate": float(estimate), "ci_low": lo, "ci_high": hi, "se": se, "level": level,
            "n_groups": int(n_units), "n_boot": int(n_boot), "method": method, **extra}


def _check(n: int, n_units: int, level: float) -> None:
    if not 0 < level < 1:
        raise ConfigError(f"interval level must be in (0, 1), got {level}")
    if n_units < 2:
        raise DataError(f"an interval needs at least 2 prompts or topic groups; got {n_units} ({n} rows): "
                        "add prompts")


def bootstrap(stat: Callable[[torch.Tensor], float], n: int, groups=None, *, n_boot: int = 500,
              level: float = 0.95, seed: int = 0, keep: bool = False) -> dict:
    """Percentile interval of ``stat`` over whole groups drawn with replacement. ``stat(rows)`` gets a
    1-D long tensor of row indices (a group drawn twice appears twice). ``keep``: also return the
    replicates (``"replicates"``, for :func:`difference`)."""
    uid, n_units, how = units(n, groups)
    _check(n, n_units, level)
    members = [torch.nonzero(uid == u).reshape(-1) for u in range(n_units)]
    W = _draws(uid, n_units, n_boot, seed).long()
    reps = []
    for w in W:
        rows = torch.cat([members[u].repeat(int(c)) for u, c in enumerate(w.tolist()) if c])
        reps.append(float(stat(rows)))
    r = torch.tensor(reps, dtype=torch.float64)
    return pack(float(stat(torch.arange(n))), r, level, n_units, n_boot, how,
                **({"replicates": reps} if keep else {}))


def _group_sums(x: torch.Tensor, uid: torch.Tensor, n_units: int) -> torch.Tensor:
    return torch.zeros(n_units, dtype=torch.float64).index_add_(0, uid, x.double().reshape(-1))


def ratio_of_means(num, den, groups=None, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                   keep: bool = False) -> dict:
    """``mean(num) / mean(den)`` (``num``, ``den``: ``[N]`` per row) with a cluster-bootstrap
    interval in which each replicate draws the same groups for both. Adds ``den_ci`` (the
    denominator's own interval) and ``undefined`` (True when it contains 0: then the ratio has no
    interval and ``ci_low``/``ci_high`` are NaN)."""
    num, den = torch.as_tensor(num, dtype=torch.float64).reshape(-1), torch.as_tensor(den, dtype=torch.float64).reshape(-1)
    if num.shape != den.shape or num.numel() == 0:
        raise ConfigError(f"ratio_of_means needs numerator and denominator of one length, got {num.numel()} "
                          f"and {den.numel()}")
    uid, n_units, how = units(num.numel(), groups)
    _check(num.numel(), n_units, level)
    W = _draws(uid, n_units, n_boot, seed)
    cnt = _group_sums(torch.ones_like(num), uid, n_units)
    sn, sd = W @ _group_sums(num, uid, n_units), W @ _group_sums(den, uid, n_units)
    nrow = W @ cnt
    mn, md = sn / nrow, sd / nrow
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    den_ci = [float(torch.quantile(md, lo_q)), float(torch.quantile(md, hi_q))]
    undefined = den_ci[0] <= 0 <= den_ci[1]
    est = float(num.mean() / den.mean()) if float(den.mean()) != 0 else math.nan
    out = pack(est, mn / md, level, n_units, n_boot, how, den_ci=den_ci, undefined=bool(undefined),
                **({"replicates": (mn / md).tolist()} if keep else {}))
    if undefined:
        out.update(ci_low=math.nan, ci_high=math.nan, se=math.nan)
    return out


def share_closed(kl, gap, groups=None, **kw) -> dict:
    """``1 - mean(kl) / mean(gap)`` (the share of the gap a patch closes; ``kl``, ``gap``: ``[N]``),
    its interval the ratio's mapped through ``1 - r`` (bounds swap)."""
    r = ratio_of_means(kl, gap, groups, **kw)
    out = {**r, "estimate": 1 - r["estimate"], "ci_low": 1 - r["ci_high"], "ci_high": 1 - r["ci_low"]}
    if "replicates" in r:
        out["replicates"] = [1 - x for x in r["replicates"]]
    return out


def mean(x, groups=None, **kw) -> dict:
    """Mean of per-row values ``x [N]`` with its cluster-bootstrap interval."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    r = ratio_of_means(x, torch.ones_like(x), groups, **kw)
    return {k: v for k, v in r.items() if k not in ("den_ci", "undefined")}


def covers(iv: dict, value: float = 0.0) -> bool:
    """True when the interval contains ``value`` (an undefined / NaN interval covers everything)."""
    lo, hi = iv.get("ci_low", math.nan), iv.get("ci_high", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return True
    return lo <= value <= hi


def fmt(iv: dict | None, spec: str = "{:.3g}") -> str:
    """``"0.42 [0.31, 0.55]"``; ``"undefined (denominator interval contains 0)"``; ``"n/a"``."""
    if not iv:
        return "n/a"
    if iv.get("undefined"):
        return f"{spec.format(iv['estimate'])} (undefined: the denominator's interval contains 0)"
    lo, hi = iv.get("ci_low", math.nan), iv.get("ci_high", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{spec.format(iv['estimate'])} (no interval)"
    return f"{spec.format(iv['estimate'])} [{spec.format(lo)}, {spec.format(hi)}]"

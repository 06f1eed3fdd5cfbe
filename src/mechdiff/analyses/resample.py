"""Resampling without replacement over prompt groups: delete-group jackknife and half-sampling.

Both resample *units* (prompts), never individual rows, when ``groups`` is given: all rows that share a
group id are kept or dropped together. Never bootstrap with replacement: duplicated rows bring back
the diagonal terms that debiased CKA removes (MATH.md).

``stat_fn(indices) -> float`` receives a 1-D LongTensor of row indices (sorted) into the data.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from mechdiff.errors import ConfigError, DataError

__all__ = ["unit_ids", "t_quantile", "delete_group_jackknife", "half_sample"]

StatFn = Callable[[torch.Tensor], float]


def unit_ids(n: int, groups=None) -> tuple[torch.Tensor, int]:
    """Map rows to consecutive unit ids. Returns (uid [n] long, n_units).

    Without ``groups`` every row is its own unit."""
    if n <= 0:
        raise DataError("resampling needs at least one row")
    if groups is None:
        return torch.arange(n), n
    g = torch.as_tensor(groups).reshape(-1).cpu()
    if g.numel() != n:
        raise ConfigError(f"groups has {g.numel()} entries but the data has {n} rows; pass one id per row")
    _, uid = torch.unique(g, return_inverse=True)
    return uid.long(), int(uid.max()) + 1


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile via the Cornish-Fisher expansion around the normal quantile.

    Accurate to ~1e-3 for df >= 3 (exact normal for df = inf); no scipy needed."""
    z = float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
    if not math.isfinite(df) or df > 1e6:
        return z
    v = float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def _rows_of_units(uid: torch.Tensor, keep_units: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(keep_units[uid], as_tuple=False).reshape(-1)


def delete_group_jackknife(stat_fn: StatFn, n: int, groups=None, n_groups: int = 20, *,
                           seed: int = 0, level: float = 0.95) -> dict:
    """Delete-a-group jackknife over units (prompts).

    Units are split at random (seeded) into ``B = min(n_groups, n_units)`` near-equal blocks; with
    ``n_units <= n_groups`` this is the ordinary delete-one-unit jackknife. Each replicate drops one
    block. SE = sqrt((B-1)/B * sum_b (theta_b - theta_bar)^2); CI = theta -/+ t_{B-1} * SE.

    Returns dict: estimate (full-data stat), se, ci_low, ci_high, bias (jackknife bias estimate
    (B-1)(theta_bar - theta)), replicates [B] (list), blocks (list of unit-id lists), n_units, n_blocks.
    """
    uid, n_units = unit_ids(n, groups)
    B = min(int(n_groups), n_units)
    if B < 2:
        raise DataError(f"jackknife needs at least 2 units (prompts); got {n_units}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_units, generator=gen)
    block_of_unit = torch.empty(n_units, dtype=torch.long)
    block_of_unit[order] = torch.arange(n_units) % B
    theta = float(stat_fn(torch.arange(n)))
    reps = []
    for b in range(B):
        keep = block_of_unit != b
        reps.append(float(stat_fn(_rows_of_units(uid, keep))))
    r = torch.tensor(reps, dtype=torch.float64)
    finite = torch.isfinite(r)
    rf = r[finite]
    if rf.numel() < 2:
        se = float("nan")
        bias = float("nan")
    else:
        Bf = rf.numel()
        se = math.sqrt((Bf - 1) / Bf * float(((rf - rf.mean()) ** 2).sum()))
        bias = (Bf - 1) * (float(rf.mean()) - theta)
    t = t_quantile(0.5 + level / 2, B - 1)
    blocks = [torch.nonzero(block_of_unit == b).reshape(-1).tolist() for b in range(B)]
    return dict(estimate=theta, se=se, ci_low=theta - t * se, ci_high=theta + t * se, bias=bias,
                replicates=reps, blocks=blocks, n_units=n_units, n_blocks=B, method="jackknife")


def half_sample(stat_fn: StatFn, n: int, groups=None, n_rep: int = 50, seed: int = 0, *,
                level: float = 0.95) -> dict:
    """Half-sampling without replacement over units (prompts).

    Each replicate keeps a random half (floor(n_units/2)) of the units. For a smooth statistic the
    variance of a half-sample estimate about the full sample equals the sampling variance of the
    full-sample estimate to first order (finite-population correction: 1/(n/2) - 1/n = 1/n), so
    SE = sd(replicates). CI = theta -/+ z * SE (normal).

    Returns dict: estimate, se, ci_low, ci_high, replicates (list), n_units, n_rep.
    """
    uid, n_units = unit_ids(n, groups)
    h = n_units // 2
    if h < 2:
        raise DataError(f"half-sampling needs at least 4 units (prompts); got {n_units}")
    gen = torch.Generator().manual_seed(seed)
    theta = float(stat_fn(torch.arange(n)))
    reps = []
    for _ in range(int(n_rep)):
        keep = torch.zeros(n_units, dtype=torch.bool)
        keep[torch.randperm(n_units, generator=gen)[:h]] = True
        reps.append(float(stat_fn(_rows_of_units(uid, keep))))
    r = torch.tensor(reps, dtype=torch.float64)
    rf = r[torch.isfinite(r)]
    se = float(rf.std(unbiased=True)) if rf.numel() >= 2 else float("nan")
    z = t_quantile(0.5 + level / 2, float("inf"))
    return dict(estimate=theta, se=se, ci_low=theta - z * se, ci_high=theta + z * se,
                replicates=reps, n_units=n_units, n_rep=int(n_rep), method="halfsample")

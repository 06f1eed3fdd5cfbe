"""The dimension of a change at one layer, the saturation k of an effect-vs-k curve, and principal
angles between subspaces (pure math; see /work/shared/MATH.md "Rank, counts and texts").

Rank estimate (:func:`estimate_rank`): paired differences ``D = H_tuned - H_base`` ``[n, d]`` (rows:
prompts x positions, the same input on both sides; not centred by default, so a mean shift counts
as one direction) and their singular values ``s_1 >= s_2 >= ...``. The estimate is the number of
``s_i`` above a noise threshold, the largest of

- the numerical floor: ``8 eps_float32 ||H||_F`` (``||H||_F = rms(H) sqrt(n d)``, ``scale`` = rms(H)):
  rounding of states computed in float32 need not be isotropic (a few huge residual dimensions put
  it in one direction, measured at 3e-5 of the largest singular value on a trained LoRA), so the
  floor bounds a coherent error, not the edge of white noise; without ``scale``,
  ``s_1 max(n, d) eps_float32``;
- the noise edge: the Gavish-Donoho threshold ``omega(beta) median(s)`` (beta = the aspect ratio):
  the optimal hard threshold for a low-rank matrix in white noise of unknown level (the bulk of
  the spectrum, Marchenko-Pastur distributed, sets the level), or, with ``null`` (difference rows
  built the same way from pairs that should not differ, e.g. a split-half / resampled-prompt
  difference or a self pair run another way), the Marchenko-Pastur edge at the null's rms entry
  ``sigma (sqrt(n) + sqrt(d))``, widened by ``3 min(n, d)^(-2/3)`` for the Tracy-Widom spread of a
  finite matrix's top noise value.

A model against itself gives ``D = 0`` and the estimate 0. A rank-r weight update ``W + BA`` at the
layer makes D exactly rank r (``exact``: every singular value past the estimate sits at the
numerical floor). Interval: cluster bootstrap over topic groups (whole groups drawn with
replacement; a replicate counts on its distinct rows, since a duplicated row adds no direction,
against the full data's noise level rescaled to the replicate's shape), shifted by the bootstrap's
bias (estimate - median replicate: a replicate's ~63% distinct rows resolve fewer components of a
graded spectrum, so the raw percentile interval can lie wholly below the estimate).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mechdiff.analyses.intervals import bootstrap
from mechdiff.errors import ConfigError, DataError, NumericsError

EPS32 = float(torch.finfo(torch.float32).eps)

__all__ = ["differences", "gd_omega", "numeric_floor", "threshold", "count_above", "estimate_rank",
           "saturation_k", "smallest_k", "principal_angles"]


def differences(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` float64 rows of ``tuned - base`` (``[N, d]`` or ``[N, T, d]`` each, flattened over
    positions)."""
    if tuned.shape != base.shape:
        raise ConfigError(f"paired states must have one shape, got {tuple(tuned.shape)} and {tuple(base.shape)}")
    D = (tuned.double() - base.double()).reshape(-1, tuned.shape[-1])
    if not torch.isfinite(D).all():
        raise NumericsError("the paired differences contain NaN/Inf")
    return D


def gd_omega(beta: float) -> float:
    """Gavish-Donoho (2014) ``omega(beta)``, unknown noise level: threshold = omega x median(s)."""
    b = min(max(float(beta), 1e-6), 1.0)
    return 0.56 * b ** 3 - 0.95 * b ** 2 + 1.82 * b + 1.43


def numeric_floor(n: int, d: int, scale: float | None, s1: float = 0.0) -> float:
    """Largest singular value float32 rounding alone can give an ``[n, d]`` difference of states of
    rms ``scale`` (see the module docstring)."""
    if scale is not None:
        return 8 * EPS32 * float(scale) * math.sqrt(n * d)
    return float(s1) * max(n, d) * EPS32


def threshold(S: torch.Tensor, n: int, d: int, *, scale: float | None = None, null: torch.Tensor | None = None,
              sigma: float | None = None) -> dict:
    """``{"threshold", "floor", "noise", "noise_method", "sigma"}`` for singular values ``S`` of an
    ``[n, d]`` D; ``sigma``: a noise level per unit of ``sqrt(n) + sqrt(d)`` fixed beforehand (the
    bootstrap's replicates use the full data's, so that a replicate of few distinct rows, whose own
    median singular value is signal, is not measured against itself)."""
    S = S.double()
    floor = numeric_floor(n, d, scale, float(S[0]) if S.numel() else 0.0)
    edge = math.sqrt(n) + math.sqrt(d)
    if sigma is not None:
        noise, how = sigma * edge, "the full data's noise edge, rescaled to this shape"
    elif null is not None:
        N0 = null.double().reshape(-1, null.shape[-1])
        sigma = float(N0.pow(2).mean().sqrt()) if N0.numel() else 0.0
        noise = sigma * (math.sqrt(n) + math.sqrt(d)) * (1 + 3 * min(n, d) ** (-2 / 3))
        how = "Marchenko-Pastur edge of the null difference's noise level (+ a Tracy-Widom margin)"
    else:
        m, M = min(n, d), max(n, d)
        noise = gd_omega(m / M) * float(S[:m].median()) if m else 0.0
        how = "Gavish-Donoho: omega(beta) x median singular value"
    return {"threshold": max(floor, noise), "floor": floor, "noise": noise, "noise_method": how,
            "sigma": noise / edge}


def count_above(D: torch.Tensor, *, scale: float | None = None, null: torch.Tensor | None = None,
                sigma: float | None = None) -> int:
    """The number of singular values of ``D [n, d]`` strictly above :func:`threshold`."""
    if D.shape[0] == 0:
        return 0
    S = torch.linalg.svdvals(D.double())
    return int(((S > threshold(S, *D.shape, scale=scale, null=null, sigma=sigma)["threshold"]) & (S > 0)).sum())


def estimate_rank(D: torch.Tensor, groups=None, *, scale: float | None = None, null: torch.Tensor | None = None,
                  centre: bool = False, n_boot: int = 200, level: float = 0.95, seed: int = 0, top: int = 16) -> dict:
    """Rank estimate of the difference rows ``D [n, d]`` with a cluster-bootstrap interval over
    ``groups`` (one id per row; rows of one prompt share its group). ``centre``: subtract the mean
    row first (then a pure mean shift is rank 0). Returns ``{"estimate", "ci_low", "ci_high", ...,
    "exact", "singular_values" (top ``top``), "threshold", "floor", "noise", "noise_method",
    "centred", "n_rows", "d"}``."""
    D = D.double()
    if D.dim() != 2 or D.shape[0] < 2:
        raise DataError(f"a rank estimate needs difference rows [n >= 2, d], got {tuple(D.shape)}")
    if centre:
        D = D - D.mean(0)
    n, d = D.shape
    S = torch.linalg.svdvals(D)
    th = threshold(S, n, d, scale=scale, null=null)
    r = int(((S > th["threshold"]) & (S > 0)).sum())
    exact = r < S.numel() and float(S[r]) <= th["floor"]

    def stat(rows: torch.Tensor) -> float:
        X = D[rows.unique()]
        return float(count_above(X - X.mean(0) if centre else X, scale=scale, sigma=th["sigma"]))
    iv = bootstrap(stat, n, groups, n_boot=n_boot, level=level, seed=seed, keep=True)
    # A replicate holds ~63% of the groups as distinct rows, and fewer rows resolve fewer of a
    # graded spectrum's components: the count is biased down. Shift the percentile interval by that
    # bias (estimate - median replicate); 0 where every replicate finds the same rank (exact low rank).
    bias = r - float(torch.tensor(iv.pop("replicates"), dtype=torch.float64).median())
    iv["ci_low"], iv["ci_high"] = math.floor(iv["ci_low"] + bias), math.ceil(iv["ci_high"] + bias)
    iv["bias_shift"] = bias
    return {**iv, "estimate": r, "exact": bool(exact), "singular_values": S[:top].tolist(), **th,
            "centred": centre, "n_rows": n, "d": d}


# ---------------------------------------------------------------------------------------- saturation
def saturation_k(effects: dict, full: float, frac: float = 0.9) -> int | None:
    """Smallest k whose effect reaches ``frac`` of ``full`` (the effect of ablating / patching the
    whole difference), None when no k does or ``full <= 0`` (nothing to saturate towards).
    ``effects``: ``{k: effect}`` (e.g. share of the gap closed)."""
    if not 0 < frac <= 1:
        raise ConfigError(f"saturation fraction must be in (0, 1], got {frac}")
    if full is None or not math.isfinite(full) or full <= 0:
        return None
    return next((k for k in sorted(effects) if effects[k] is not None and math.isfinite(effects[k])
                 and effects[k] >= frac * full), None)


def smallest_k(kl_by_k: torch.Tensor, ks: Sequence[int], gap: torch.Tensor, groups=None, *,
               kl_full: torch.Tensor | None = None, frac: float = 0.9, threshold: float | None = None,
               n_boot: int = 500, level: float = 0.95, seed: int = 0) -> dict:
    """The smallest k whose share of the gap closed, ``share_k = 1 - mean(kl_k) / mean(gap)``, reaches
    ``frac`` of the whole difference's share ``1 - mean(kl_full) / mean(gap)`` (saturation; with
    ``kl_full``) or the absolute ``threshold`` (minimal k). ``kl_by_k [K, N]`` per-prompt KL to the
    other model with the rank-k handle, ``kl_full``/``gap`` ``[N]``. Interval: cluster bootstrap
    (one draw of groups for every k and the full effect); a replicate where no k qualifies counts as
    ``max(ks) + 1`` ("beyond the grid": ``ci_high`` None). Returns ``{"estimate", "ci_low",
    "ci_high", "shares", "full_share", "frac" | "threshold", "not_reached" (share of replicates
    where no k qualifies), ...}``."""
    kl_by_k, gap = torch.as_tensor(kl_by_k, dtype=torch.float64), torch.as_tensor(gap, dtype=torch.float64)
    full_kl = None if kl_full is None else torch.as_tensor(kl_full, dtype=torch.float64)
    if (kl_full is None) == (threshold is None):
        raise ConfigError("smallest_k needs exactly one of kl_full (saturation) and threshold (minimal k)")
    if kl_by_k.shape != (len(ks), gap.numel()) or (full_kl is not None and full_kl.shape != gap.shape):
        raise ConfigError(f"smallest_k: kl_by_k must be [len(ks), N], kl_full and gap [N]; got "
                          f"{tuple(kl_by_k.shape)}, {None if full_kl is None else tuple(full_kl.shape)}, {tuple(gap.shape)}")
    beyond = max(ks) + 1

    def pick(rows):
        g = float(gap[rows].mean())
        if not g > 0:
            return None, None, {}
        sh = {k: 1 - float(kl_by_k[i, rows].mean()) / g for i, k in enumerate(ks)}
        if full_kl is None:
            return next((k for k in sorted(sh) if sh[k] >= threshold), None), None, sh
        full = 1 - float(full_kl[rows].mean()) / g
        return saturation_k(sh, full, frac), full, sh

    def stat(rows):
        k = pick(rows)[0]
        return float(beyond if k is None else k)
    k, full, sh = pick(torch.arange(gap.numel()))
    iv = bootstrap(stat, gap.numel(), groups, n_boot=n_boot, level=level, seed=seed, keep=True)
    reps = iv.pop("replicates")
    rule = {"frac": frac} if full_kl is not None else {"threshold": threshold}
    return {**iv, "estimate": k, "ci_low": int(iv["ci_low"]) if iv["ci_low"] < beyond else None,
            "ci_high": int(iv["ci_high"]) if iv["ci_high"] < beyond else None, "shares": sh, "full_share": full,
            **rule, "not_reached": sum(r >= beyond for r in reps) / len(reps)}


# ---------------------------------------------------------------------------------------- angles
def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees (ascending) between span(A) and span(B) (``[d, ka]``, ``[d, kb]``):
    orthonormalise both (QR), the singular values of ``Qa^T Qb`` are the cosines. ``min(ka, kb)``
    angles; the largest is the headline."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[0]:
        raise ConfigError(f"principal angles need [d, ka] and [d, kb] of one d, got {tuple(A.shape)}, {tuple(B.shape)}")
    Qa, _ = torch.linalg.qr(A.double())
    Qb, _ = torch.linalg.qr(B.double())
    c = torch.linalg.svdvals(Qa.T @ Qb).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(c)).sort().values

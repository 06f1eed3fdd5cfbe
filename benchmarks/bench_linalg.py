#!/usr/bin/env python
"""CKA and map fitting at the GPU sizes (no models needed), each section alone or from bench_gpu.py:

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_linalg.py      # both sections
    python benchmarks/bench_linalg.py --sections maps_detail                 # one section
    python benchmarks/bench_linalg.py --tiny                                 # small sizes on CPU (dry run)

Sections:
  linalg       cka_per_layer on 32 layers of 10k x 4096 (GPU-resident, from the CPU, bf16, TF32);
               RidgeMap.fit with its 17-point lambda grid on 10k x 4096 (val 2k) and its float64 SVD
               alone; the seeds' size (450 x 4096)
  maps_detail  Ridge / Procrustes / scaled Procrustes / Whitener fits at the seeds' size (450 x 4096),
               the full d x d SVD procrustes() no longer needs, and checks of the new R

Output: markdown tables on stdout; with $OUT (or --out) also $OUT/bench.log and
$OUT/linalg_results.md/.json.
"""
from __future__ import annotations

import torch

import common as C
from common import cleanup, section, table, timeit


@section("linalg")
def sec_linalg(L, N, d, n_val, reps):
    from mechdiff.analyses.cka import cka_per_layer
    from mechdiff.analyses.maps import RidgeMap
    DEV, RESULTS = C.DEV, C.RESULTS
    g = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    X = torch.randn(L, N, d, device=DEV, generator=g)
    # Y correlated with X so CKA is not ~0: Y = X A + noise (A shared over layers)
    A = torch.randn(d, d, device=DEV, generator=g) / d ** 0.5
    Y = torch.empty_like(X)
    for l in range(L):
        Y[l] = X[l] @ A + 0.5 * torch.randn(N, d, device=DEV, generator=g)
    del A
    t, (lo, hi) = timeit(lambda: cka_per_layer(X, Y), warmup=1, reps=reps)
    c = cka_per_layer(X, Y)
    rows.append([f"cka_per_layer, {L} layers x {N} x {d}, float32 on {DEV.type}", t, f"{lo:.3f}-{hi:.3f}",
                 "< 1 s" if DEV.type == "cuda" else "-", f"CKA[0]={c[0].item():.4f}"])
    RESULTS["cka_s"] = t
    if DEV.type == "cuda":  # what TF32 matmuls would give (a change the CKA owner could make)
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            t_tf, _ = timeit(lambda: cka_per_layer(X, Y), warmup=1, reps=reps)
            c_tf = cka_per_layer(X, Y)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        rows.append(["same with TF32 matmuls allowed (not the module's setting)", t_tf, "", "-",
                     f"max |CKA_tf32 - CKA_fp32| = {(c_tf - c).abs().max().item():.2g}"])
        RESULTS["cka_tf32_s"] = t_tf
    if DEV.type == "cuda":
        Xc, Yc = X.cpu(), Y.cpu()
        t2, _ = timeit(lambda: cka_per_layer(Xc.to(DEV), Yc.to(DEV)), warmup=1, reps=max(2, reps // 2))
        rows.append([f"same, inputs on the CPU (H2D copy of {2 * Xc.numel() * 4 / 2**30:.1f} GiB included)",
                     t2, "", "-", ""])
        RESULTS["cka_from_cpu_s"] = t2
        del Xc, Yc
        Xb, Yb = X.bfloat16(), Y.bfloat16()
        t3, _ = timeit(lambda: cka_per_layer(Xb, Yb), warmup=1, reps=reps)
        rows.append(["same, bf16 inputs on the GPU", t3, "", "-", ""])
        del Xb, Yb
    Xtr, Ytr = X[0].clone(), Y[0].clone()
    Xv, Yv = X[1, :n_val].clone(), Y[1, :n_val].clone()
    del X, Y
    cleanup()
    _ = torch.linalg.svd(torch.randn(64, 32, device=DEV, dtype=torch.float64), full_matrices=False)  # solver init
    _ = torch.linalg.eigh(torch.eye(32, device=DEV, dtype=torch.float64))
    box = {}
    t, (lo, hi) = timeit(lambda: box.__setitem__("m", RidgeMap().fit(Xtr, Ytr, Xv, Yv)), warmup=0, reps=2)
    m = box["m"]
    rows.append([f"RidgeMap.fit, {N} x {d} -> {d}, 17-lambda grid, val {n_val} rows", t, f"{lo:.3f}-{hi:.3f}",
                 "< 2 s" if DEV.type == "cuda" else "-", f"lambda={m.lambda_:.3g}"])
    RESULTS["ridge_s"] = t
    # where the time goes inside the ridge fit (float64 SVD vs the rest)
    X64 = Xtr.double() - Xtr.double().mean(0)
    t_svd, _ = timeit(lambda: torch.linalg.svd(X64, full_matrices=False), warmup=0, reps=1)
    rows.append([f"  of which: float64 thin SVD of {N} x {d} (torch.linalg.svd)", t_svd, "", "", ""])
    t_eig, _ = timeit(lambda: torch.linalg.eigh(X64.T @ X64), warmup=0, reps=1)
    rows.append([f"  alternative: float64 eigh of the {d} x {d} Gram X^T X", t_eig, "", "", ""])
    del X64
    # seeds' size: 450 train / 150 val, every 2nd layer
    Xs, Ys = Xtr[:450], Ytr[:450]
    Xsv, Ysv = Xv[:150], Yv[:150]
    n_l = (L + 1) // 2
    t4, _ = timeit(lambda: [RidgeMap().fit(Xs, Ys, Xsv, Ysv) for _ in range(n_l)], warmup=0, reps=1)
    rows.append([f"RidgeMap.fit x {n_l} layers at the seeds' size (450 x {d}, val 150)", t4, "", "-", ""])
    table("CKA and maps", ["what", "seconds (median)", "min-max", "target", "check"], rows)


@section("maps_detail")
def sec_maps_detail(N, d):
    """Map fitting at the seeds' size (N=450 < d): ProcrustesMap / ScaledProcrustesMap after the
    procrustes() change, the full d x d SVD (gesvd driver) it no longer needs, and checks that the
    new R equals the full-SVD R on the training rows, is orthogonal, and is the identity off both
    spans."""
    from mechdiff.analyses.maps import ProcrustesMap, RidgeMap, ScaledProcrustesMap, Whitener, procrustes
    DEV = C.DEV
    g = torch.Generator(device=DEV).manual_seed(0)
    X = torch.randn(N + 150, d, device=DEV, generator=g)
    Y = X @ (torch.randn(d, d, device=DEV, generator=g) / d ** 0.5) + 0.5 * torch.randn(N + 150, d, device=DEV, generator=g)
    Xt, Yt, Xv, Yv = X[:N], Y[:N], X[N:], Y[N:]
    _ = torch.linalg.svd(torch.randn(64, 64, device=DEV, dtype=torch.float64))
    rows = []
    for name, fn in (("RidgeMap.fit (val)", lambda: RidgeMap().fit(Xt, Yt, Xv, Yv)),
                     ("ProcrustesMap.fit", lambda: ProcrustesMap().fit(Xt, Yt)),
                     ("ScaledProcrustesMap.fit", lambda: ScaledProcrustesMap().fit(Xt, Yt)),
                     ("Whitener.fit (one side)", lambda: Whitener().fit(Xt))):
        t, _ = timeit(fn, warmup=1, reps=2)
        rows.append([name, t, ""])
    A = Xt.double() - Xt.double().mean(0)
    B = Yt.double() - Yt.double().mean(0)
    M = A.T @ B
    drv = dict(driver="gesvd") if DEV.type == "cuda" else {}
    t, _ = timeit(lambda: torch.linalg.svd(M, full_matrices=False, **drv), warmup=0, reps=1)
    rows.append([f"torch.linalg.svd({d}x{d} float64{', driver=gesvd' if drv else ''}) (the full path; "
                 f"before: default driver, 7.26 s on the H200)", t, ""])
    U, S_full, Vh = torch.linalg.svd(M, full_matrices=False, **drv)
    R_full = U @ Vh
    del U, Vh
    t, _ = timeit(lambda: procrustes(A, B), warmup=1, reps=3)
    R, S = procrustes(A, B)
    I = torch.eye(d, dtype=R.dtype, device=R.device)
    on_span = ((A @ R - A @ R_full).norm() / (A @ R_full).norm()).item()
    orth = (R.T @ R - I).abs().max().item()
    Q = torch.linalg.qr(torch.cat([A.T, B.T], 1))[0]
    x = torch.randn(8, d, dtype=R.dtype, device=R.device, generator=g)
    x = x - (x @ Q) @ Q.T
    ident = (x @ R - x).abs().max().item()
    rows.append([f"procrustes() now ({N} < {d}: QR + {N}x{N} core SVD + explicit completion)", t,
                 f"train rows: |A R - A R_full| / |A R_full| = {on_span:.1e}; max|R^T R - I| = {orth:.1e}; "
                 f"sum S rel diff {abs(float(S.sum() - S_full.sum())) / float(S_full.sum()):.1e}; "
                 f"x R = x off both spans to {ident:.1e}"])
    C.RESULTS["maps_check"] = dict(on_span=on_span, orth=orth, shared_complement_identity=ident)
    C.RESULTS["maps_detail"] = [[r[0], r[1], r[2]] for r in rows]
    table(f"Map fitting at the seeds' size ({N} x {d}), one layer", ["what", "seconds", "note"], rows)


def run_linalg(ctx):
    if ctx.tiny:
        sec_linalg(4, 400, 64, 100, 2)
    else:
        sec_linalg(32, 10000, 4096, 2000, 3)


def run_maps_detail(ctx):
    sec_maps_detail(*((60, 64) if ctx.tiny else (450, 4096)))


SECTIONS = {"linalg": C.Section(run_linalg, models=False), "maps_detail": C.Section(run_maps_detail, models=False)}


def main(argv=None, ctx=None, sections=None):
    return C.run_sections(SECTIONS, __doc__, argv, ctx, sections, stem="linalg_results")


if __name__ == "__main__":
    main()

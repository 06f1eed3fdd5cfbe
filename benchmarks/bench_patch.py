#!/usr/bin/env python
"""Cross-model patching on the Llama-3.1-8B-shaped random pair (GPU), each section alone or from
bench_gpu.py:

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_patch.py       # all three sections
    python benchmarks/bench_patch.py --sections patch --reps 7               # one section
    python benchmarks/bench_patch.py --tiny                                  # tiny Llama on CPU (dry run)

Sections:
  patch          layer-patching sweep (all layers x 2 directions, resid_post, measure="last"): naive
                 full recomputation (PatchEngine.run_naive) vs the engine (PatchEngine.run), as
                 multiples of one clean forward of both models (the honest forward,
                 common.honest_forward), + max |logit diff| engine vs naive, the cached-vs-full clean
                 noise floor, patch_kl; a torch.profiler table of one engine sweep
                 (B=50 and 150, T=48, left padding up to T/4, decision token 5 before the end;
                 max_rows 1024/2048/4800)
  patch_more     the same sweep with measure="decision" (1-token suffix; the same honest baseline, since
                 the decision readout also computes one position's logits); the bf16 noise floor of changing the batch
  mapped_engine  the engine part of the mapped-patch alpha-sweep alone (192 variants x 150 prompts)

Output: markdown tables on stdout; with $OUT (or --out) also $OUT/bench.log,
$OUT/patch_results.md/.json and $OUT/profile_engine.txt.
"""
from __future__ import annotations

import os
import time

import torch

import common as C
from common import (bench_tokenizer, cleanup, honest_forward, kl_gap, log, peak_extra, random_batch, section, sync,
                    table, timeit)


@section("patch")
def sec_patch(base, tuned, cfg, shapes, tail, max_rows_list, reps, profile=True):
    from mechdiff.patching.kl import kl_from_logits
    from mechdiff.patching import Patch, PatchEngine, patch_kl
    RESULTS = C.RESULTS
    L = cfg.num_hidden_layers
    sites = [f"resid_post.{l}" for l in range(L)]
    rows_out = []
    for B, T in shapes:
        b = random_batch(B, T, cfg.vocab_size, tail=tail, pad_max=T // 4, seed=B)
        t_clean, _ = timeit(lambda: (honest_forward(base, b), honest_forward(tuned, b)), reps=reps)
        # engine construction = the clean runs (prefix KV cache + suffix) of both models
        t0 = time.perf_counter()
        eb = PatchEngine(base, b, measure="last", record_sites=sites)
        et = PatchEngine(tuned, b, measure="last", record_sites=sites)
        sync()
        t_build = time.perf_counter() - t0
        t_build2, _ = timeit(lambda: (PatchEngine(base, b, measure="last", record_sites=sites),
                                      PatchEngine(tuned, b, measure="last", record_sites=sites)), warmup=0, reps=2)
        hb, ht = eb.clean_states(), et.clean_states()
        var_bt = [Patch(s, hb[s]) for s in sites]   # base -> tuned: write base states into tuned
        var_tb = [Patch(s, ht[s]) for s in sites]
        # naive reference (full forward per layer per direction), once
        sync()
        t0 = time.perf_counter()
        nv_t = et.run_naive(var_bt)
        nv_b = eb.run_naive(var_tb)
        sync()
        t_naive = time.perf_counter() - t0
        # noise floor: clean logits through the cached path vs a plain full forward
        kl_naive_t = kl_from_logits(et.clean_logits[None].expand_as(nv_t), nv_t)
        full_t = tuned(**b.model_inputs(), use_cache=False).logits[:, -1].float()
        floor = (et.clean_logits - full_t).abs().max().item()
        scale = full_t.abs().max().item()
        del full_t
        for mr in max_rows_list:
            et.max_rows = eb.max_rows = mr
            try:
                t_sweep, (lo, hi) = timeit(lambda: (et.run(var_bt), eb.run(var_tb)), warmup=1, reps=reps)
                mem = peak_extra(lambda: (et.run(var_bt), eb.run(var_tb)))
                en_t, en_b = et.run(var_bt), eb.run(var_tb)
                err = max((en_t - nv_t).abs().max().item(), (en_b - nv_b).abs().max().item())
                kl_gap_ = kl_gap(en_t, nv_t)
                del en_t, en_b
                # the per-pass KL path (reduce): no [variants, B, V] logits kept
                t_kl, _ = timeit(lambda: (patch_kl(et, var_bt), patch_kl(eb, var_tb)), warmup=1, reps=reps)
                mem_kl = peak_extra(lambda: (patch_kl(et, var_bt), patch_kl(eb, var_tb)))
                kl_eng = patch_kl(et, var_bt)
                kl_err = (kl_eng - kl_naive_t).abs().max().item()
                del kl_eng
            except torch.OutOfMemoryError as e:
                log(f"max_rows={mr}: OOM ({e})")
                cleanup()
                continue
            r = dict(B=B, T=T, max_rows=mr, clean_both_s=t_clean, build_both_s=t_build2,
                     sweep_s=t_sweep, naive_s=t_naive, sweep_x_clean=t_sweep / t_clean,
                     sweep_plus_build_x_clean=(t_sweep + t_build2) / t_clean, naive_x_clean=t_naive / t_clean,
                     max_abs_logit_diff=err, noise_floor=floor, logit_scale=scale, kl_gap=kl_gap_, peak_gib=mem,
                     patch_kl_s=t_kl, patch_kl_x_clean=t_kl / t_clean, patch_kl_peak_gib=mem_kl,
                     patch_kl_max_abs_diff_vs_naive=kl_err)
            RESULTS.setdefault("patch", []).append(r)
            rows_out.append([f"{B}x{T}", mr, t_clean * 1e3, t_build2 * 1e3, t_sweep * 1e3,
                             f"{lo * 1e3:.0f}-{hi * 1e3:.0f}", t_sweep / t_clean, (t_sweep + t_build2) / t_clean,
                             t_naive / t_clean, err, floor, kl_gap_, mem, t_kl / t_clean, mem_kl, kl_err])
        log(f"B={B}: first engine build (cold) {t_build * 1e3:.0f} ms")
        if profile and B == shapes[-1][0]:
            _profile_engine(et, var_bt)
        del eb, et, nv_t, nv_b, kl_naive_t
        cleanup()
    table(f"Patching sweep: {L} layers x 2 directions (resid_post, decision token = T-1-{tail}, measure='last')",
          ["B x T", "max_rows", "clean fwd both (ms)", "engine build both (ms)", "engine sweep (ms)", "min-max",
           "sweep / clean", "(sweep+build) / clean", "naive / clean", "max |logit diff| vs naive",
           "cache-vs-full clean diff", "max KL(naive||engine)", "extra peak GiB",
           "patch_kl (reduce) / clean", "patch_kl extra peak GiB", "max |KL_engine - KL_naive|"], rows_out,
          f"logits scale (max |logit|) ~ {RESULTS['patch'][-1]['logit_scale']:.3g}" if RESULTS.get("patch") else None)


def _profile_engine(eng, variants):
    from torch.profiler import ProfilerActivity, profile
    DEV = C.DEV
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    eng.run(variants)
    sync()
    with profile(activities=acts) as prof:
        eng.run(variants)
        sync()
    key = "cuda_time_total" if DEV.type == "cuda" else "cpu_time_total"
    try:
        txt = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
    except Exception:
        txt = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    log(f"\n#### torch.profiler: one direction of the engine sweep (max_rows={eng.max_rows}), by {key}\n")
    log("```\n" + txt + "\n```")
    if C.OUT:
        with open(os.path.join(C.OUT, "profile_engine.txt"), "w") as f:
            f.write(txt)
            f.write("\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                        max_name_column_width=60))


@section("patch_more")
def sec_patch_more(base, tuned, cfg, tail):
    """measure='decision' (1-token suffix) sweep; the bf16 noise floor of changing the batch."""
    from mechdiff.patching import Patch, PatchEngine
    DEV, RESULTS = C.DEV, C.RESULTS
    L = cfg.num_hidden_layers
    sites = [f"resid_post.{l}" for l in range(L)]
    rows = []
    for B in (50, 150):
        b = random_batch(B, 48, cfg.vocab_size, tail=tail, pad_max=12, seed=B)
        t_clean, _ = timeit(lambda: (honest_forward(base, b), honest_forward(tuned, b)), reps=3)
        eb = PatchEngine(base, b, measure="decision", record_sites=sites)
        et = PatchEngine(tuned, b, measure="decision", record_sites=sites)
        var_bt = [Patch(s, eb.clean_states()[s]) for s in sites]
        var_tb = [Patch(s, et.clean_states()[s]) for s in sites]
        t_build, _ = timeit(lambda: (PatchEngine(base, b, measure="decision", record_sites=sites),
                                     PatchEngine(tuned, b, measure="decision", record_sites=sites)), warmup=0, reps=2)
        err = float("nan")
        if B == 50:
            nv = et.run_naive(var_bt)
            err = (et.run(var_bt) - nv).abs().max().item()
            del nv
        for mr in ((64, 1024) if DEV.type == "cpu" else (1024, 2048, 4800)):
            et.max_rows = eb.max_rows = mr
            t, _ = timeit(lambda: (et.run(var_bt), eb.run(var_tb)), warmup=1, reps=3)
            rows.append([f"{B}x48", mr, t_clean * 1e3, t * 1e3, t / t_clean, (t + t_build) / t_clean, err])
            RESULTS.setdefault("patch_decision", []).append(dict(B=B, max_rows=mr, clean_both_s=t_clean, sweep_s=t,
                                                                 build_s=t_build, err=err))
        del eb, et
        cleanup()
    table(f"Patching sweep with measure='decision' (1-token suffix): {L} layers x 2 directions",
          ["B x T", "max_rows", "clean fwd both (ms)", "engine sweep (ms)", "sweep / clean", "(sweep+build) / clean",
           "max |logit diff| vs naive"], rows)
    # bf16 noise floor: the same 50 prompts run inside a batch of 50 and of 150
    b150 = random_batch(150, 48, cfg.vocab_size, tail=tail, pad_max=12, seed=7)
    from mechdiff.data.prompts import Batch
    b50 = Batch(b150.input_ids[:50], b150.attention_mask[:50], b150.position_ids[:50], b150.decision[:50])
    l150 = tuned(**b150.model_inputs(), use_cache=False, logits_to_keep=1).logits[:50, -1].float()
    l50 = tuned(**b50.model_inputs(), use_cache=False, logits_to_keep=1).logits[:, -1].float()
    floor = (l150 - l50).abs().max().item()
    kl = kl_gap(l50, l150)
    RESULTS["bf16_batch_noise"] = dict(max_abs=floor, max_kl=kl, scale=l50.abs().max().item())
    table("bf16 noise floor: the same 50 prompts in a batch of 50 vs inside a batch of 150 (plain forward)",
          ["max |logit diff|", "max KL", "max |logit|"], [[floor, kl, l50.abs().max().item()]])


@section("mapped_engine")
def sec_mapped_engine(base, tuned, cfg):
    """The engine part of the mapped-patch alpha-sweep alone (cheap ridge maps stand in for the maps):
    3 sites x 16 layers x 4 alphas = 192 variants on 150 val prompts."""
    from mechdiff.analyses.maps import RidgeMap
    from mechdiff.data.prompts import encode, load_jsonl
    from mechdiff.experiments.rq1 import cka_layers
    from mechdiff.patching import Patch, PatchEngine
    from mechdiff.sites.capture import capture
    DEV = C.DEV
    tok, _ = bench_tokenizer()
    L = cfg.num_hidden_layers
    sites = [f"{k}.{l}" for l in cka_layers(L, 2) for k in ("resid_post", "attn_out", "mlp_out")]
    rows_p = load_jsonl(C.PROMPTS)[:600]
    cb = capture(base, tok, rows_p, sites, batch_size=32)
    ct = capture(tuned, tok, rows_p, sites, batch_size=32)
    t0 = time.perf_counter()
    mp = {s: RidgeMap().fit(cb[s][:450].to(DEV), ct[s][:450].to(DEV)) for s in sites}
    t_fit = time.perf_counter() - t0
    val = rows_p[450:]
    out = []
    for chunk_size, mr in ((32, 256), (150, 1024), (150, 4800)):
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(val), chunk_size):
            chunk = val[i:i + chunk_size]
            eng = PatchEngine(tuned, encode(tok, chunk), measure="last", max_rows=mr)
            variants = []
            for s in sites:
                v = mp[s].transform(cb[s][450 + i:450 + i + len(chunk)].to(DEV)).to(torch.bfloat16)
                variants += [Patch(s, v, alpha=a) for a in (0.3, 0.5, 0.7, 1.0)]
            lg = eng.run(variants)
            del lg, eng
        sync()
        out.append([chunk_size, mr, time.perf_counter() - t0])
    C.RESULTS["mapped_engine"] = dict(fit_ridge_48_s=t_fit, runs=out)
    table("Mapped-patch alpha-sweep, engine part only (192 variants x 150 val prompts, maps pre-fitted)",
          ["prompts per engine", "max_rows", "seconds"], out, f"48 ridge maps fitted in {t_fit:.1f}s")


TAIL = 5   # template tokens after the decision token (Llama-3's assistant header)


def run_patch(ctx):
    shapes = [(6, 16), (12, 16)] if ctx.tiny else [(50, 48), (150, 48)]
    max_rows = [64, 1024] if ctx.tiny else [1024, 2048, 4800]   # 2048: the engine's default
    sec_patch(ctx.base, ctx.tuned, ctx.cfg, shapes, tail=TAIL, max_rows_list=max_rows, reps=max(2, ctx.reps // 2))


def run_patch_more(ctx):
    sec_patch_more(ctx.base, ctx.tuned, ctx.cfg, tail=TAIL)


def run_mapped_engine(ctx):
    sec_mapped_engine(ctx.base, ctx.tuned, ctx.cfg)


SECTIONS = {"patch": C.Section(run_patch), "patch_more": C.Section(run_patch_more),
            "mapped_engine": C.Section(run_mapped_engine)}


def main(argv=None, ctx=None, sections=None):
    return C.run_sections(SECTIONS, __doc__, argv, ctx, sections, stem="patch_results")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""mechdiff GPU benchmark: every measurement of benchmarks/RESULTS.md in one script.

    PYTHONUNBUFFERED=1 python benchmarks/bench_gpu.py            # Llama-3.1-8B-shaped pair, GPU
    python benchmarks/bench_gpu.py --tiny                         # tiny config on CPU (dry run)
    python benchmarks/bench_gpu.py --sections capture,patch       # a subset

Sections (each in try/except, so one failure does not lose the others):
  capture  plain HF forward vs mechdiff record()/capture() of resid_post/attn_out/mlp_out at all
           layers, last position kept: time, tokens/s, ratio, extra peak memory
  patch    cross-model layer-patching sweep (all layers x 2 directions): naive full recomputation vs
           mechdiff.patching.PatchEngine (clean-run KV cache reuse), as multiples of one clean forward
           of both models, + max |logit diff| engine vs naive; torch.profiler of the engine
  linalg   CKA for all layers of N x d, ridge map with its lambda grid on N x d
  stages   RQ1 / RQ2 maps / RQ2 mapped-patch runners on the pair (models passed in, no loading)
  compare  HF forward vs mechdiff capture vs nnsight trace vs TransformerLens run_with_cache on the
           same batch and sites (last; frees the tuned model first; nnsight wraps the model)

Random weights, random token ids (or a small BPE trained on the shipped prompts for the stages so
prompts have the seeds' ~48 tokens). Output: markdown tables on stdout; with $OUT set, also
$OUT/bench.log (everything), $OUT/results.md (tables) and $OUT/results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

warnings.filterwarnings("ignore")
OUT = os.environ.get("OUT")
TABLES: list[str] = []
RESULTS: dict = {}
T_START = time.perf_counter()


# ---- output --------------------------------------------------------------------------------

def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    if OUT:
        with open(os.path.join(OUT, "bench.log"), "a") as f:
            f.write(s + "\n")


def flush_results():
    if not OUT:
        return
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write("\n\n".join(TABLES) + "\n")
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def table(title: str, header: list[str], rows: list[list], note: str | None = None):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(x) for x in r) + " |")
    if note:
        lines += ["", note]
    md = "\n".join(lines)
    TABLES.append(md)
    log("\n" + md + "\n")
    flush_results()


def _fmt(x):
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
        return f"{x:.3g}"
    return str(x)


def section(name):
    def deco(fn):
        def wrapped(*a, **k):
            log(f"\n===== section {name} (t={time.perf_counter() - T_START:.0f}s) =====")
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going: one failure must not lose the other sections
                log(f"!! section {name} failed: {type(e).__name__}: {e}")
                log(traceback.format_exc())
                RESULTS.setdefault("failures", {})[name] = f"{type(e).__name__}: {e}"
                flush_results()
            finally:
                log(f"===== section {name} done in {time.perf_counter() - t:.1f}s =====")
                cleanup()
        return wrapped
    return deco


# ---- timing and memory ---------------------------------------------------------------------

DEV = torch.device("cpu")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def timeit(fn, warmup=2, reps=5):
    """Median seconds of ``fn()`` (device synchronised), after warm-ups; also the spread."""
    for _ in range(warmup):
        r = fn()
        del r
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        r = fn()
        sync()
        ts.append(time.perf_counter() - t)
        del r
    return statistics.median(ts), (min(ts), max(ts))


def peak_extra(fn):
    """GiB allocated at the peak of ``fn()`` over what was allocated before (result kept alive)."""
    if DEV.type != "cuda":
        return float("nan")
    cleanup()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = fn()
    sync()
    p = (torch.cuda.max_memory_allocated() - base) / 2**30
    del r
    cleanup()
    return p


def gib(n_bytes):
    return n_bytes / 2**30


# ---- models and batches --------------------------------------------------------------------

def llama_config(tiny: bool):
    from transformers import LlamaConfig
    if tiny:
        kw = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
    else:  # Llama-3.1-8B shape
        kw = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256)
    cfg = LlamaConfig(max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=257, eos_token_id=260, **kw)
    try:
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    except Exception:
        pass
    cfg._attn_implementation = "sdpa"
    return cfg


def build_pair(cfg, dtype):
    """Base with random weights built directly on DEV, and a 'tuned' copy whose upper half of layers
    got a perturbation (MLP down-projections and attention out-projections)."""
    from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(DEV):
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if next(base.parameters()).device.type != DEV.type:
        base = base.to(DEV)
    base.eval().requires_grad_(False)
    sync()
    t_base = time.perf_counter() - t
    tuned = copy.deepcopy(base)
    g = torch.Generator(device=DEV).manual_seed(1)
    L = cfg.num_hidden_layers
    with torch.no_grad():
        for l in range(L // 2, L):
            for w in (tuned.model.layers[l].mlp.down_proj.weight, tuned.model.layers[l].self_attn.o_proj.weight):
                w.add_(torch.randn(w.shape, generator=g, device=DEV, dtype=w.dtype), alpha=0.01)
    sync()
    log(f"built base in {t_base:.1f}s, tuned copy+perturb in {time.perf_counter() - t - t_base:.1f}s; "
        f"params {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B, dtype {dtype}, device {DEV}")
    if DEV.type == "cuda":
        log(f"GPU memory allocated after both models: {gib(torch.cuda.memory_allocated()):.1f} GiB")
    return base, tuned


def random_batch(B, T, vocab, tail=0, pad_max=0, seed=0):
    """A left-padded mechdiff Batch of random ids; rows get 0..pad_max left padding; the decision token
    is ``tail`` tokens before the end (the chat-template tail)."""
    from mechdiff.data.prompts import Batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 32000), (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_max:
        pads = torch.randint(0, pad_max + 1, (B,), generator=g)
        for_pad = torch.arange(T)[None] < pads[:, None]
        mask[for_pad] = 0
        ids[for_pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0) * mask
    dec = torch.full((B,), T - 1 - tail, dtype=torch.long)
    return Batch(ids, mask, pos, dec, [str(i) for i in range(B)]).to(DEV)


def env_info():
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(DEV)}
    if DEV.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
    for mod in ("nnsight", "transformer_lens"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            info[mod] = f"not importable ({type(e).__name__}: {e})"
    try:
        from importlib.metadata import version
        info["transformer_lens"] = version("transformer-lens") if "not" not in str(info.get("transformer_lens")) \
            else info["transformer_lens"]
    except Exception:
        pass
    return info


def capture_sites(L):
    return [f"{s}.{l}" for l in range(L) for s in ("attn_out", "mlp_out", "resid_post")]


# ---- section: capture ----------------------------------------------------------------------

def hf_forward(model, b):
    return model(**b.model_inputs(), use_cache=False, logits_to_keep=1).logits


def capture_before(model, b, sites, batch_size):
    """capture() as it was at 9f34f15 (before the pinned/overlapped copy), for a same-run comparison:
    per batch, one `.cpu()` of all sites into fresh pageable memory, then per-site dtype cast and
    isfinite checks on the CPU."""
    from mechdiff.sites.capture import _gather, _plan, _select_positions
    from mechdiff.sites.hooks import record
    ids, chunks = _plan(model, None, b, batch_size, True, None)
    N = len(ids)
    out = {}
    for rows, bb in chunks:
        bb = bb.to(DEV)
        idx, valid = _select_positions(bb, "last", 0)
        with record(model, sites, select=lambda t: _gather(t, idx, valid), stop_after_last=True) as rec:
            model(**bb.model_inputs(), use_cache=False)
        kept = [rec[k] for k in sites]
        flat = torch.cat([t.reshape(t.shape[0], -1).to(kept[0].dtype) for t in kept], 1).cpu()
        _ = _gather(bb.position_ids, idx, valid).cpu()
        for k, t, part in zip(sites, kept, flat.split([t[0].numel() for t in kept], 1)):
            x = part.reshape(t.shape).to(torch.float32)
            bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(-1)
            if bad.any():
                raise RuntimeError("NaN")
            if k not in out:
                out[k] = torch.zeros((N, *x.shape[1:]), dtype=torch.float32)
            out[k][rows] = x
    return out


def capture_methods(model, b, sites):
    from mechdiff.sites.capture import capture
    from mechdiff.sites.hooks import record
    B = len(b)
    last = lambda t: t[:, -1]  # noqa: E731

    def rec():
        with record(model, sites, select=last) as r:
            model(**b.model_inputs(), use_cache=False, logits_to_keep=1)
        return dict(r)

    def cap():
        return capture(model, None, b, sites, positions="last", batch_size=B, validate=False)

    def cap_dev():  # same, kept on the GPU in the model's dtype (no CPU transfer)
        with record(model, sites, select=last, stop_after_last=True) as r:
            model(**b.model_inputs(), use_cache=False)
        return dict(r)

    def hidden():
        return model(**b.model_inputs(), use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states

    def cap_gpu():
        return capture(model, None, b, sites, positions="last", batch_size=B, validate=False, device_out=DEV)

    return {
        "HF forward, last logits (reference)": lambda: hf_forward(model, b),
        "HF forward, output_hidden_states (full seq, resid only)": hidden,
        "mechdiff record(select=t[:, -1]) hooks, full forward (view select: hooks fix)": rec,
        "mechdiff record(stop_after_last) on GPU": cap_dev,
        "mechdiff capture() -> CPU float32 (pinned, overlapped)": cap,
        f"mechdiff capture(device_out={DEV.type!r}) float32": cap_gpu,
        "capture() BEFORE (9f34f15 loop, embedded copy) -> CPU float32": lambda: capture_before(model, b, sites, B),
    }


@section("capture")
def sec_capture(base, cfg, shapes, reps):
    L = cfg.num_hidden_layers
    sites = capture_sites(L)
    from mechdiff.sites.capture import capture, validated
    validated(base)  # one-time check, outside the timings
    for B, T in shapes:
        b = random_batch(B, T, cfg.vocab_size)
        # correctness: capture == record == HF hidden states at the last position
        got = capture(base, None, b, sites, batch_size=B, validate=False)
        hs = hf_forward_hidden = base(**b.model_inputs(), use_cache=False, output_hidden_states=True).hidden_states
        err = max((got[f"resid_post.{l}"] - hs[l + 1][:, -1].float().cpu()).abs().max().item() for l in range(L - 1))
        got_dev = capture(base, None, b, sites, batch_size=B, validate=False, device_out=DEV)
        old = capture_before(base, b, sites, B)
        err_dev = max((got[k] - got_dev[k].cpu()).abs().max().item() for k in sites)
        err_old = max((got[k] - old[k]).abs().max().item() for k in sites)
        del hs, hf_forward_hidden, got, got_dev, old
        rows = []
        ref = None
        for name, fn in capture_methods(base, b, sites).items():
            t, (lo, hi) = timeit(fn, reps=reps)
            mem = peak_extra(fn)
            ref = ref or t
            rows.append([name, t * 1e3, f"{lo * 1e3:.1f}-{hi * 1e3:.1f}", B * T / t, ref / t, mem])
            RESULTS.setdefault("capture", {}).setdefault(f"B{B}_T{T}", {})[name] = dict(s=t, tok_s=B * T / t, rel=ref / t, peak_gib=mem)
        table(f"Capture, B={B}, T={T}: {len(sites)} sites (resid_post/attn_out/mlp_out x {L} layers), last position",
              ["method", "ms (median)", "min-max", "tokens/s", "throughput vs HF forward", "extra peak GiB"], rows,
              f"max |capture - output_hidden_states| over resid_post layers: {err:.3g}; max |capture(CPU) - "
              f"capture(device_out)|: {err_dev:.3g}; max |capture - capture BEFORE|: {err_old:.3g}")
        RESULTS["capture"][f"B{B}_T{T}"]["checks"] = dict(vs_hidden=err, vs_device_out=err_dev, vs_before=err_old)
    # a workload of several batches: 4 x 150 prompts (T=48), plain forward per batch vs capture
    n_rows, bs = (24, 6) if DEV.type == "cpu" else (600, 150)
    bw = random_batch(n_rows, 48 if DEV.type == "cuda" else 16, cfg.vocab_size, seed=3)
    from mechdiff.data.prompts import Batch
    parts = [Batch(bw.input_ids[i:i + bs], bw.attention_mask[i:i + bs], bw.position_ids[i:i + bs],
                   bw.decision[i:i + bs]) for i in range(0, n_rows, bs)]
    fns = {f"HF forward, last logits, {n_rows // bs} batches of {bs} (reference)":
           lambda: [hf_forward(base, p) for p in parts],
           f"capture() -> CPU, batch_size={bs}": lambda: capture(base, None, bw, sites, batch_size=bs, validate=False),
           f"capture() -> CPU, batch_size=32 (default)": lambda: capture(base, None, bw, sites, validate=False),
           f"capture(device_out={DEV.type!r}), batch_size={bs}":
           lambda: capture(base, None, bw, sites, batch_size=bs, validate=False, device_out=DEV),
           f"capture() BEFORE (embedded), batch_size={bs}": lambda: capture_before(base, bw, sites, bs)}
    rows, ref = [], None
    for name, fn in fns.items():
        t, (lo, hi) = timeit(fn, warmup=1, reps=min(reps, 3))
        ref = ref or t
        rows.append([name, t * 1e3, f"{lo * 1e3:.0f}-{hi * 1e3:.0f}", n_rows * bw.input_ids.shape[1] / t, ref / t])
        RESULTS.setdefault("capture", {}).setdefault("workload", {})[name] = dict(s=t, rel=ref / t)
    table(f"Capture over {n_rows} prompts ({len(sites)} sites, last position)",
          ["method", "ms (median)", "min-max", "tokens/s", "throughput vs HF forward"], rows)


# ---- section: patching ---------------------------------------------------------------------

@section("patch")
def sec_patch(base, tuned, cfg, shapes, tail, max_rows_list, reps, profile=True):
    from mechdiff.patching import Patch, PatchEngine, _kl, patch_kl
    L = cfg.num_hidden_layers
    sites = [f"resid_post.{l}" for l in range(L)]
    rows_out = []
    for B, T in shapes:
        b = random_batch(B, T, cfg.vocab_size, tail=tail, pad_max=T // 4, seed=B)
        t_clean, _ = timeit(lambda: (hf_forward(base, b), hf_forward(tuned, b)), reps=reps)
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
        kl_naive_t = _kl(et.clean_logits[None].expand_as(nv_t), nv_t)
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
                kl_gap = _kl_gap(en_t, nv_t)
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
                     max_abs_logit_diff=err, noise_floor=floor, logit_scale=scale, kl_gap=kl_gap, peak_gib=mem,
                     patch_kl_s=t_kl, patch_kl_x_clean=t_kl / t_clean, patch_kl_peak_gib=mem_kl,
                     patch_kl_max_abs_diff_vs_naive=kl_err)
            RESULTS.setdefault("patch", []).append(r)
            rows_out.append([f"{B}x{T}", mr, t_clean * 1e3, t_build2 * 1e3, t_sweep * 1e3,
                             f"{lo * 1e3:.0f}-{hi * 1e3:.0f}", t_sweep / t_clean, (t_sweep + t_build2) / t_clean,
                             t_naive / t_clean, err, floor, kl_gap, mem, t_kl / t_clean, mem_kl, kl_err])
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


def _kl_gap(a, b):
    la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    return (lb.exp() * (lb - la)).sum(-1).max().item()


def _profile_engine(eng, variants):
    from torch.profiler import ProfilerActivity, profile
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
    if OUT:
        with open(os.path.join(OUT, "profile_engine.txt"), "w") as f:
            f.write(txt)
            f.write("\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                        max_name_column_width=60))


# ---- section: linear algebra ---------------------------------------------------------------

@section("linalg")
def sec_linalg(L, N, d, n_val, reps):
    from mechdiff.analyses.cka import cka_per_layer
    from mechdiff.analyses.maps import RidgeMap
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


# ---- section: stages (runners) ----------------------------------------------------------------

def bench_tokenizer(target_tokens: int = 48):
    """A byte-level BPE trained on the shipped prompt sets, sized so that the cultural prompts (chat
    template included) have about the seeds' ~48 tokens; same specials/template as tiny_tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from mechdiff.data.prompts import load_jsonl, tokenize
    from mechdiff.models.tiny import CHATML, SPECIALS
    sets = ROOT / "src/mechdiff/data/sets"
    texts = []
    for f in sorted(sets.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line) if line.strip() else {}
            texts += [v for k, v in r.items() if isinstance(v, str) and len(v) > 20]
    rows = load_jsonl(sets / "cultural.jsonl")
    best = None
    for vs in (400, 450, 500, 550, 600, 700, 900, 1300):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=vs, special_tokens=SPECIALS, show_progress=False,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, tr)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                       eos_token="<|im_end|>", padding_side="left")
        fast.chat_template = CHATML
        enc = tokenize(fast, rows[:300], chat=True)
        mean = sum(len(e.input_ids) for e in enc) / len(enc)
        if best is None or abs(mean - target_tokens) < abs(best[1] - target_tokens):
            best = (fast, mean, vs)
    log(f"bench tokenizer: BPE vocab {best[2]}, mean {best[1]:.1f} tokens per cultural prompt (chat template)")
    return best[0], best[1]


class StageTimeout(Exception):
    pass


@section("stages")
def sec_stages(base, tuned, cfg, tiny, budget_s=None, full=False):
    import signal
    if budget_s is not None:
        def _alarm(signum, frame):
            raise StageTimeout(f"stage time budget of {budget_s:.0f}s (this run) used up")
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(budget_s)))
        log(f"stages: time budget {budget_s:.0f}s")
    try:
        _stages(base, tuned, cfg, tiny, full)
    finally:
        if budget_s is not None:
            signal.alarm(0)


def _stages(base, tuned, cfg, tiny, full=False):
    from mechdiff.models.load import LoadedModel, model_dims
    from mechdiff.pairs.spec import ModelSpec, Pair
    tok, mean_len = bench_tokenizer()
    prompts = str(ROOT / "src/mechdiff/data/sets/cultural.jsonl")

    def lm(model, side):
        info = {**model_dims(model), "source": f"bench:random-llama-{side}", "dtype": str(next(model.parameters()).dtype),
                "device": str(DEV), "spec": f"bench-{side}"}
        return LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path=f"/bench/{side}"), info=info)

    models = (lm(base, "base"), lm(tuned, "tuned"))
    pair = Pair(name="bench-8b-random", base=models[0].spec, tuned=models[1].spec, dtype="bfloat16")
    out = Path(tempfile.mkdtemp(prefix="mechdiff_bench_"))
    rows, total = [], 0.0
    n_tr, n_val = (450, 150) if not tiny else (60, 30)

    timed_out = []

    def stage(name, fn):
        nonlocal total
        if timed_out:
            rows.append([name, 0.0, "skipped: the time budget ran out in an earlier stage"])
            log(f"stage {name}: skipped (budget)")
            return
        sync()
        t = time.perf_counter()
        try:
            fn()
            sync()
            dt = time.perf_counter() - t
            total += dt
            rows.append([name, dt, "ok"])
        except Exception as e:
            dt = time.perf_counter() - t
            if isinstance(e, StageTimeout):
                timed_out.append(name)
                rows.append([name, dt, f"CUT OFF after {dt:.0f}s (time budget of this run): > {dt:.0f}s"])
            else:
                rows.append([name, dt, f"FAILED {type(e).__name__}: {str(e)[:160]}"])
            log(traceback.format_exc())
        RESULTS.setdefault("stages", {})[name] = rows[-1][1:]
        log(f"stage {name}: {rows[-1][1]:.1f}s {rows[-1][2]}")
        cleanup()

    from mechdiff.experiments import rq1 as rq1_mod
    o1 = dict(n_prompts=n_val, stride=2, behaviour=full, prompts=prompts)
    opts1 = rq1_mod.RQ1Options(**{k: v for k, v in o1.items() if k in rq1_mod.RQ1Options.__dataclass_fields__})
    log(f"RQ1 options: {opts1}")
    stage(f"RQ1 (capture, CKA+null+CI, patch sweep both directions; behaviour {'on' if full else 'off'})",
          lambda: rq1_mod.run_rq1(pair, opts1, out=out, models=models))
    try:
        from mechdiff.experiments import rq2 as rq2_mod
    except Exception as e:
        rows.append(["RQ2 runners", 0.0, f"not run: mechdiff.experiments.rq2 not importable ({type(e).__name__}); "
                     "its building blocks are timed below instead"])
        rq2_mod = None
        _rq2_blocks(models, prompts, n_tr, n_val, stage)
    if rq2_mod is not None:
        fields = rq2_mod.RQ2Options.__dataclass_fields__
        o2 = dict(n_train=n_tr, n_val=n_val, prompts=prompts, side_effects=full)
        opts_maps = rq2_mod.RQ2Options(**{k: v for k, v in o2.items() if k in fields})
        o2p = dict(o2, solvers=["procrustes_scaled"], sites=["resid_post", "attn_out", "mlp_out"])
        opts_mp = rq2_mod.RQ2Options(**{k: v for k, v in o2p.items() if k in fields})
        log(f"RQ2 maps options: {opts_maps}\nRQ2 mapped-patch options: {opts_mp}")
        for name, fn, opts in (("RQ2 maps (fit + score, default solvers)", rq2_mod.run_maps, opts_maps),
                               (f"RQ2 mapped-patch + alpha-sweep (side effects {'on' if full else 'off'})",
                                rq2_mod.run_mapped_patch, opts_mp)):
            if "models" in inspect.signature(fn).parameters:
                stage(name, lambda fn=fn, opts=opts: fn(pair, opts, out=out, models=models))
            else:
                rows.append([name, 0.0, "not run: runner takes no models= argument"])
    rows.append(["total (stages that ran)", total, "goal < 600 s" if not tiny else ""])
    RESULTS["stages_total_s"] = total
    table(f"Stages on the {'tiny' if tiny else '8B-shaped'} pair ({n_tr} train / {n_val} val prompts, stride 2, "
          f"~{mean_len:.0f} tokens/prompt, models preloaded)", ["stage", "wall s", "status"], rows,
          f"run directory: {out}")


def _rq2_blocks(models, prompts_path, n_tr, n_val, stage):
    """RQ2's work without its runner: capture 600 prompts x 16 layers x 3 sites in both models, fit
    and score ridge / Procrustes / scaled Procrustes maps (resid_post, 16 layers), then the mapped-patch
    alpha-sweep (3 sites x 16 layers x 4 alphas, base states mapped into the tuned model) through
    the PatchEngine in chunks of 32 val prompts, with KL against the clean run."""
    from mechdiff.analyses.kl import kl_from_logits
    from mechdiff.analyses.maps import ProcrustesMap, RidgeMap, ScaledProcrustesMap
    from mechdiff.data.prompts import encode, load_jsonl
    from mechdiff.experiments.rq1 import cka_layers
    from mechdiff.patching import Patch, PatchEngine
    from mechdiff.sites.capture import capture
    base, tuned = models
    L = base.n_layers
    layers = cka_layers(L, 2)
    kinds = ("resid_post", "attn_out", "mlp_out")
    sites = [f"{k}.{l}" for l in layers for k in kinds]
    rows = load_jsonl(prompts_path)[: n_tr + n_val]
    caps = {}

    def cap():
        caps["b"] = capture(base.model, base.tokenizer, rows, sites, batch_size=32)
        caps["t"] = capture(tuned.model, tuned.tokenizer, rows, sites, batch_size=32)

    stage(f"RQ2 blocks: capture {len(rows)} prompts x {len(sites)} sites, both models", cap)
    fitted = {}

    def maps():
        for l in layers:
            X, Y = caps["b"][f"resid_post.{l}"].to(DEV), caps["t"][f"resid_post.{l}"].to(DEV)
            for cls in (RidgeMap, ProcrustesMap, ScaledProcrustesMap):
                m = cls().fit(X[:n_tr], Y[:n_tr], X[n_tr:], Y[n_tr:])
                E = m.transform(X[n_tr:]) - Y[n_tr:]
                fitted[(cls.__name__, l)] = float((E * E).sum() / ((Y[n_tr:] - Y[n_tr:].mean(0)) ** 2).sum())

    stage(f"RQ2 blocks: maps fit+score (3 solvers x {len(layers)} layers, resid_post, {n_tr}/{n_val})", maps)
    alphas = (0.3, 0.5, 0.7, 1.0)

    def mapped_patch():
        mp = {}
        for s in sites:
            X, Y = caps["b"][s].to(DEV), caps["t"][s].to(DEV)
            mp[s] = ScaledProcrustesMap().fit(X[:n_tr], Y[:n_tr])
        val = rows[n_tr:]
        kls = []
        for i in range(0, len(val), 32):
            chunk = val[i:i + 32]
            eng = PatchEngine(tuned.model, encode(tuned.tokenizer, chunk), measure="last")
            variants = []
            for s in sites:
                v = mp[s].transform(caps["b"][s][n_tr + i:n_tr + i + len(chunk)].to(DEV)).to(tuned.dtype)
                variants += [Patch(s, v, alpha=a) for a in alphas]
            lg = eng.run(variants)
            kls.append(kl_from_logits(eng.clean_logits[None].expand_as(lg), lg).cpu())
            del lg, eng
        return torch.cat(kls, 1)

    stage(f"RQ2 blocks: mapped-patch alpha-sweep ({len(sites)} maps; {len(sites) * len(alphas)} variants x "
          f"{n_val} val prompts through the engine)", mapped_patch)


# ---- section: follow-ups found by the first GPU run ----------------------------------------

@section("maps_detail")
def sec_maps_detail(N, d):
    """Map fitting at the seeds' size (N=450 < d): ProcrustesMap / ScaledProcrustesMap after the
    procrustes() change, the full d x d SVD (gesvd driver) it no longer needs, and checks that the
    new R equals the full-SVD R on the training rows, is orthogonal, and is the identity off both
    spans."""
    from mechdiff.analyses.maps import ProcrustesMap, RidgeMap, ScaledProcrustesMap, Whitener, procrustes
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
    RESULTS["maps_check"] = dict(on_span=on_span, orth=orth, shared_complement_identity=ident)
    RESULTS["maps_detail"] = [[r[0], r[1], r[2]] for r in rows]
    table(f"Map fitting at the seeds' size ({N} x {d}), one layer", ["what", "seconds", "note"], rows)


@section("patch_more")
def sec_patch_more(base, tuned, cfg, tail):
    """measure='decision' (1-token suffix) sweep; the bf16 noise floor of changing the batch."""
    from mechdiff.patching import Patch, PatchEngine
    L = cfg.num_hidden_layers
    sites = [f"resid_post.{l}" for l in range(L)]
    rows = []
    for B in (50, 150):
        b = random_batch(B, 48, cfg.vocab_size, tail=tail, pad_max=12, seed=B)
        ar = torch.arange(B, device=DEV)
        t_clean, _ = timeit(lambda: (base(**b.model_inputs(), use_cache=False).logits[ar, b.decision],
                                     tuned(**b.model_inputs(), use_cache=False).logits[ar, b.decision]), reps=3)
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
    kl = _kl_gap(l50, l150)
    RESULTS["bf16_batch_noise"] = dict(max_abs=floor, max_kl=kl, scale=l50.abs().max().item())
    table("bf16 noise floor: the same 50 prompts in a batch of 50 vs inside a batch of 150 (plain forward)",
          ["max |logit diff|", "max KL", "max |logit|"], [[floor, kl, l50.abs().max().item()]])


@section("capture_more")
def sec_capture_more(base, cfg, reps=10):
    from mechdiff.sites.capture import capture
    from mechdiff.sites.hooks import record
    L = cfg.num_hidden_layers
    sites = capture_sites(L)
    b = random_batch(150, 48, cfg.vocab_size)
    last = lambda t: t[:, -1]  # noqa: E731

    def rec_cpu():  # what capture could do: gather on GPU, one float32 transfer of everything
        with record(base, sites, select=last, stop_after_last=True) as r:
            base(**b.model_inputs(), use_cache=False)
        flat = torch.cat([r[k] for k in sites], 1)
        ok = torch.isfinite(flat).all()
        return flat.float().cpu(), bool(ok)

    fns = {"HF forward, last logits": lambda: hf_forward(base, b),
           "capture() -> CPU float32 (default)": lambda: capture(base, None, b, sites, batch_size=150, validate=False),
           "capture(dtype_out=bfloat16)": lambda: capture(base, None, b, sites, batch_size=150, validate=False,
                                                           dtype_out=torch.bfloat16),
           "record(stop_after_last), kept on GPU": lambda: _rec_gpu(base, b, sites, last),
           "record(stop) + GPU isfinite + one float32 transfer (prototype)": rec_cpu}
    rows, ref = [], None
    for name, fn in fns.items():
        t, (lo, hi) = timeit(fn, warmup=2, reps=reps)
        ref = ref or t
        rows.append([name, t * 1e3, f"{lo * 1e3:.0f}-{hi * 1e3:.0f}", ref / t])
    RESULTS["capture_more"] = rows
    table("Capture at B=150, T=48 again (10 repeats): where capture()'s extra time goes",
          ["method", "ms (median)", "min-max", "throughput vs HF forward"], rows)
    from torch.profiler import ProfilerActivity, profile
    capture(base, None, b, sites, batch_size=150, validate=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        capture(base, None, b, sites, batch_size=150, validate=False)
        sync()
    txt = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
    log("\n#### torch.profiler: capture() at B=150, T=48, by self CPU time\n\n```\n" + txt + "\n```")
    if OUT:
        with open(os.path.join(OUT, "profile_capture.txt"), "w") as f:
            f.write(txt)


def _rec_gpu(model, b, sites, last):
    from mechdiff.sites.hooks import record
    with record(model, sites, select=last, stop_after_last=True) as r:
        model(**b.model_inputs(), use_cache=False)
    return dict(r)


@section("mapped_engine")
def sec_mapped_engine(base, tuned, cfg):
    """The engine part of the mapped-patch alpha-sweep alone (cheap ridge maps stand in for the maps):
    3 sites x 16 layers x 4 alphas = 192 variants on 150 val prompts."""
    from mechdiff.analyses.maps import RidgeMap
    from mechdiff.data.prompts import encode, load_jsonl
    from mechdiff.experiments.rq1 import cka_layers
    from mechdiff.patching import Patch, PatchEngine
    from mechdiff.sites.capture import capture
    tok, _ = bench_tokenizer()
    L = cfg.num_hidden_layers
    sites = [f"{k}.{l}" for l in cka_layers(L, 2) for k in ("resid_post", "attn_out", "mlp_out")]
    rows_p = load_jsonl(ROOT / "src/mechdiff/data/sets/cultural.jsonl")[:600]
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
    RESULTS["mapped_engine"] = dict(fit_ridge_48_s=t_fit, runs=out)
    table("Mapped-patch alpha-sweep, engine part only (192 variants x 150 val prompts, maps pre-fitted)",
          ["prompts per engine", "max_rows", "seconds"], out, f"48 ridge maps fitted in {t_fit:.1f}s")


# ---- section: compare with nnsight and TransformerLens ------------------------------------------

def tl_model_from(cfg, dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    tcfg = HookedTransformerConfig(
        d_model=cfg.hidden_size, d_head=cfg.hidden_size // cfg.num_attention_heads,
        n_heads=cfg.num_attention_heads, n_key_value_heads=cfg.num_key_value_heads, d_mlp=cfg.intermediate_size,
        n_layers=cfg.num_hidden_layers, n_ctx=2048, d_vocab=cfg.vocab_size, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=cfg.hidden_size // cfg.num_attention_heads,
        rotary_base=500000.0, final_rms=True, gated_mlp=True, eps=1e-5, dtype=dtype, init_weights=False,
        device=str(DEV), original_architecture="LlamaForCausalLM")
    t = time.perf_counter()
    with torch.device(DEV):
        m = HookedTransformer(tcfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0)
    m.eval().requires_grad_(False)
    sync()
    log(f"TransformerLens HookedTransformer built in {time.perf_counter() - t:.1f}s on "
        f"{next(m.parameters()).device}")
    return m


@section("compare")
def sec_compare(base, cfg, shapes, reps, dtype):
    from mechdiff.sites.capture import capture
    L = cfg.num_hidden_layers
    sites = capture_sites(L)
    tl_names = {f"blocks.{l}.{h}" for l in range(L) for h in ("hook_resid_post", "hook_attn_out", "hook_mlp_out")}
    batches = {(B, T): random_batch(B, T, cfg.vocab_size) for B, T in shapes}
    res = {k: {} for k in batches}

    def record_row(key, name, fn, note=""):
        try:
            t, _ = timeit(fn, reps=reps)
            mem = peak_extra(fn)
            res[key][name] = (t, mem, note)
        except Exception as e:
            res[key][name] = (float("nan"), float("nan"), f"failed: {type(e).__name__}: {str(e)[:120]}")
            log(traceback.format_exc())
            cleanup()

    for key, b in batches.items():
        B = len(b)
        record_row(key, "HF forward (reference)", lambda: hf_forward(base, b))
        record_row(key, "mechdiff capture() (kept: last pos -> CPU)",
                   lambda: capture(base, None, b, sites, batch_size=B, validate=False))
        record_row(key, f"mechdiff capture(device_out={DEV.type!r}) (kept: last pos, stays on the device)",
                   lambda: capture(base, None, b, sites, batch_size=B, validate=False, device_out=DEV))
    # nnsight wraps the model's modules: measure it after the plain runs, then re-check the plain forward
    try:
        from nnsight import NNsight
        nm = NNsight(base)

        def nn_run(b):
            saved = []
            with torch.no_grad(), nm.trace(**b.model_inputs(), use_cache=False, logits_to_keep=1):
                for l in range(L):
                    layer = nm.model.layers[l]
                    saved.append(layer.self_attn.output[0][:, -1].save())
                    saved.append(layer.mlp.output[:, -1].save())
                    saved.append(layer.output[:, -1].save())
            return saved

        for key, b in batches.items():
            got = nn_run(b)
            chk = capture(base, None, b, ["resid_post.0"], batch_size=len(b), validate=False)["resid_post.0"]
            err = (got[2].float().cpu() - chk).abs().max().item()
            del got
            record_row(key, "nnsight 0.8.1 trace, .save() last pos", lambda b=b: nn_run(b),
                       f"max diff vs capture {err:.2g}")
            record_row(key, "HF forward again, after NNsight() wrapped the model", lambda b=b: hf_forward(base, b))
        del nm
    except Exception as e:
        log(f"nnsight not measured: {type(e).__name__}: {e}")
        log(traceback.format_exc())
        for key in batches:
            res[key]["nnsight"] = (float("nan"), float("nan"), f"not run: {type(e).__name__}: {str(e)[:100]}")
    cleanup()
    # TransformerLens: its own model (same shape, random weights)
    try:
        tl = tl_model_from(cfg, dtype)
        for key, b in batches.items():
            ids = b.input_ids
            record_row(key, "TransformerLens forward (no cache)", lambda ids=ids: tl(ids, return_type="logits"))
            record_row(key, "TransformerLens run_with_cache(names_filter=96 sites)",
                       lambda ids=ids: tl.run_with_cache(ids, names_filter=lambda n: n in tl_names,
                                                         return_type="logits"))
            record_row(key, "TransformerLens run_with_cache(names_filter) + return_type=None",
                       lambda ids=ids: tl.run_with_cache(ids, names_filter=lambda n: n in tl_names,
                                                         return_type=None)[1])
        del tl
    except Exception as e:
        log(f"TransformerLens not measured: {type(e).__name__}: {e}")
        log(traceback.format_exc())
        for key in batches:
            res[key]["TransformerLens"] = (float("nan"), float("nan"), f"not run: {type(e).__name__}: {str(e)[:100]}")
    cleanup()
    for (B, T), r in res.items():
        ref = r["HF forward (reference)"][0]
        cap = r.get("mechdiff capture() (kept: last pos -> CPU)", (float("nan"),))[0]
        rows = [[n, t * 1e3, B * T / t, ref / t, t / cap, mem, note] for n, (t, mem, note) in r.items()]
        RESULTS.setdefault("compare", {})[f"B{B}_T{T}"] = {n: dict(s=t, peak_gib=mem, note=note) for n, (t, mem, note) in r.items()}
        table(f"mechdiff vs nnsight vs TransformerLens, B={B}, T={T}, {len(sites)} sites",
              ["method", "ms (median)", "tokens/s", "throughput vs HF forward", "time / mechdiff capture",
               "extra peak GiB", "note"], rows)


# ---- main ----------------------------------------------------------------------------------

def main():
    global DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on CPU: a dry run of every code path")
    ap.add_argument("--sections", default="capture,patch,linalg,maps_detail,patch_more,capture_more,"
                    "mapped_engine,stages,compare")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole script (0: none); the "
                    "stages section is cut off (SIGALRM) so that --reserve seconds remain for compare")
    ap.add_argument("--reserve", type=float, default=120)
    ap.add_argument("--full-study", action="store_true",
                    help="stages with behaviour (RQ1) and side effects (RQ2) on: the whole study's wall time")
    args = ap.parse_args()
    DEV = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    secs = args.sections.split(",")
    if OUT:
        os.makedirs(OUT, exist_ok=True)
    info = env_info()
    RESULTS["env"] = info
    log("env: " + json.dumps(info))
    tiny = args.tiny
    dtype = torch.float32 if tiny else torch.bfloat16
    cfg = llama_config(tiny)
    if DEV.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # library defaults; the modules choose precision
    cap_shapes = [(4, 64), (12, 16)] if tiny else [(16, 512), (150, 48)]
    patch_shapes = [(6, 16), (12, 16)] if tiny else [(50, 48), (150, 48)]
    max_rows = [64, 1024] if tiny else [1024, 2048, 4800]   # 2048: the engine's default
    reps = 2 if tiny else args.reps
    need_models = any(s in secs for s in ("capture", "patch", "stages", "compare", "patch_more", "capture_more",
                                          "mapped_engine"))
    base = tuned = None
    if need_models:
        base, tuned = build_pair(cfg, dtype)
    if "capture" in secs:
        sec_capture(base, cfg, cap_shapes, reps)
    if "patch" in secs:
        sec_patch(base, tuned, cfg, patch_shapes, tail=5, max_rows_list=max_rows, reps=max(2, reps // 2))
    if "linalg" in secs:
        if tiny:
            sec_linalg(4, 400, 64, 100, 2)
        else:
            sec_linalg(32, 10000, 4096, 2000, 3)
    if "maps_detail" in secs:
        sec_maps_detail(*((60, 64) if tiny else (450, 4096)))
    if "patch_more" in secs:
        sec_patch_more(base, tuned, cfg, tail=5)
    if "capture_more" in secs:
        sec_capture_more(base, cfg, reps=reps if tiny else 10)
    if "mapped_engine" in secs:
        sec_mapped_engine(base, tuned, cfg)
    if "stages" in secs:
        left = args.budget - (time.perf_counter() - T_START) - (args.reserve if "compare" in secs else 0)
        sec_stages(base, tuned, cfg, tiny, budget_s=max(30.0, left) if args.budget else None,
                   full=args.full_study)
    if "compare" in secs:
        del tuned
        tuned = None
        cleanup()
        sec_compare(base, cfg, cap_shapes, reps, dtype)
    log(f"\nall done in {time.perf_counter() - T_START:.0f}s")
    flush_results()


if __name__ == "__main__":
    main()

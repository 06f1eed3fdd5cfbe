#!/usr/bin/env python
"""Capture on the Llama-3.1-8B-shaped random pair (GPU), each section alone or from bench_gpu.py:

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_capture.py     # both sections
    python benchmarks/bench_capture.py --sections capture --reps 7       # one section
    python benchmarks/bench_capture.py --tiny                                # tiny Llama on CPU (dry run)

Sections:
  capture       plain HF forward (last logits) vs mechdiff record()/capture() of resid_post/attn_out/
                mlp_out at every layer, last position kept: time, tokens/s, ratio, extra peak memory
                (B=16,T=512 and B=150,T=48), checks against output_hidden_states and the pre-fix
                capture() loop (an embedded copy); then 600 prompts in batches of 150 and of 32
  capture_more  B=150, T=48 again (10 repeats): where capture()'s extra time goes, + a profile

The reference row is the honest baseline (common.honest_forward: contiguous last-token output layer); runs 1-3 used HF's ``logits_to_keep=1`` forward instead (RESULTS.md).
Output: markdown tables on stdout; with $OUT (or --out) also $OUT/bench.log,
$OUT/capture_results.md/.json and $OUT/profile_capture.txt.
"""
from __future__ import annotations

import os

import torch

import common as C
from common import capture_sites, honest_forward, log, peak_extra, random_batch, section, sync, table, timeit


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
        bb = bb.to(C.DEV)
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
    DEV = C.DEV
    last = lambda t: t[:, -1]  # noqa: E731

    def rec():
        with record(model, sites, select=last) as r:
            model(**b.model_inputs(), use_cache=False, logits_to_keep=1)
        return dict(r)

    def cap():
        return capture(model, None, b, sites, positions="last", batch_size=B, validate=False)

    def cap_dev():  # same, kept on the GPU in the model's dtype (no CPU transfer)
        return _rec_gpu(model, b, sites, last)

    def hidden():
        return model(**b.model_inputs(), use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states

    def cap_gpu():
        return capture(model, None, b, sites, positions="last", batch_size=B, validate=False, device_out=DEV)

    return {
        "HF forward, last logits (reference)": lambda: honest_forward(model, b),
        "HF forward, output_hidden_states (full seq, resid only)": hidden,
        "mechdiff record(select=t[:, -1]) hooks, full forward (view select: hooks fix)": rec,
        "mechdiff record(stop_after_last) on GPU": cap_dev,
        "mechdiff capture() -> CPU float32 (pinned, overlapped)": cap,
        f"mechdiff capture(device_out={DEV.type!r}) float32": cap_gpu,
        "capture() BEFORE (9f34f15 loop, embedded copy) -> CPU float32": lambda: capture_before(model, b, sites, B),
    }


def _rec_gpu(model, b, sites, last):
    from mechdiff.sites.hooks import record
    with record(model, sites, select=last, stop_after_last=True) as r:
        model(**b.model_inputs(), use_cache=False)
    return dict(r)


@section("capture")
def sec_capture(base, cfg, shapes, reps):
    DEV, RESULTS = C.DEV, C.RESULTS
    L = cfg.num_hidden_layers
    sites = capture_sites(L)
    from mechdiff.sites.capture import capture, validated
    validated(base)  # one-time check, outside the timings
    for B, T in shapes:
        b = random_batch(B, T, cfg.vocab_size)
        # correctness: capture == record == HF hidden states at the last position
        got = capture(base, None, b, sites, batch_size=B, validate=False)
        hs = base(**b.model_inputs(), use_cache=False, output_hidden_states=True).hidden_states
        err = max((got[f"resid_post.{l}"] - hs[l + 1][:, -1].float().cpu()).abs().max().item() for l in range(L - 1))
        got_dev = capture(base, None, b, sites, batch_size=B, validate=False, device_out=DEV)
        old = capture_before(base, b, sites, B)
        err_dev = max((got[k] - got_dev[k].cpu()).abs().max().item() for k in sites)
        err_old = max((got[k] - old[k]).abs().max().item() for k in sites)
        del hs, got, got_dev, old
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
           lambda: [honest_forward(base, p) for p in parts],
           f"capture() -> CPU, batch_size={bs}": lambda: capture(base, None, bw, sites, batch_size=bs, validate=False),
           "capture() -> CPU, batch_size=32 (default)": lambda: capture(base, None, bw, sites, validate=False),
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

    fns = {"HF forward, last logits": lambda: honest_forward(base, b),
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
    C.RESULTS["capture_more"] = rows
    table("Capture at B=150, T=48 again (10 repeats): where capture()'s extra time goes",
          ["method", "ms (median)", "min-max", "throughput vs HF forward"], rows)
    from torch.profiler import ProfilerActivity, profile
    capture(base, None, b, sites, batch_size=150, validate=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        capture(base, None, b, sites, batch_size=150, validate=False)
        sync()
    txt = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
    log("\n#### torch.profiler: capture() at B=150, T=48, by self CPU time\n\n```\n" + txt + "\n```")
    if C.OUT:
        with open(os.path.join(C.OUT, "profile_capture.txt"), "w") as f:
            f.write(txt)


def run_capture(ctx):
    shapes = C.capture_shapes(ctx.tiny)
    sec_capture(ctx.base, ctx.cfg, shapes, ctx.reps)


def run_capture_more(ctx):
    sec_capture_more(ctx.base, ctx.cfg, reps=ctx.reps if ctx.tiny else 10)


SECTIONS = {"capture": C.Section(run_capture), "capture_more": C.Section(run_capture_more)}


def main(argv=None, ctx=None, sections=None):
    return C.run_sections(SECTIONS, __doc__, argv, ctx, sections, stem="capture_results")


if __name__ == "__main__":
    main()

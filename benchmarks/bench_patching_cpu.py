"""Time a last-position patch sweep over every layer: naive full recomputation vs PatchEngine.

    python benchmarks/bench_patching_cpu.py                       # SmolLM2-135M-shaped, random, CPU
    python benchmarks/bench_patching_cpu.py --tiny                # dry run: --preset tiny --batch 4 --seq 16 --reps 1
    python benchmarks/bench_patching_cpu.py --preset llama8b --device cuda --dtype bfloat16 \\
        --batch 50 --seq 48 --tail 5 --max-rows 256 1024 2048     # the issue's 8B target, one GPU

Random weights (speed does not depend on them). Prompts are left padded with varied lengths and a
chat-template tail of ``--tail`` tokens after the decision token, like Llama-3's assistant header.
One "direction" of a cross-model sweep is one model patched at all layers (resid_post, replace);
the issue's goal is sweep cost <= 2 x clean forward per model. "half shared" sweeps the same layers
with the bottom half's sources equal to the clean states (layers both models share: detected as
no-ops, not computed). Prints a table, asserts nothing (with $OUT or --out also
$OUT/patching_cpu_results.md/.json). Times: the mean of ``--reps`` (default 3) after a warm-up.
"""
from __future__ import annotations

import torch

import common as C
from common import PRESETS, build_model, kl_gap, log, make_batch, preset_config, table, timeit

from mechdiff.patching import Patch, PatchEngine


def timed(fn, reps: int = 1, label: str = "") -> float:
    """Mean seconds of ``reps`` calls, no warm-up (callers warm up themselves)."""
    dt = timeit(fn, warmup=0, reps=reps, stat="mean")[0]
    if label:
        log(f"  [{label}: {dt:.4f} s]")
    return dt


def main(argv=None):
    ap = C.parser(__doc__, reps=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--tail", type=int, default=5, help="template tokens after the decision token")
    ap.add_argument("--measure", choices=["last", "decision"], default="last")
    ap.add_argument("--max-rows", type=int, nargs="+", default=[2048])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--naive-layers", type=int, default=0,
                    help="time the naive sweep on this many layers and extrapolate (0: all)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.device, args.batch, args.seq, args.reps = "tiny", "cpu", 4, 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    C.setup(args, "patching_cpu_results", device=args.device)
    device, dtype = C.DEV, getattr(torch, args.dtype)
    cfg = preset_config(args.preset)
    model = build_model(cfg, dtype, frozen=False)
    reps = args.reps
    L = cfg.num_hidden_layers
    batch = make_batch(args.batch, args.seq, args.tail, cfg.vocab_size, device)
    sites = [f"resid_post.{l}" for l in range(L)]

    with torch.no_grad():
        model(**batch.model_inputs(), logits_to_keep=1)  # warm-up
        t_clean = timed(lambda: model(**batch.model_inputs(), logits_to_keep=1), reps=reps, label="clean")
        eng0 = PatchEngine(model, batch, measure=args.measure, record_sites=sites)
        src = {s: v + 0.5 * torch.randn_like(v) for s, v in eng0.clean_states(sites).items()}
        variants = [Patch(s, src[s]) for s in sites]
        n_naive = args.naive_layers or L
        t_naive = timed(lambda: eng0.run_naive(variants[:n_naive]), label="naive") * L / n_naive
        sweeps = []
        for mr in args.max_rows:
            t_build = timed(lambda: PatchEngine(model, batch, measure=args.measure, max_rows=mr))
            eng = PatchEngine(model, batch, measure=args.measure, max_rows=mr)
            eng.run(variants)  # warm-up: first calls with new shapes pay kernel selection / autotuning
            t_sweep = timed(lambda: eng.run(variants), reps=reps, label="engine")
            eng_ns = PatchEngine(model, batch, measure=args.measure, max_rows=mr, skip_layers=False)
            eng_ns.run(variants)
            t_noskip = timed(lambda: eng_ns.run(variants), label="no skip")
            del eng_ns
            half = [Patch(s, (eng0.clean_states([s])[s] if l < L // 2 else src[s])) for l, s in enumerate(sites)]
            t_half = timed(lambda: eng.run(half), label="half shared")
            sweeps.append((mr, t_build, t_sweep, t_noskip, t_half))
        fast = eng.run(variants[:4])
        ref = eng0.run_naive(variants[:4])
        err = (fast - ref).abs().max().item()
        kl_eq = kl_gap(fast, ref)                               # max KL(naive || engine)
        lp, lc = torch.log_softmax(ref, -1), torch.log_softmax(eng0.clean_logits, -1)
        kl_fx = (lc.exp() * (lc - lp)).sum(-1).mean().item()   # mean KL(clean || patched)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    rows = [["clean forward (full batch)", t_clean, 1.0],
            ["naive sweep, all layers" + (" (extrapolated)" if n_naive < L else ""), t_naive, t_naive / t_clean]]
    for mr, t_build, t_sweep, t_noskip, t_half in sweeps:
        rows += [[f"engine clean pass (max_rows={mr})", t_build, t_build / t_clean],
                 [f"engine sweep, all layers (max_rows={mr})", t_sweep, t_sweep / t_clean],
                 ["  same without layer skipping", t_noskip, t_noskip / t_clean],
                 ["  same, bottom half of layers shared", t_half, t_half / t_clean],
                 ["  naive / engine sweep", "", t_naive / t_sweep]]
    C.RESULTS["patching_cpu"] = dict(args=vars(args), rows=rows, max_abs_logit_diff=err, max_kl=kl_eq,
                                     effect_mean_kl=kl_fx, peak_gib=peak)
    table(f"Patch sweep, preset={args.preset} device={device} dtype={args.dtype} B={args.batch} T={args.seq} "
          f"tail={args.tail} measure={args.measure} layers={L} threads={torch.get_num_threads()}",
          ["what", "seconds", "x clean fwd"], rows,
          f"engine vs naive on 4 variants: max |logit diff| {err:.3g}, max KL(naive || engine) {kl_eq:.3g} "
          f"(the patches' own effect: mean KL(clean || patched) {kl_fx:.3g})"
          + (f"; peak GPU memory {peak:.1f} GiB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()

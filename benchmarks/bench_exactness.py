"""Exactness and cost of PatchEngine do-nothing patches (issue 9), e.g. on one H200:

    python benchmarks/bench_exactness.py                                  # llama8b, cuda, bf16, B=50,150
    python benchmarks/bench_exactness.py --tiny       # smoke test: --preset tiny --device cpu --batch 8 --reps 1

Two random-weight models of the preset's shape: ``base`` and ``tuned`` = base with the MLPs of the
top half of the blocks perturbed (the bottom half shared exactly). Prompts: common.make_batch
(as bench_patching_cpu.py: left padded, decision token ``--tail`` tokens before the end).

Table 1 (exactness, bf16), per measure, max KL over prompts and layers (resid_post, every layer):
  write-back           clean_states written back into the same engine (no-op detection: exact 0)
  write-back computed  the same with detect_noops=False: computed in a pass, against the in-pass
                       reference (the clean-run value put into the pass stream: tiny, not 0)
  alpha-0 computed     replace with alpha=0 (leaves the in-pass state as it is), detect_noops=False:
                       0 iff the pass computes rows that joined at different layers bit for bit alike
  shared layers        cross-model patch, both directions, sources = the other engine's clean_states
                       on the same batch, at the shared blocks (truth 0)
  shared masked        the same with the stages' reducer: KL masked to a random half of the
                       vocabulary and unmasked beside it (kl_reducer(allowed_ids, with_unmasked=True));
                       the max of both (truth 0)
  shared, old ref      the shared-layer rows computed (detect_noops=False) and compared with
                       clean_logits instead of the in-pass reference: the floor the old engine had
  real layers          the same sweep at the perturbed blocks: mean and max (the effect)
  |eng - naive|        max |KL_engine - KL_naive| at the first perturbed blocks, base -> tuned (naive:
                       one full forward per layer against its own clean forward), beside the naive
                       mean: the engine's error is the bf16 rounding of the effect itself

Table 2 (cost): one plain forward with a contiguous last-token output layer (the honest baseline,
common.honest_baseline; DESIGN.md "Baseline trap"); engine construction (clean pass) of both models;
the cross-model sweep (all layers, both directions) with the shared half skipped as no-ops, and with every layer real
(sources perturbed); each as a multiple of the plain forward of both models; extra peak memory.
Times: the best of ``--reps`` (default 3) after one warm-up. Output: markdown tables on stdout; with
$OUT (or --out) also $OUT/bench.log and $OUT/exactness_results.md/.json.
"""
from __future__ import annotations

import torch

import common as C
from common import PRESETS, build_pair, make_batch, perturb_mlps, preset_config, table, timeit

from mechdiff.patching import Patch, PatchEngine, kl_reducer, patch_kl


def best_of(fn, reps=3, warmup=1):
    return timeit(fn, warmup=warmup, reps=reps, stat="min")[0]


def sweep_kl(eng, src, sites, **kw):
    return patch_kl(eng, [Patch(s, src[s]) for s in sites], **kw)


def main(argv=None):
    ap = C.parser(__doc__, reps=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[50, 150])
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--tail", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.1, help="relative perturbation of the top MLPs")
    ap.add_argument("--naive-layers", type=int, default=4, help="perturbed layers checked against naive")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.device, args.batch, args.reps = "tiny", "cpu", [8], 1
    C.setup(args, "exactness_results", device=args.device)
    dtype = getattr(torch, args.dtype)
    cfg = preset_config(args.preset)
    base, tuned = build_pair(cfg, dtype, perturb=perturb_mlps(args.noise), frozen=False)
    L = cfg.num_hidden_layers
    first = L // 2
    reps = args.reps
    models = {"base": base, "tuned": tuned}
    sites = [f"resid_post.{l}" for l in range(L)]
    allowed = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(0))[:cfg.vocab_size // 2]
    ex_rows, cost_rows = [], []
    with torch.no_grad():
        for B in args.batch:
            batch = make_batch(B, args.seq, args.tail, cfg.vocab_size)
            t_plain = C.honest_baseline(models.values(), batch, reps=reps)
            for measure in ("last", "decision"):
                mk = lambda m, **kw: PatchEngine(m, batch, measure=measure, record_sites=sites, **kw)  # noqa: E731
                t_build = best_of(lambda: [mk(m) for m in models.values()], reps=min(2, reps))
                eng = {k: mk(m) for k, m in models.items()}
                raw = {k: mk(m, detect_noops=False) for k, m in models.items()}
                st = {k: e.clean_states() for k, e in eng.items()}
                kl_wb = max(sweep_kl(eng[k], st[k], sites).max().item() for k in eng)
                kl_wb_c = max(sweep_kl(raw[k], st[k], sites).max().item() for k in raw)
                zero = [Patch(s, st["base"][s], alpha=0.0) for s in sites]
                kl_a0 = max(patch_kl(raw[k], zero).max().item() for k in raw)
                cross = {"base": sweep_kl(eng["base"], st["tuned"], sites),       # tuned -> base
                         "tuned": sweep_kl(eng["tuned"], st["base"], sites)}      # base -> tuned
                shared = max(v[:first].max().item() for v in cross.values())
                real_max = max(v[first:].max().item() for v in cross.values())
                real_mean = sum(v[first:].mean().item() for v in cross.values()) / 2
                masked = max(eng[k].run([Patch(s, st[o][s]) for s in sites[:first]],
                                        reduce=kl_reducer(eng[k], allowed, with_unmasked=True)).max().item()
                             for k, o in (("base", "tuned"), ("tuned", "base")))
                old = {k: raw[k].run([Patch(s, st[o][s]) for s in sites[:first]],
                                     reduce=lambda lg, rows, e=raw[k]: kl_reducer(e)(lg, rows))
                       for k, o in (("base", "tuned"), ("tuned", "base"))}
                old_floor = max(v.max().item() for v in old.values())
                chk = sites[first:first + args.naive_layers]
                nv = eng["tuned"].run_naive([Patch(s, st["base"][s]) for s in chk], reduce=kl_reducer(eng["tuned"]))
                en = cross["tuned"][first:first + args.naive_layers]
                gap = (en - nv).abs().max().item()
                ex_rows.append((B, measure, kl_wb, kl_wb_c, kl_a0, shared, masked, old_floor, real_mean, real_max, gap,
                                nv.mean().item()))
                # cost: both directions, shared half skipped; then every layer real
                run_both = lambda src: (sweep_kl(eng["base"], src["tuned"], sites),   # noqa: E731
                                        sweep_kl(eng["tuned"], src["base"], sites))
                t_sweep = best_of(lambda: run_both(st), reps=reps)
                noisy = {k: {s: v + 0.05 * v.float().std() * torch.randn_like(v.float()).to(v.dtype)
                             for s, v in d.items()} for k, d in st.items()}
                t_real = best_of(lambda: run_both(noisy), reps=reps)
                mem = C.peak_extra(lambda: run_both(noisy))
                cost_rows.append((B, measure, t_plain, t_build, t_sweep, t_real, mem))
                del eng, raw, st, noisy
                C.cleanup()
    setting = (f"preset={args.preset} device={C.DEV} dtype={args.dtype} T={args.seq} tail={args.tail} layers={L} "
               f"shared blocks 0..{first - 1}, perturbed {first}..{L - 1} (MLP noise {args.noise})")
    table("Exactness (max KL over prompts and layers; resid_post at every layer)",
          ["B", "measure", "write-back", "w-b computed", "alpha-0 comp.", "shared layers", "shared masked",
           "shared old ref",
           "real mean", "real max", "|eng - naive|", "naive mean"], [list(r) for r in ex_rows], setting)
    table("Cost (seconds; x = multiple of one plain forward of both models, contiguous last-token head)",
          ["B", "measure", "plain fwd both", "build both", "sweep shared", "x", "sweep all real", "x",
           "build+real x", "extra GiB"],
          [[B, m, tp, tb, ts, ts / tp, tr, tr / tp, (tb + tr) / tp, mem] for B, m, tp, tb, ts, tr, mem in cost_rows],
          setting)
    C.RESULTS["exactness"] = [dict(zip(["B", "measure", "write_back", "write_back_computed", "alpha0_computed",
                                        "shared", "shared_masked", "shared_old_ref", "real_mean", "real_max", "eng_vs_naive",
                                        "naive_mean"], r)) for r in ex_rows]
    C.RESULTS["cost"] = [dict(zip(["B", "measure", "plain_both_s", "build_both_s", "sweep_shared_s",
                                   "sweep_real_s", "peak_gib"], r)) for r in cost_rows]
    C.flush_results()


if __name__ == "__main__":
    main()

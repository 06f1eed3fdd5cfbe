"""Default settings on one GPU (issue 9): the default batch size against the best one, and the
patch sweep's time and extra peak memory against ``max_rows``, e.g. on one H200:

    python benchmarks/bench_defaults.py                          # llama8b shape, cuda, bf16
    python benchmarks/bench_defaults.py --tiny                   # dry run on the CPU

Two random-weight models of the preset's shape (``tuned`` = base with the top half's MLPs perturbed).

Table 1, capture: resid_post/attn_out/mlp_out x every layer at the last position of ``--n`` prompts
(T=48, left padded), in batches of each ``--batches`` size and of the default
(:func:`mechdiff.batching.default_batch_size` with both models loaded); prompts per second, as a
share of the best batch size's, and as a share of the honest baseline's (common.honest_forward).

Table 2, sweep: every layer, both directions (resid_post, sources = the other model's clean states
with noise, so every patch is computed), per measure, batch and ``max_rows`` (each of ``--max-rows`` and
the engine's default; at the default also with the final block on all positions, the engine's
``_trim_final`` off, for comparison); seconds, x the honest
baseline (one plain forward of both models, output layer on a contiguous copy of the last position,
common.honest_baseline, as in bench_exactness.py), the sweep's FLOP floor in the same unit, extra peak GiB.

"FLOP floor": the sweep's token-blocks over the forward's; "engine floor": the matmul FLOPs of what the
engine computes at the ``last`` readout over the forward's (:func:`engine_floor`: in-pass references,
final block trimmed, the output layer on every row).

Then (``profile``, CUDA) CUDA kernel time by kind for one honest forward of one model against one
direction of the ``last`` sweep, per 1k token-blocks, and the sweep's top kernels.
"""
from __future__ import annotations

import torch

import common as C
from common import PRESETS, build_pair, honest_baseline, honest_forward, make_batch, perturb_mlps, preset_config, table

from mechdiff.batching import default_batch_size
from mechdiff.data.prompts import Batch
from mechdiff.patching import Patch, PatchEngine, patch_kl
from mechdiff.sites.capture import capture


def best_of(fn, reps=3):
    return C.timeit(fn, warmup=1, reps=reps, stat="min")[0]


def flop_floor(L: int, T: int, tail: int) -> float:
    """Token-blocks of a both-direction resid_post sweep over every layer (a patch at layer l re-runs
    the ``tail + 1`` suffix tokens through blocks l+1..L-1) over those of one forward of both models."""
    return 2 * (tail + 1) * (L * (L - 1) // 2) / (2 * T * L)


def engine_floor(cfg, T: int, tail: int) -> float:
    """Matmul FLOPs of what the engine computes for a both-direction resid_post sweep over every layer
    at ``measure="last"`` over those of one honest forward of both models (T tokens through every
    block, the output layer on the last position): the patched rows (a patch at layer l re-runs the
    ``tail + 1`` suffix tokens through blocks l+1..L-1; the last layer's patch is dropped, it cannot
    reach the last position), one in-pass reference row per prompt from block 1, the final block's
    output projection and MLP on the last position only (the other ``tail`` positions cost its
    query/key/value projections), and the output layer on every row (the forward: one per prompt)."""
    L, s, d, f, V = cfg.num_hidden_layers, tail + 1, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd * d, 2 * cfg.num_key_value_heads * hd * d
    block = q + kv + q + 3 * d * f                          # multiply-adds per token and block
    last = block + tail * (q + kv)                          # the trimmed final block, all s tokens
    rows = L - 1 + 1                                        # patched rows + the reference, per prompt
    sweep = sum((L - 2 - l) * s * block + last for l in range(L - 1)) + (L - 2) * s * block + last + rows * d * V
    return sweep / (T * L * block + d * V)


KINDS = {"attention": r"fmha|attention|flash|efficient",
         "gemm": r"gemm|cutlass|nvjet|xmma|cublas|sm90_|splitk|matmul",
         "copy/index": r"copy|index|gather|cat|scatter|memcpy|memset",
         "reduce/softmax": r"reduce|softmax|norm",
         "other elementwise": r"."}


def kernel_breakdown(fn, top: int = 0):
    """CUDA time of one call of ``fn`` by kernel kind (``KINDS``, first match wins), in ms, and (top > 0) the
    profiler's table of the ``top`` kernels by CUDA time."""
    import re

    from torch.profiler import ProfilerActivity, profile
    fn()
    C.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        C.sync()
    out = {}
    for ev in prof.key_averages():
        ms = getattr(ev, "device_time_total", None)
        ms = (ev.cuda_time_total if ms is None else ms) / 1000
        if ms <= 0:
            continue
        kind = next(k for k, rx in KINDS.items() if re.search(rx, ev.key, re.I))
        out[kind] = out.get(kind, 0.0) + ms
    out["total"] = sum(out.values())
    tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=90) if top else ""
    return out, tab


def main(argv=None):
    ap = C.parser(__doc__, reps=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=600, help="prompts captured")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 150, 256])
    ap.add_argument("--sweep-batch", type=int, nargs="+", default=[50, 150])
    ap.add_argument("--max-rows", type=int, nargs="+", default=[1024, 2048],
                    help="besides the engine's default (batching.default_max_rows)")
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--tail", type=int, default=5)
    ap.add_argument("--sections", default="capture,sweep,profile")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.device, args.dtype, args.reps = "tiny", "cpu", "float32", 1
        args.n, args.batches, args.sweep_batch, args.max_rows = 64, [8, 16], [8], [64, 256]
    C.setup(args, "defaults_results", device=args.device)
    dev, dtype = C.DEV, getattr(torch, args.dtype)
    cfg = preset_config(args.preset)
    base, tuned = build_pair(cfg, dtype, perturb=perturb_mlps(0.1), frozen=False)
    L = cfg.num_hidden_layers
    secs = args.sections.split(",")
    C.log(f"preset={args.preset} dtype={args.dtype} T={args.seq} tail={args.tail} layers={L}")
    with torch.no_grad():
        if "capture" in secs:
            sites = [f"{s}.{l}" for l in range(L) for s in ("resid_post", "attn_out", "mlp_out")]
            big = make_batch(args.n, args.seq, args.tail, cfg.vocab_size, "cpu")
            auto = default_batch_size([base, tuned], args.seq)
            rows = []
            for bs in sorted(set(args.batches + [auto])):
                t = best_of(lambda bs=bs: capture(base, None, big, sites, batch_size=bs), reps=args.reps)
                rows.append((bs, t, args.n / t, bs == auto))
            best = max(r[2] for r in rows)
            chunks = [Batch(big.input_ids[i:i + auto], big.attention_mask[i:i + auto], big.position_ids[i:i + auto],
                            big.decision[i:i + auto], big.ids[i:i + auto]) for i in range(0, args.n, auto)]

            def plain_all(strided=False):
                for c in chunks:
                    c = c.to(dev)
                    if strided:    # HF's own last-token head (logits_to_keep=1: a strided [B, 1, d] slice)
                        base(**c.model_inputs(), logits_to_keep=1)
                    else:
                        honest_forward(base, c)
            t_plain = best_of(plain_all, reps=args.reps)
            t_strided = best_of(lambda: plain_all(True), reps=args.reps)
            table(f"Capture: {len(sites)} sites, last position, {args.n} prompts x T={args.seq}; default batch size "
                  f"with both models loaded: {auto}",
                  ["batch", "s", "prompts/s", "/ best", "/ honest baseline", "default"],
                  [[bs, t, thr, thr / best, t_plain / t, "<-" if is_auto else ""] for bs, t, thr, is_auto in rows],
                  f"honest baseline (plain forward, contiguous last-token head) in batches of {auto}: {t_plain:.3f} s; "
                  f"HF's logits_to_keep=1 head: {t_strided:.3f} s. '/ honest baseline' = its time over capture's.")
        if "sweep" in secs or "profile" in secs:
            sites = [f"resid_post.{l}" for l in range(L)]
            rows = []
            for B in args.sweep_batch:
                b = make_batch(B, args.seq, args.tail, cfg.vocab_size)
                t_plain = honest_baseline((base, tuned), b, reps=args.reps)
                for measure in ("last", "decision"):
                    eng = {k: PatchEngine(m, b, measure=measure, record_sites=sites)
                           for k, m in (("base", base), ("tuned", tuned))}
                    st = {k: e.clean_states() for k, e in eng.items()}
                    noisy = {k: {s: v + 0.05 * v.float().std() * torch.randn_like(v.float()).to(v.dtype)
                                 for s, v in d.items()} for k, d in st.items()}
                    var = {"base": [Patch(s, noisy["tuned"][s]) for s in sites],     # tuned -> base
                           "tuned": [Patch(s, noisy["base"][s]) for s in sites]}     # base -> tuned
                    tail = args.tail if measure == "last" else 0
                    auto = eng["base"].max_rows           # the engine's default (batching.default_max_rows)
                    for mr in sorted(set(args.max_rows + [auto])) if "sweep" in secs else []:
                        for trim in ((True, False) if measure == "last" and mr == auto else (True,)):
                            for e in eng.values():
                                e.max_rows, e._trim_final = mr, trim
                            run = lambda: [patch_kl(eng[k], var[k]) for k in eng]   # noqa: E731
                            t = best_of(run, reps=args.reps)
                            mem = C.peak_extra(run)
                            rows.append((B, measure, f"{mr} (default)" if mr == auto else mr,
                                         "yes" if trim else "no", t_plain, t, t / t_plain,
                                         flop_floor(L, args.seq, tail),
                                         engine_floor(cfg, args.seq, tail) if measure == "last" else None, mem))
                    for e in eng.values():
                        e.max_rows, e._trim_final = auto, True
                    if "profile" in secs and measure == "last" and dev.type == "cuda":
                        fwd = kernel_breakdown(lambda: honest_forward(tuned, b))
                        swp = kernel_breakdown(lambda: patch_kl(eng["tuned"], var["tuned"]), top=25)
                        table(f"Kernel time by kind (CUDA ms): one honest forward of one model vs one direction of "
                              f"the `last` sweep (base -> tuned patches), B={B}, max_rows={auto} (default); per 1k token-blocks "
                              f"= ms over the token x block products run (forward {B * args.seq * L}, sweep "
                              f"{B * (tail + 1) * (L * (L - 1) // 2)} + references)",
                              ["kind", "forward ms", "sweep ms", "forward ms / 1k tb", "sweep ms / 1k tb"],
                              [[k, fwd[0].get(k, 0.0), swp[0].get(k, 0.0),
                                fwd[0].get(k, 0.0) * 1000 / (B * args.seq * L),
                                swp[0].get(k, 0.0) * 1000 / (B * (tail + 1) * (L * (L - 1) // 2))]
                               for k in list(KINDS) + ["total"]])
                        C.log(f"\nTop kernels of the sweep direction (B={B}):\n```\n{swp[1]}\n```")
                    del eng, st, noisy, var
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            if rows:
                table("Sweep: every layer, both directions, every patch computed; x = multiple of one honest plain "
                      "forward of both models (contiguous last-token output layer)",
                      ["B", "measure", "max_rows", "final block last-only", "plain both s", "sweep s", "x",
                       "FLOP floor x", "engine floor x", "extra peak GiB"],
                      [list(r) for r in rows])
    C.flush_results()

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""RQ4 (`mechdiff heads`) benchmark: attribution and the head-ablation sweep on the 8B-shaped pair.

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_rq4.py    # Llama-3.1-8B-shaped pair, GPU
    python benchmarks/bench_rq4.py --tiny                                # tiny Llama on CPU (dry run)

The pair is common.build_pair's (random weights directly on the device, bf16, sdpa; the
"tuned" side perturbs the upper half of the layers), prompts are the shipped cultural set tokenized
by common.bench_tokenizer's small BPE (~48 tokens per prompt). Rows (time: wall seconds with the device
synchronised; peak: GiB allocated at the peak over what was allocated before the call):

1. grad x act for every head of 8 layers over 300 prompts, one model (issue 14: < 60 s, < 40 GiB);
2. integrated gradients (``--ig-steps``) for every head of 1 layer over 300 prompts, one model;
3. the ablation sweep of all heads at 2 layers (zero + mean: 2 x 32 x 2 variants) over 300 prompts,
   one model, through ``steps.patch_measure`` (issue 14: < 60 s, < 40 GiB);
4. the whole ``mechdiff heads`` stage at those 2 layers, both models (targets, states incl. "own"
   heads, zero / mean / swap / own sweep, grad x act, cumulative top-10 curves, summary and figures);
5. (``all``) the whole ``mechdiff heads`` stage over every layer (32 x 32 = 1,024 heads of the 8B shape),
   both models: grad x act for all heads in one backward pass per batch plus the batched per-head sweep
   (``--all-ablations``, default zero,mean; ``--all-swaps``, default swap,own: the stage's defaults), the
   changed-head count (BH, Storey, intervals) and the rest of the stage (issue 24: < 120 s, < 16 GiB).

Output: a markdown table on stdout; with ``$OUT`` (or --out) set also ``$OUT/rq4_results.md`` / ``.json``
and ``$OUT/bench.log``.
"""
from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

import torch

import common as C
from common import bench_tokenizer, build_pair, llama_config, loaded_pair, log, table, time_and_peak


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--n-prompts", type=int, default=None, help="default 300 (tiny: 24)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--rows", default="gxa,ig,ablate,stage,all")
    ap.add_argument("--all-ablations", default="zero,mean", help="row 5's head ablations (comma list; '' for none)")
    ap.add_argument("--all-swaps", default="swap,own", help="row 5's cross-model head patches (comma list)")
    args = ap.parse_args(argv)
    C.setup(args, "rq4_results")
    from mechdiff.analyses.attribution import Target, grad_x_act, integrated_gradients, logits_at, measured_positions
    from mechdiff.analyses.heads import patches
    from mechdiff.data.prompts import encode, load_jsonl
    from mechdiff.experiments import run_stage
    from mechdiff.patching.measure import patch_measure
    from mechdiff.sites.capture import capture

    cfg = llama_config(args.tiny)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    base, tuned = build_pair(cfg, dtype)
    tok, mean_len = bench_tokenizer()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    n = args.n_prompts or (24 if args.tiny else 300)
    prompts_path = C.PROMPTS
    prompts = load_jsonl(prompts_path)[:n]
    attr_layers = list(range(L - 16, L, 2)) if L >= 16 else list(range(L))          # 8 layers (tiny: all 4)
    abl_layers = [L - 10, L - 6] if L >= 16 else [1, 2]

    # target: the base model's top token at the decision token (one forward, not timed)
    tops = []
    for i in range(0, n, args.batch_size):
        b = encode(tok, prompts[i:i + args.batch_size]).to(C.DEV)
        with torch.no_grad():
            tops.append(logits_at(base, b, measured_positions(b, "decision")).argmax(-1).cpu())
    target = Target(torch.cat(tops))
    grad_x_act(base, tok, prompts[:4], target_slice(target, 4), attr_layers[-1:], batch_size=4)   # warm-up

    pair, models = loaded_pair(base, tuned, tok)
    rows, results = [], {}

    def row(name, fn, note=""):
        try:
            dt, peak, _ = time_and_peak(fn)
            rows.append([name, dt, peak, note])
        except Exception as e:  # keep going: one failure must not lose the other rows
            traceback.print_exc()
            rows.append([name, float("nan"), float("nan"), f"FAILED {type(e).__name__}: {str(e)[:120]}"])
        results[name] = rows[-1][1:]
        log(f"{name}: {rows[-1][1]:.2f} s, peak {rows[-1][2]:.2f} GiB {rows[-1][3]}")

    todo = args.rows.split(",")
    bs = args.batch_size
    if "gxa" in todo:
        row(f"grad x act, {len(attr_layers)} layers x {H} heads, {n} prompts, one model",
            lambda: grad_x_act(base, tok, prompts, target, attr_layers, batch_size=bs),
            f"layers {attr_layers}; graph kept from layer {attr_layers[0]} up")
    if "ig" in todo:
        row(f"integrated gradients ({args.ig_steps} steps), 1 layer x {H} heads, {n} prompts, one model",
            lambda: integrated_gradients(base, tok, prompts, target, attr_layers[:1], steps=args.ig_steps,
                                         batch_size=bs), f"layer {attr_layers[0]}")
    if "ablate" in todo:
        sites = [f"head_z.{l}" for l in abl_layers]
        cap = capture(base, tok, prompts, sites, batch_size=bs)
        states = {f"base.{s}": cap[s] for s in sites}
        variants = [patches(states, "base", l, [h], k) for l in abl_layers for k in ("zero", "mean") for h in range(H)]
        row(f"ablation sweep, {len(abl_layers)} layers x {H} heads x (zero, mean) = {len(variants)} variants, "
            f"{n} prompts, one model",
            lambda: patch_measure(models[0], prompts, variants, batch_size=bs, measure="decision",
                                  reducer=target.reducer()), f"layers {abl_layers} (head_z capture not timed)")
    if "stage" in todo:
        out = Path(tempfile.mkdtemp(prefix="mechdiff_bench_rq4_"))
        row(f"`mechdiff heads`, {len(abl_layers)} layers, {n} prompts, both models (all measurements)",
            lambda: run_stage("heads", pair, out=out, models=models, prompts=prompts_path, batch_size=bs,
                              layers=abl_layers, n_prompts=n), f"run directory {out}")
    if "all" in todo:
        out_all = Path(tempfile.mkdtemp(prefix="mechdiff_bench_rq4_all_"))
        abl = [k for k in args.all_ablations.split(",") if k]
        swaps = [k for k in args.all_swaps.split(",") if k]
        row(f"`mechdiff heads`, every layer ({L} x {H} = {L * H} heads), {n} prompts, both models: grad x act + "
            f"batched {'/'.join(abl + swaps)}",
            lambda: run_stage("heads", pair, out=out_all, models=models, prompts=prompts_path, batch_size=bs,
                              layers=list(range(L)), n_prompts=n, ablations=abl, swaps=swaps),
            f"run directory {out_all}")
    header = ["what", "wall s", "peak GiB over models", "note"]
    table(f"RQ4 on the {'tiny' if args.tiny else '8B-shaped'} pair ({C.DEV}, {dtype}, ~{mean_len:.0f} "
          f"tokens/prompt, batch size {bs})", header, rows,
          "targets: < 60 s and < 40 GiB for rows 1 and 3 (issue 14); < 120 s and < 16 GiB for the every-layer "
          "stage (issue 24)")
    C.RESULTS["rows"] = results
    C.flush_results()


def target_slice(t, k):
    """The first k rows of a Target."""
    from mechdiff.analyses.attribution import Target
    return Target(t.ids[:k], t.kind, t.allowed_ids)


if __name__ == "__main__":
    main()

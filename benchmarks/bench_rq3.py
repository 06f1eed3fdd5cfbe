#!/usr/bin/env python
"""RQ3 (`mechdiff steer`) on the Llama-3.1-8B-shaped random-weight pair: seconds per step and the
sweep's throughput against a plain forward.

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_rq3.py     # GPU, 450 fit / 150 test prompts
    python benchmarks/bench_rq3.py --tiny                                 # tiny Llama on CPU (dry run)

The pair, the tokenizer and the timing helpers are common.py's (``build_pair``: random weights, the
tuned copy's upper half of layers perturbed; ``bench_tokenizer``: a small BPE so a shipped cultural
prompt has about the seeds' ~48 tokens). The stage runs with the default grid (k 1,2,3,4,6,8 x alpha
0.5,1,2,3), every mode (steer, add in the base; ablate in the tuned), both handle kinds (diff,
contrast) plus the random control, the control layer, the Kazakh transfer handles and the side
effects (neutral perplexity at two positions, neutral MC) on.

Throughput: the sweep step's work in *token-layers* (its three clean runs: every real token through
every layer; each variant: one decision token through the layers from its patched layer up) divided
by its seconds, as a fraction of a plain forward's token-layers per second (HF forward of the same
prompts, same batch size: common.honest_forward, the output layer on a contiguous copy of the last
position; run 5 used HF's ``logits_to_keep=1`` forward, whose strided slice is slower). Output: markdown tables on stdout; with $OUT (or --out) also
$OUT/bench.log and $OUT/rq3_results.md/.json.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

import common as C
from common import bench_tokenizer, build_pair, honest_forward, llama_config, loaded_pair, log, sync, table, timeit


def _models(tiny: bool):
    cfg = llama_config(tiny)
    base, tuned = build_pair(cfg, torch.float32 if tiny else torch.bfloat16)
    tok, mean_len = bench_tokenizer()
    pair, models = loaded_pair(base, tuned, tok)
    return pair, models, cfg


def _plain_forward(model, tok, prompts, batch_size: int, reps: int = 3) -> tuple[float, int]:
    """Seconds (median of ``reps``) and real tokens of a plain HF forward over ``prompts`` (last-token
    logits only)."""
    from mechdiff.data.prompts import encode
    batches = [encode(tok, prompts[i:i + batch_size]).to(C.DEV) for i in range(0, len(prompts), batch_size)]
    t, _ = timeit(lambda: [honest_forward(model, b) for b in batches], warmup=1, reps=reps)
    return t, int(sum(int(b.attention_mask.sum()) for b in batches))


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per engine chunk (default 150 GPU / 8 tiny)")
    args = ap.parse_args(argv)
    C.setup(args, "rq3_results")
    from mechdiff.experiments.steer import RQ3Options
    from mechdiff.experiments.stage import get_stage, open_study
    pair, models, cfg = _models(args.tiny)
    bs = args.batch_size or (8 if args.tiny else 150)
    opts = RQ3Options(n_fit=450, n_dev=50, n_test=150) if not args.tiny else RQ3Options(
        n_fit=24, n_dev=8, n_test=16, n_neutral=8, n_mc=8, ks=[1, 2, 3], steer_alpha=[0.5, 1.0])
    prompts = str(C.PROMPTS)
    stage = get_stage("steer")
    out = Path(tempfile.mkdtemp(prefix="mechdiff_bench_rq3_"))
    study = open_study(pair, stage, opts, out=out, batch_size=bs, prompts=prompts, models=models)
    times: dict[str, float] = {}
    cached = study.run.cached

    def timed(name, fn, *a, **k):
        def run():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name] = time.perf_counter() - t
        return cached(name, run, *a, **k)
    study.run.cached = timed
    log(f"RQ3 options: {opts}\nbatch size {bs}, device {C.DEV}, run dir {out}")
    t0 = time.perf_counter()
    stage.run(study, opts)
    t_run = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = stage.summarise(study, opts)
    t_sum = time.perf_counter() - t1
    cells = study.run.read_json("rq3_cells.json")
    plan = study.run.read_json("rq3_prompts.json")
    from mechdiff.data.prompts import load_jsonl
    cult = {p["id"]: p for p in load_jsonl(prompts)}
    ev = [cult[i] for i in plan["dev"] + plan["test"]]
    t_plain, n_tok = _plain_forward(models[1].model, models[1].tokenizer, ev, bs,
                                    reps=args.reps or (1 if args.tiny else 3))
    L = cfg.num_hidden_layers
    work = 3 * n_tok * L + sum(len(ev) * (L - c["layer"]) for c in cells["cells"])   # token-layers
    sweep = times.get("rq3.sweep", float("nan"))
    ratio = (work / sweep) / (n_tok * L / t_plain)
    rows = [[name, s] for name, s in times.items()] + [["summarise (rq3.json, handles, figure, report)", t_sum],
                                                        ["total (run + summarise)", t_run + t_sum]]
    table(f"RQ3 steer on the {'tiny' if args.tiny else '8B-shaped'} random pair: {len(plan['fit'])} fit / "
          f"{len(plan['dev'])} dev / {len(plan['test'])} test prompts, {len(cells['cells'])} cells "
          f"(k {opts.ks} x alpha {opts.steer_alpha}, modes {opts.modes}), side effects on",
          ["step", "seconds"], rows)
    table("Sweep throughput vs a plain forward (token-layers per second)",
          ["plain forward tokens/s", "sweep token-layers", "sweep seconds", "sweep / plain throughput"],
          [[n_tok / t_plain, work, sweep, ratio]],
          f"plain forward: {len(ev)} prompts, {n_tok} tokens, batch {bs}, contiguous last-token head (common.honest_forward): {t_plain:.3f} s")
    C.RESULTS["rq3"] = {"steps_s": times, "summarise_s": t_sum, "total_s": t_run + t_sum, "cells": len(cells["cells"]),
                        "sweep_token_layers": work, "plain_tok_s": n_tok / t_plain, "sweep_vs_plain": ratio,
                        "options": dataclasses.asdict(opts), "result": summary.get("result", {}).get("status")}
    C.flush_results()
    log(f"result: {summary.get('result', {}).get('text')}")


if __name__ == "__main__":
    main()

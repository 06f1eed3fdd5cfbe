#!/usr/bin/env python
"""RQ3 (`mechdiff steer`) on the Llama-3.1-8B-shaped random-weight pair: seconds per step and the
sweep's throughput against a plain forward.

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_rq3.py     # GPU, 450 fit / 150 test prompts
    python benchmarks/bench_rq3.py --tiny                                 # tiny Llama on CPU (dry run)

The pair, the tokenizer and the timing helpers are bench_gpu.py's (``build_pair``: random weights, the
tuned copy's upper half of layers perturbed; ``bench_tokenizer``: a small BPE so a shipped cultural
prompt has about the seeds' ~48 tokens). The stage runs with the default grid (k 1,2,3,4,6,8 x alpha
0.5,1,2,3), every mode (steer, add in the base; ablate in the tuned), both handle kinds (diff,
contrast) plus the random control, the control layer, the Kazakh transfer handles and the side
effects (neutral perplexity at two positions, neutral MC) on.

Throughput: the sweep step's work in *token-layers* (its three clean runs: every real token through
every layer; each variant: one decision token through the layers from its patched layer up) divided
by its seconds, as a fraction of a plain forward's token-layers per second (HF forward of the same
prompts, same batch size, ``logits_to_keep=1``: a contiguous last-token output layer).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "src")]
import bench_gpu as G  # noqa: E402  (the pair, tokenizer and timing helpers)

OUT = os.environ.get("OUT")


def _models(tiny: bool):
    from mechdiff.models.load import LoadedModel, model_dims
    from mechdiff.pairs.spec import ModelSpec, Pair
    cfg = G.llama_config(tiny)
    base, tuned = G.build_pair(cfg, torch.float32 if tiny else torch.bfloat16)
    tok, mean_len = G.bench_tokenizer()

    def lm(model, side):
        info = {**model_dims(model), "source": f"bench:random-llama-{side}",
                "dtype": str(next(model.parameters()).dtype),
                "device": str(G.DEV), "spec": f"bench-{side}"}
        return LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path=f"/bench/{side}"), info=info)
    models = (lm(base, "base"), lm(tuned, "tuned"))
    return Pair(name="bench-8b-random", base=models[0].spec, tuned=models[1].spec, dtype="bfloat16"), models, cfg


def _plain_forward(model, tok, prompts, batch_size: int) -> tuple[float, int]:
    """Seconds and real tokens of a plain HF forward over ``prompts`` (last-token logits only)."""
    from mechdiff.data.prompts import encode
    batches = [encode(tok, prompts[i:i + batch_size]).to(G.DEV) for i in range(0, len(prompts), batch_size)]
    t, _ = G.timeit(lambda: [G.hf_forward(model, b) for b in batches], warmup=1, reps=3)
    return t, int(sum(int(b.attention_mask.sum()) for b in batches))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on CPU, small prompt counts (a dry run)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per engine chunk (default 150 GPU / 8 tiny)")
    args = ap.parse_args()
    G.DEV = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if G.DEV.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    from mechdiff.experiments.rq3 import RQ3Options
    from mechdiff.experiments.stage import get_stage, open_study
    pair, models, cfg = _models(args.tiny)
    bs = args.batch_size or (8 if args.tiny else 150)
    opts = RQ3Options(n_fit=450, n_dev=50, n_test=150) if not args.tiny else RQ3Options(
        n_fit=24, n_dev=8, n_test=16, n_neutral=8, n_mc=8, ks=[1, 2, 3], alphas=[0.5, 1.0])
    prompts = str(ROOT.parent / "src/mechdiff/data/sets/cultural.jsonl")
    stage = get_stage("steer")
    out = Path(tempfile.mkdtemp(prefix="mechdiff_bench_rq3_"))
    study = open_study(pair, stage, opts, out=out, batch_size=bs, prompts=prompts, models=models)
    times: dict[str, float] = {}
    cached = study.run.cached

    def timed(name, fn, *a, **k):
        def run():
            G.sync()
            t = time.perf_counter()
            fn()
            G.sync()
            times[name] = time.perf_counter() - t
        return cached(name, run, *a, **k)
    study.run.cached = timed
    G.log(f"RQ3 options: {opts}\nbatch size {bs}, device {G.DEV}, run dir {out}")
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
    t_plain, n_tok = _plain_forward(models[1].model, models[1].tokenizer, ev, bs)
    L = cfg.num_hidden_layers
    work = 3 * n_tok * L + sum(len(ev) * (L - c["layer"]) for c in cells["cells"])   # token-layers
    sweep = times.get("rq3.sweep", float("nan"))
    ratio = (work / sweep) / (n_tok * L / t_plain)
    rows = [[name, s] for name, s in times.items()] + [["summarise (rq3.json, handles, figure, report)", t_sum],
                                                        ["total (run + summarise)", t_run + t_sum]]
    G.table(f"RQ3 steer on the {'tiny' if args.tiny else '8B-shaped'} random pair: {len(plan['fit'])} fit / "
            f"{len(plan['dev'])} dev / {len(plan['test'])} test prompts, {len(cells['cells'])} cells "
            f"(k {opts.ks} x alpha {opts.alphas}, modes {opts.modes}), side effects on",
            ["step", "seconds"], rows)
    G.table("Sweep throughput vs a plain forward (token-layers per second)",
            ["plain forward tokens/s", "sweep token-layers", "sweep seconds", "sweep / plain throughput"],
            [[n_tok / t_plain, work, sweep, ratio]],
            f"plain forward: {len(ev)} prompts, {n_tok} tokens, batch {bs}, logits_to_keep=1: {t_plain:.3f} s")
    G.RESULTS["rq3"] = {"steps_s": times, "summarise_s": t_sum, "total_s": t_run + t_sum, "cells": len(cells["cells"]),
                        "sweep_token_layers": work, "plain_tok_s": n_tok / t_plain, "sweep_vs_plain": ratio,
                        "options": dataclasses.asdict(opts), "result": summary.get("result", {}).get("status")}
    G.flush_results()
    G.log(f"result: {summary.get('result', {}).get('text')}")


if __name__ == "__main__":
    main()

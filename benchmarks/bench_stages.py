#!/usr/bin/env python
"""The study's runners on the Llama-3.1-8B-shaped random pair with the models passed in (no loading),
alone or from bench_gpu.py:

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_stages.py
    python benchmarks/bench_stages.py --full-study          # behaviour (RQ1) and side effects (RQ2) on
    python benchmarks/bench_stages.py --tiny                # tiny Llama on CPU, 60/30 prompts (dry run)

Section stages: RQ1 (``run_rq1``, behaviour off) and RQ2 (``run_maps``, ``run_mapped_patch`` with the
alpha-sweep, side effects off) at 450 train / 150 val prompts, stride 2; prompts are the shipped
cultural set, tokenized by a small BPE trained on the shipped sets (common.bench_tokenizer) so a
prompt has about the seeds' ~48 tokens. ``--budget S`` cuts the stages off (SIGALRM) so that the
whole script stays within S seconds (leaving ``--reserve`` for compare when bench_gpu.py runs it next).

Output: a markdown table on stdout; with $OUT (or --out) also $OUT/bench.log and
$OUT/stages_results.md/.json.
"""
from __future__ import annotations

import inspect
import tempfile
import time
import traceback
from pathlib import Path

import torch

import common as C
from common import bench_tokenizer, cleanup, loaded_pair, log, section, sync, table


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
    tok, mean_len = bench_tokenizer()
    prompts = str(C.PROMPTS)
    pair, models = loaded_pair(base, tuned, tok)
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
        C.RESULTS.setdefault("stages", {})[name] = rows[-1][1:]
        log(f"stage {name}: {rows[-1][1]:.1f}s {rows[-1][2]}")
        cleanup()

    from mechdiff.experiments import rq1 as rq1_mod
    o1 = dict(n_prompts=n_val, stride=2, behaviour=full, prompts=prompts)
    opts1 = rq1_mod.RQ1Options(**{k: v for k, v in o1.items() if k in rq1_mod.RQ1Options.__dataclass_fields__})
    log(f"RQ1 options: {opts1}")
    stage(f"RQ1 (capture, CKA+null+CI, patch sweep both directions; behaviour {'on' if full else 'off'})",
          lambda: rq1_mod.run_rq1(pair, opts1, out=out, models=models))
    try:
        from mechdiff.experiments import maps as rq2_mod
    except Exception as e:
        rows.append(["RQ2 runners", 0.0, f"not run: mechdiff.experiments.maps not importable ({type(e).__name__}); "
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
    C.RESULTS["stages_total_s"] = total
    table(f"Stages on the {'tiny' if tiny else '8B-shaped'} pair ({n_tr} train / {n_val} val prompts, stride 2, "
          f"~{mean_len:.0f} tokens/prompt, models preloaded)", ["stage", "wall s", "status"], rows,
          f"run directory: {out}")


def _rq2_blocks(models, prompts_path, n_tr, n_val, stage):
    """RQ2's work without its runner: capture 600 prompts x 16 layers x 3 sites in both models, fit
    and score ridge / Procrustes / scaled Procrustes maps (resid_post, 16 layers), then the mapped-patch
    alpha-sweep (3 sites x 16 layers x 4 alphas, base states mapped into the tuned model) through
    the PatchEngine in chunks of 32 val prompts, with KL against the clean run."""
    from mechdiff.patching.kl import kl_from_logits
    from mechdiff.analyses.maps import ProcrustesMap, RidgeMap, ScaledProcrustesMap
    from mechdiff.data.prompts import encode, load_jsonl
    from mechdiff.experiments.rq1 import cka_layers
    from mechdiff.patching import Patch, PatchEngine
    from mechdiff.sites.capture import capture
    DEV = C.DEV
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


def add_args(ap):
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole script (0: none); the "
                    "stages section is cut off (SIGALRM) so that --reserve seconds remain for compare")
    ap.add_argument("--reserve", type=float, default=120)
    ap.add_argument("--full-study", action="store_true",
                    help="stages with behaviour (RQ1) and side effects (RQ2) on: the whole study's wall time")


def run_stages(ctx):
    a = ctx.args
    budget = getattr(a, "budget", 0)
    left = budget - (time.perf_counter() - C.T_START) - (getattr(a, "reserve", 120) if "compare" in ctx.sections else 0)
    sec_stages(ctx.base, ctx.tuned, ctx.cfg, ctx.tiny, budget_s=max(30.0, left) if budget else None,
               full=getattr(a, "full_study", False))


SECTIONS = {"stages": C.Section(run_stages)}


def main(argv=None, ctx=None, sections=None):
    return C.run_sections(SECTIONS, __doc__, argv, ctx, sections, stem="stages_results", add_args=add_args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""mechdiff capture vs nnsight vs TransformerLens on the same batch and sites, alone or from
bench_gpu.py (where it runs last):

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_compare.py
    python benchmarks/bench_compare.py --tiny            # tiny Llama on CPU (dry run)

Section compare: the honest HF forward (common.honest_forward, contiguous last-token head) vs mechdiff ``capture()`` vs
nnsight ``trace`` + ``.save()`` vs TransformerLens ``HookedTransformer.run_with_cache(names_filter=...)``
on resid_post / attn_out / mlp_out at every layer, last position (B=16,T=512 and B=150,T=48).
TransformerLens builds its own random model of the same shape; the tuned model is freed first;
nnsight wraps the base model's modules (measured after the plain runs). nnsight and
transformer-lens are optional: a missing one gives a "not run" row (see README.md for the wheels).

Output: markdown tables on stdout; with $OUT (or --out) also $OUT/bench.log and
$OUT/compare_results.md/.json.
"""
from __future__ import annotations

import time
import traceback

import torch

import common as C
from common import capture_sites, cleanup, honest_forward, log, peak_extra, random_batch, section, sync, table, timeit


def tl_model_from(cfg, dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    DEV = C.DEV
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


def _not_run(res, name, e):
    log(f"{name} not measured: {type(e).__name__}: {e}")
    log(traceback.format_exc())
    for key in res:
        res[key][name] = (float("nan"), float("nan"), f"not run: {type(e).__name__}: {str(e)[:100]}")


@section("compare")
def sec_compare(base, cfg, shapes, reps, dtype):
    from mechdiff.sites.capture import capture
    DEV = C.DEV
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
        record_row(key, "HF forward (reference)", lambda: honest_forward(base, b))
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
            record_row(key, "HF forward again, after NNsight() wrapped the model", lambda b=b: honest_forward(base, b))
        del nm
    except Exception as e:
        _not_run(res, "nnsight", e)
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
        _not_run(res, "TransformerLens", e)
    cleanup()
    for (B, T), r in res.items():
        ref = r["HF forward (reference)"][0]
        cap = r.get("mechdiff capture() (kept: last pos -> CPU)", (float("nan"),))[0]
        rows = [[n, t * 1e3, B * T / t, ref / t, t / cap, mem, note] for n, (t, mem, note) in r.items()]
        C.RESULTS.setdefault("compare", {})[f"B{B}_T{T}"] = {n: dict(s=t, peak_gib=mem, note=note)
                                                             for n, (t, mem, note) in r.items()}
        table(f"mechdiff vs nnsight vs TransformerLens, B={B}, T={T}, {len(sites)} sites",
              ["method", "ms (median)", "tokens/s", "throughput vs HF forward", "time / mechdiff capture",
               "extra peak GiB", "note"], rows)


def run_compare(ctx):
    ctx.pair()
    ctx.free_tuned()    # TransformerLens builds a third model: free the tuned one first
    shapes = C.capture_shapes(ctx.tiny)
    sec_compare(ctx.base, ctx.cfg, shapes, ctx.reps, ctx.dtype)


SECTIONS = {"compare": C.Section(run_compare)}


def main(argv=None, ctx=None, sections=None):
    return C.run_sections(SECTIONS, __doc__, argv, ctx, sections, stem="compare_results")


if __name__ == "__main__":
    main()

"""Time a last-position patch sweep over every layer: naive full recomputation vs PatchEngine.

    python benchmarks/bench_patching_cpu.py                       # SmolLM2-135M-shaped, random, CPU
    python benchmarks/bench_patching_cpu.py --preset tiny
    python benchmarks/bench_patching_cpu.py --preset llama8b --device cuda --dtype bfloat16 \\
        --batch 50 --seq 48 --tail 5 --max-rows 256 1024 2048     # the issue's 8B target, one GPU

Random weights (speed does not depend on them). Prompts are left padded with varied lengths and a
chat-template tail of ``--tail`` tokens after the decision token, like Llama-3's assistant header.
One "direction" of a cross-model sweep is one model patched at all layers (resid_post, replace);
the issue's goal is sweep cost <= 2 x clean forward per model. "half shared" sweeps the same layers
with the bottom half's sources equal to the clean states (layers both models share: detected as
no-ops, not computed). Prints a table, asserts nothing.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mechdiff.data.prompts import Batch
from mechdiff.patching import Patch, PatchEngine

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def make_batch(B: int, T: int, tail: int, vocab: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(tail + 2, T // 2), T + 1, (B,), generator=g)
    lengths[0] = T
    ids = torch.randint(10, vocab, (B, T), generator=g)
    mask = (torch.arange(T)[None] >= (T - lengths)[:, None]).long()
    ids = ids * mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dec = torch.full((B,), T - 1 - tail)
    return Batch(ids, mask, pos, dec, ids=list(range(B))).to(device)


def timed(fn, device, reps: int = 1, label: str = "") -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    if label:
        print(f"  [{label}: {dt:.4f} s]", flush=True)
    return dt


def main():
    ap = argparse.ArgumentParser()
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = LlamaConfig(**PRESETS[args.preset], pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    L = cfg.num_hidden_layers
    batch = make_batch(args.batch, args.seq, args.tail, cfg.vocab_size, device)
    sites = [f"resid_post.{l}" for l in range(L)]

    with torch.no_grad():
        model(**batch.model_inputs(), logits_to_keep=1)  # warm-up
        t_clean = timed(lambda: model(**batch.model_inputs(), logits_to_keep=1), device, reps=3,
                        label="clean")
        eng0 = PatchEngine(model, batch, measure=args.measure, record_sites=sites)
        src = {s: v + 0.5 * torch.randn_like(v) for s, v in eng0.clean_states(sites).items()}
        variants = [Patch(s, src[s]) for s in sites]
        n_naive = args.naive_layers or L
        t_naive = timed(lambda: eng0.run_naive(variants[:n_naive]), device, label="naive") * L / n_naive
        rows = []
        for mr in args.max_rows:
            t_build = timed(lambda: PatchEngine(model, batch, measure=args.measure, max_rows=mr), device)
            eng = PatchEngine(model, batch, measure=args.measure, max_rows=mr)
            eng.run(variants)  # warm-up: first calls with new shapes pay kernel selection / autotuning
            t_sweep = timed(lambda: eng.run(variants), device, reps=3, label="engine")
            eng_ns = PatchEngine(model, batch, measure=args.measure, max_rows=mr, skip_layers=False)
            eng_ns.run(variants)
            t_noskip = timed(lambda: eng_ns.run(variants), device, label="no skip")
            del eng_ns
            half = [Patch(s, (eng0.clean_states([s])[s] if l < L // 2 else src[s])) for l, s in enumerate(sites)]
            t_half = timed(lambda: eng.run(half), device, label="half shared")
            rows.append((mr, t_build, t_sweep, t_noskip, t_half))
        fast = eng.run(variants[:4])
        ref = eng0.run_naive(variants[:4])
        err = (fast - ref).abs().max().item()
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(fast, -1)
        kl_eq = (lp.exp() * (lp - lq)).sum(-1).max().item()
        lc = torch.log_softmax(eng0.clean_logits, -1)
        kl_fx = (lc.exp() * (lc - lp)).sum(-1).mean().item()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\npreset={args.preset} device={device} dtype={args.dtype} B={args.batch} T={args.seq} "
          f"tail={args.tail} measure={args.measure} layers={L} threads={torch.get_num_threads()}")
    print(f"{'what':<44}{'seconds':>10}{'x clean fwd':>13}")
    print(f"{'clean forward (full batch)':<44}{t_clean:>10.4f}{1.0:>13.2f}")
    print(f"{'naive sweep, all layers' + (' (extrapolated)' if n_naive < L else ''):<44}"
          f"{t_naive:>10.4f}{t_naive / t_clean:>13.2f}")
    for mr, t_build, t_sweep, t_noskip, t_half in rows:
        print(f"{f'engine clean pass (max_rows={mr})':<44}{t_build:>10.4f}{t_build / t_clean:>13.2f}")
        print(f"{f'engine sweep, all layers (max_rows={mr})':<44}{t_sweep:>10.4f}{t_sweep / t_clean:>13.2f}")
        print(f"{f'  same without layer skipping':<44}{t_noskip:>10.4f}{t_noskip / t_clean:>13.2f}")
        print(f"{f'  same, bottom half of layers shared':<44}{t_half:>10.4f}{t_half / t_clean:>13.2f}")
        print(f"{f'  naive / engine sweep':<44}{'':>10}{t_naive / t_sweep:>13.2f}")
    print(f"engine vs naive on 4 variants: max |logit diff| {err:.3g}, max KL(naive || engine) {kl_eq:.3g} "
          f"(the patches' own effect: mean KL(clean || patched) {kl_fx:.3g})"
          + (f"; peak GPU memory {peak:.1f} GiB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()

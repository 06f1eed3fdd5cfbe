#!/usr/bin/env python
"""Per-token divergence (the ``tokens`` stage's reduction) against a plain teacher-forced forward of
both models, on the Llama-3.1-8B-shaped random-weight pair.

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_tokens.py        # GPU, bf16, B=64, T=512
    python benchmarks/bench_tokens.py --tiny                                     # tiny Llama on CPU (dry run)

Rows of the table (one batch of B texts of T tokens, both models; seconds = median of --reps):

- baseline: each model's plain HF forward with its full, contiguous ``[B, T, V]`` logits (what any
  per-token KL needs at least), the two logits tensors freed after the call;
- naive: the baseline plus KL both ways, log-probs and ranks computed on the two full logits tensors;
- mechdiff: :func:`mechdiff.texts.divergence.final_hidden` for both models (the output layer on one
  position only) then :meth:`RowReducer.pair_stats` over every position (output layer applied in
  chunks; never ``[B, T, V]``).

Target (issue 23): mechdiff >= 0.8x the baseline's throughput with < 2 GiB extra peak memory at
B=64, T=512 (extra = over the memory both models hold). Tokens/s count B x T per model pair.
"""
from __future__ import annotations

import torch

import common as C
from common import build_pair, llama_config, log, peak_extra, random_batch, table, timeit


def _baseline(models, b):
    for m in models:
        logits = m(**b.model_inputs(), use_cache=False).logits
        del logits


def _naive(models, b):
    la = models[0](**b.model_inputs(), use_cache=False).logits
    lb = models[1](**b.model_inputs(), use_cache=False).logits
    pa, pb = torch.log_softmax(la.float(), -1), torch.log_softmax(lb.float(), -1)
    del la, lb
    kl_bt = (pa.exp() * (pa - pb)).sum(-1)
    kl_tb = (pb.exp() * (pb - pa)).sum(-1)
    nxt = b.input_ids[:, 1:, None]
    lp = pa[:, :-1].gather(-1, nxt)
    rank = (pa[:, :-1] > lp).sum(-1)
    return kl_bt, kl_tb, rank


def _mechdiff(reducer, models, b):
    from mechdiff.texts.divergence import final_hidden
    ha, hb = (final_hidden(m, b) for m in models)
    d = ha.shape[-1]
    nxt = b.input_ids[:, 1:].reshape(-1)
    return reducer.pair_stats(ha[:, :-1].reshape(-1, d), hb[:, :-1].reshape(-1, d), nxt, nxt)


def main(argv=None):
    ap = C.parser(__doc__, reps=3)
    ap.add_argument("--batch", type=int, default=None, help="texts per batch (default 64; 4 with --tiny)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per text (default 512; 32 with --tiny)")
    ap.add_argument("--budget-gib", type=float, default=1.0, help="RowReducer chunk budget (GiB)")
    args = ap.parse_args(argv)
    C.setup(args, "tokens_results")
    from mechdiff.texts.divergence import RowReducer
    cfg = llama_config(args.tiny)
    base, tuned = build_pair(cfg, torch.float32 if args.tiny else torch.bfloat16)
    models = (base, tuned)
    B, T = args.batch or (4 if args.tiny else 64), args.seq or (32 if args.tiny else 512)
    b = random_batch(B, T, cfg.vocab_size)
    ids = torch.arange(cfg.vocab_size)
    red = RowReducer(base, tuned, ids, ids, full=True, budget_bytes=int(args.budget_gib * 2**30))
    log(f"B={B} T={T} V={cfg.vocab_size} chunk={red.chunk} rows, device {C.DEV}")
    rows = []
    with torch.no_grad():
        t_ref, (lo, hi) = timeit(lambda: _baseline(models, b), warmup=1, reps=args.reps)
        p_ref = peak_extra(lambda: _baseline(models, b))
        rows.append(["baseline: plain forward, full logits (both)", t_ref, B * T / t_ref, 1.0, p_ref])
        for name, fn in (("naive: full logits + per-token reductions", lambda: _naive(models, b)),
                         ("mechdiff: final_hidden + RowReducer.pair_stats", lambda: _mechdiff(red, models, b))):
            try:
                t, _ = timeit(fn, warmup=1, reps=args.reps)
                rows.append([name, t, B * T / t, t_ref / t, peak_extra(fn)])
            except torch.cuda.OutOfMemoryError as e:           # the naive path may not fit at B=64, T=512
                rows.append([name + f" (out of memory: {str(e)[:60]})", None, None, None, None])
                C.cleanup()
    table(f"Per-token divergence, B={B}, T={T}, {'tiny' if args.tiny else 'Llama-3.1-8B shape'}, {C.DEV}",
          ["what", "seconds", "tokens/s", "x baseline throughput", "extra peak GiB"], rows,
          note="extra peak: GiB allocated at the peak over what was allocated before (both models); "
               "nan on the CPU. Target: mechdiff >= 0.8x baseline, < 2 GiB extra.")
    return rows


if __name__ == "__main__":
    main()

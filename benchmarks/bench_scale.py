"""Capture throughput past one GPU: 1 GPU, 2 GPUs data parallel (torchrun, one model copy each), and
one model sharded over 2 GPUs (accelerate device_map "balanced").

    python benchmarks/bench_scale.py [--layers 32 --d-model 4096 --prompts 2048 --seq 128 --batch 32]

Needs a host with 2 or more GPUs (on fewer it says so and exits 2). The model is Llama-shaped with
random weights (no download), bf16, saved once to a temporary directory so the sharded case loads it
through ``load_model(..., device_map=...)`` as a user would. Prints a table of tokens/s and the ratio
to 1 GPU. Run with NCCL_NVLS_ENABLE=0 (NVLink multicast off). The data parallel case starts two
processes of this file with torchrun's environment (``--worker``) and gathers like the study steps.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _prompts(n: int, seq: int) -> list[dict]:
    return [{"id": f"p{i}", "text": " ".join(["word"] * (seq - 8 - i % 7))} for i in range(n)]


def _build(path: Path, layers: int, d_model: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mechdiff.models.tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    cfg = LlamaConfig(hidden_size=d_model, intermediate_size=int(3.5 * d_model), num_hidden_layers=layers,
                      num_attention_heads=d_model // 128, num_key_value_heads=8, vocab_size=len(tok),
                      pad_token_id=0, bos_token_id=257, eos_token_id=260)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(path)
    tok.save_pretrained(path)


def _capture_rate(model, tok, prompts, batch: int, layers: int) -> float:
    """tokens/s of a capture of resid_post at every 4th layer (after one warm-up batch)."""
    from mechdiff.experiments.steps import capture_sides
    from types import SimpleNamespace
    side = SimpleNamespace(model=model, tokenizer=tok)
    study = SimpleNamespace(side=lambda s: side, batch_size=batch)
    sites = [f"resid_post.{l}" for l in range(0, layers, 4)]
    capture_sides(study, prompts[:batch], sites, sides=["base"])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    capture_sides(study, prompts, sites, sides=["base"])
    torch.cuda.synchronize()
    n_tok = sum(len(tok(p["text"])["input_ids"]) for p in prompts)
    return n_tok / (time.perf_counter() - t0)


def _worker(args) -> None:
    from mechdiff.models.load import load_model
    from mechdiff.scale.distributed import init, world
    init()
    lm = load_model(args.path, dtype="bfloat16", device="cuda")
    rate = _capture_rate(lm.model, lm.tokenizer, _prompts(args.prompts, args.seq), args.batch, args.layers)
    if world()[0] == 0:
        Path(args.result).write_text(json.dumps({"rate": rate}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return 0
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        print(f"bench_scale needs a host with 2 or more GPUs; torch sees {n} here. Nothing measured.")
        return 2
    from mechdiff.models.load import load_model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        _build(path, args.layers, args.d_model)
        prompts = _prompts(args.prompts, args.seq)
        lm = load_model(str(path), dtype="bfloat16", device="cuda:0")
        one = _capture_rate(lm.model, lm.tokenizer, prompts, args.batch, args.layers)
        rows.append(("1 GPU", one))
        del lm
        torch.cuda.empty_cache()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = Path(tmp) / "dp.json"
        procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--path", str(path), "--result",
                                           str(result), "--layers", str(args.layers), "--prompts", str(args.prompts),
                                           "--seq", str(args.seq), "--batch", str(args.batch)], env=env))
        if any(p.wait() != 0 for p in procs):
            print("the data parallel workers failed")
            return 1
        rows.append(("2 GPUs, data parallel", json.loads(result.read_text())["rate"]))
        lm = load_model(str(path), dtype="bfloat16", device_map="balanced",
                        max_memory={0: "120GiB", 1: "120GiB"})
        rows.append((f"1 model sharded over 2 GPUs ({lm.info['device']})",
                     _capture_rate(lm.model, lm.tokenizer, prompts, args.batch, args.layers)))
    print(f"capture, Llama-shaped {args.layers} layers d={args.d_model} bf16, {args.prompts} prompts x ~{args.seq} "
          f"tokens, batch {args.batch}")
    print(f"{'setting':<48} {'tokens/s':>12} {'vs 1 GPU':>9}")
    for name, rate in rows:
        print(f"{name:<48} {rate:>12,.0f} {rate / one:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
